"""Field-level encryption of the documents' protected fields (issue 20 §2).

Which fields: those the classification catalog puts in a PROTECTED class (pci, pii, credential)
in store ``documents`` (``governance.classification.load_catalog``, declared by each spec's
``classification`` map in mongo/collections). Nothing here lists them.

How: each value (a string) is encrypted by the envelope (``security.envelope``, AES-256-GCM)
under its collection's data key, scope ``documents/<collection lower-case>``, and stored as
binData (subtype 0) holding the envelope's ciphertext, which names its scope and key version. The
associated data binds the collection, the field and the document's ``_id``
(:func:`associated_data`): a ciphertext copied into another field, document or collection does
not decrypt (TamperedCiphertext naming where it was found).

Lookups: a protected field whose spec also declares ``<field>_hash`` gets a keyed hash of its
normalised value (trimmed, lower-case, as the OLTP ``pii_lookup_hash``) beside it: HMAC-SHA256,
hex, under the lookup key of ``documents/customer``. One key for every collection, so a
Transaction's ``customer_email_hash`` equals its customer's ``email_hash``.
:meth:`DocumentFields.find_by_email` queries it.

Readers decrypt through :meth:`DocumentFields.decrypt_document`; a value still in clear (written
with ``encrypt_at_rest`` off) is returned as it is. With ``encrypt_at_rest`` off (the bench's
comparison) documents are written as they come, without hashes.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bson import Binary, ObjectId, json_util
from bson.json_util import CANONICAL_JSON_OPTIONS

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.governance.classification import load_catalog
from stripe_platform.security.envelope import Envelope, shared_envelope
from stripe_platform.security.keys import TamperedCiphertext

STORE = "documents"
HASH_SUFFIX = "_hash"
# The lookup key of every document keyed hash: one key, so hashes of one e-mail agree across
# collections (a Transaction's customer_email_hash finds its Customer).
LOOKUP_SCOPE = "documents/customer"
EMAIL_CATEGORY = "user.contact.email"


class FieldEncryptionError(PlatformError, ValueError):
    """A protected field holds what cannot be encrypted (not a string), or a lookup names a
    field with no keyed hash; nothing was written."""


@dataclass(frozen=True)
class ProtectedField:
    collection: str
    path: str  # dotted, as the catalog names it ("email", "contact.email")
    hash_path: str | None  # "<path>_hash" when the spec declares it, for lookups
    category: str | None = None  # the catalog's, e.g. "user.contact.email"

    @functools.cached_property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("."))


def scope(collection: str) -> str:
    return f"{STORE}/{collection.lower()}"


def associated_data(collection: str, path: str, document_id: Any) -> bytes:
    """What a field's ciphertext is bound to: collection, field and the document's ``_id`` in
    canonical Extended JSON (``{"$oid": "..."}`` for an ObjectId: typed, so ``5`` and ``"5"``
    differ)."""
    if isinstance(document_id, ObjectId):  # the common case, as json_util spells it (7 us less)
        ident = f'{{"$oid": "{document_id}"}}'
    else:
        ident = json_util.dumps(document_id, json_options=CANONICAL_JSON_OPTIONS)
    return f"{scope(collection)}.{path}#{ident}".encode()


def normalise(value: str) -> str:
    return value.strip().lower()


@functools.cache
def protected_fields() -> dict[str, tuple[ProtectedField, ...]]:
    """Per collection, its protected fields, from the catalog (read once a process)."""
    catalog = load_catalog()
    declared = {(e.dataset, e.field) for e in catalog.for_store(STORE)}
    fields: dict[str, list[ProtectedField]] = {}
    for e in catalog.protected(STORE):
        hashed = e.field + HASH_SUFFIX
        fields.setdefault(e.dataset, []).append(
            ProtectedField(
                e.dataset,
                e.field,
                hashed if (e.dataset, hashed) in declared else None,
                e.category,
            )
        )
    return {c: tuple(sorted(f, key=lambda p: p.path)) for c, f in fields.items()}


def _holders(value: Any, parts: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The objects that hold the last part of a dotted path (through arrays of objects)."""
    if isinstance(value, list):
        for item in value:
            yield from _holders(item, parts)
    elif isinstance(value, dict):
        if len(parts) == 1:
            if parts[0] in value:
                yield value
        elif parts[0] in value:
            yield from _holders(value[parts[0]], parts[1:])


def _copy_along(doc: Mapping[str, Any], parts: tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``doc`` whose containers along ``parts`` are copies too (the caller's document
    is never changed)."""
    out = dict(doc)
    if len(parts) > 1 and parts[0] in out:
        inner = out[parts[0]]
        if isinstance(inner, dict):
            out[parts[0]] = _copy_along(inner, parts[1:])
        elif isinstance(inner, list):
            out[parts[0]] = [_copy_along(i, parts[1:]) if isinstance(i, dict) else i for i in inner]
    return out


class DocumentFields:
    """The protected fields of the document store, encrypted on write and decrypted on read.

    Cheap to create: the envelope (``shared_envelope``: one a process and database) caches the
    unwrapped data keys."""

    def __init__(self, settings: Settings, *, envelope: Envelope | None = None) -> None:
        self.settings = settings
        self.enabled = settings.encrypt_at_rest
        self._envelope = envelope
        self._lookup_key: bytes | None = None

    @property
    def envelope(self) -> Envelope:
        if self._envelope is None:
            self._envelope = shared_envelope(self.settings)
        return self._envelope

    def lookup_hash(self, value: str) -> str:
        """The keyed hash stored beside a protected value (hex HMAC-SHA256 of its normal form)."""
        if self._lookup_key is None:
            self._lookup_key = self.envelope.lookup_key(LOOKUP_SCOPE)
        return hmac.digest(self._lookup_key, normalise(value).encode(), "sha256").hex()

    # -- writing ---------------------------------------------------------------------------------
    def encrypt_document(self, collection: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``doc`` with its protected fields encrypted (and hashed where declared).
        A document without ``_id`` gets one (as pymongo would on insert): the ciphertext is bound
        to it. Values already encrypted are left as they are; None stays None."""
        fields = protected_fields().get(collection, ()) if self.enabled else ()
        if not fields:
            return dict(doc)
        out = dict(doc)
        if "_id" not in out:
            out["_id"] = ObjectId()
        for field in fields:
            if len(field.parts) > 1:
                out = _copy_along(out, field.parts)
            aad = associated_data(collection, field.path, out["_id"])
            name = field.parts[-1]
            for holder in _holders(out, field.parts):
                value = holder[name]
                if value is None or (isinstance(value, bytes) and Envelope.is_ciphertext(value)):
                    continue
                if not isinstance(value, str):
                    raise FieldEncryptionError(
                        f"{collection} document _id={out['_id']!r}: field {field.path!r} is "
                        f"protected ({scope(collection)}) and must be a string to be encrypted, "
                        f"not {type(value).__name__}; nothing was written"
                    )
                holder[name] = Binary(
                    self.envelope.encrypt(scope(collection), value.encode(), aad=aad)
                )
                if field.hash_path is not None:
                    holder[name + HASH_SUFFIX] = self.lookup_hash(value)
        return out

    def encrypt_documents(
        self, collection: str, docs: Iterable[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """:meth:`encrypt_document` of each; a non-string protected value refuses the batch."""
        return [self.encrypt_document(collection, d) for d in docs]

    def encrypting(
        self, collection: str, docs: Iterable[Mapping[str, Any]]
    ) -> Iterator[dict[str, Any]]:
        """The documents of a stream, encrypted as they pass (the seed's batches)."""
        if not self.enabled or collection not in protected_fields():
            yield from docs  # type: ignore[misc]
            return
        for doc in docs:
            yield self.encrypt_document(collection, doc)

    # -- reading ---------------------------------------------------------------------------------
    def decrypt_document(self, collection: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``doc`` with its protected fields in clear. Raises TamperedCiphertext (or
        UnknownKeyVersion, KeyUnavailable, ...) naming the collection, field and document when a
        value does not decrypt: altered, or copied from another field, document or collection.
        Decrypts whatever ``encrypt_at_rest`` says now: documents written before keep reading."""
        out = dict(doc)
        for field in protected_fields().get(collection, ()):
            name = field.parts[-1]
            holders = list(_holders(out, field.parts))
            if not any(isinstance(h[name], bytes) for h in holders):
                continue  # absent, null or still in clear
            if "_id" not in out:
                raise FieldEncryptionError(
                    f"{collection}.{field.path} is encrypted and bound to its document's _id: "
                    "read the document with its _id (not projected away) to decrypt it"
                )
            if len(field.parts) > 1:
                out = _copy_along(out, field.parts)
            aad = associated_data(collection, field.path, out["_id"])
            where = f"{collection}.{field.path} of document _id={out['_id']!r}"
            for holder in _holders(out, field.parts):
                value = holder[name]
                if not isinstance(value, bytes):  # Binary is bytes; pymongo reads subtype 0 so
                    continue
                if not Envelope.is_ciphertext(value):
                    raise TamperedCiphertext("binData that is no envelope ciphertext", obj=where)
                holder[name] = self.envelope.decrypt(value, aad=aad, obj=where).decode()
        return out

    def decrypt_documents(
        self, collection: str, docs: Iterable[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        return [self.decrypt_document(collection, d) for d in docs]

    def find_by_email(self, db: Any, collection: str, email: str) -> list[dict[str, Any]]:
        """The documents of ``collection`` whose e-mail field (the protected field of category
        ``user.contact.email`` with a keyed hash) equals ``email`` (trimmed, case-insensitive),
        decrypted. With ``encrypt_at_rest`` off it matches the stored value exactly."""
        target = self._email_field(collection)
        if not self.enabled:
            query: dict[str, Any] = {target.path: email}
        else:
            query = {target.hash_path: self.lookup_hash(email)}
        return [self.decrypt_document(collection, d) for d in db[collection].find(query)]

    def _email_field(self, collection: str) -> ProtectedField:
        found = [
            f
            for f in protected_fields().get(collection, ())
            if f.hash_path is not None and f.category == EMAIL_CATEGORY
        ]
        if len(found) != 1:
            raise FieldEncryptionError(
                f"{collection}: find_by_email needs one protected field of category "
                f"{EMAIL_CATEGORY} with a keyed hash (<field>{HASH_SUFFIX} declared in the spec); "
                f"found {[f.path for f in found] or 'none'}"
            )
        return found[0]
