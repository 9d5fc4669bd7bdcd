"""Envelope encryption: data keys per store and table, per data subject, wrapped by the store's KEK.

Ciphertext format (AES-256-GCM through cryptography's AESGCM):

    b"SPE1" | u16 len(scope) | scope (utf-8) | u32 dek version | 12-byte random nonce | ct + 16-byte tag

The header (everything before the nonce) and the caller's ``aad`` (e.g. b"documents/customer.email")
are the associated data: a ciphertext moved to another field or relabelled does not decrypt.

Data keys live in the OLTP database's ``keys`` schema (sql/oltp/0012_keys.sql), only wrapped by the
key provider (security/keys.py); subject keys (``subjects/<id>``, crypto-shredding) are wrapped
locally by the ``subjects/_wrap`` data key, so 100k subjects are not 100k KMS calls. Unwrapped keys
are cached in-process for ``RECHECK_SECONDS`` before their state is read again (a rotation, a
retirement or a shredding in another process reaches this one within that time; in this process at
once). Every key operation appends to ``keys.key_event``, failures included.

Connections to the database are made with ``with_key=False``: a keyed connection asks this module
for its data keys.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from psycopg.types.json import Jsonb

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.security.keys import (
    STORES,
    KeyError_,
    KeyProvider,
    KeyShredded,
    KeyUnavailable,
    KeyVersion,
    TamperedCiphertext,
    UnknownKeyVersion,
    WrappedKey,
    key_provider,
)

log = logging.getLogger(__name__)

MAGIC = b"SPE1"
NONCE_BYTES = 12
TAG_BYTES = 16
WRAP_SCOPE = "subjects/_wrap"  # the data key that wraps the subject keys
RECHECK_SECONDS = 60.0  # how long a cached key's state is trusted before it is read again
SCOPE = re.compile(r"^(postgres|documents|lake|warehouse|subjects)(/[A-Za-z0-9_.-]+)+$")
SUBJECT_SCOPE = re.compile(r"^subjects/(\d+)$")


class ScopeError(PlatformError, ValueError):
    """A scope name that is not ``<store>/<table>``."""


@dataclass(frozen=True)
class DataKey:
    scope: str
    version: int
    key: bytes = field(repr=False)  # 32 bytes: never logged
    kek_version: int


@dataclass(frozen=True)
class DataKeyInfo:
    """One stored data-key version, without its material (for `keys list`)."""

    scope: str
    purpose: str  # "encrypt" | "lookup"
    version: int
    state: str  # "current" | "previous" | "retired"
    kek_id: str
    kek_version: int
    created_at: dt.datetime
    rewrapped_at: dt.datetime | None
    retired_at: dt.datetime | None


@dataclass(frozen=True)
class RewrapResult:
    stores: tuple[str, ...]
    kek_versions: dict[str, int]  # store -> the new KEK version
    count: int  # data keys re-wrapped
    seconds: float  # in all
    kek_seconds: float  # of which creating the new KEK versions in the provider


@dataclass(frozen=True)
class KeyAuditRecord:
    id: int
    at: dt.datetime
    actor: str
    db_user: str
    source_address: str | None
    operation: str
    scope: str | None
    version: int | None
    outcome: str  # "ok" | "refused" | "failed"
    detail: dict


# -- the ciphertext header ------------------------------------------------------------------------
def _header(scope: str, version: int) -> bytes:
    name = scope.encode()
    return MAGIC + struct.pack(">H", len(name)) + name + struct.pack(">I", version)


def _parse(ciphertext: bytes) -> tuple[str, int, int]:
    """(scope, version, offset of the nonce); TamperedCiphertext when the header is not ours."""
    if len(ciphertext) < 6 or ciphertext[:4] != MAGIC:
        raise TamperedCiphertext("not an envelope ciphertext (no SPE1 header)")
    (length,) = struct.unpack(">H", ciphertext[4:6])
    end = 6 + length
    if len(ciphertext) < end + 4 + NONCE_BYTES + TAG_BYTES:
        raise TamperedCiphertext("truncated envelope ciphertext")
    try:
        scope = ciphertext[6:end].decode()
    except UnicodeDecodeError:
        raise TamperedCiphertext("envelope ciphertext with an unreadable key name") from None
    (version,) = struct.unpack(">I", ciphertext[end : end + 4])
    return scope, version, end + 4


def _seal(aead: AESGCM, header: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return header + nonce + aead.encrypt(nonce, plaintext, header + aad)


def _check_scope(scope: str) -> None:
    if not SCOPE.match(scope):
        raise ScopeError(
            f"data key scope {scope!r}: expected <store>/<table> with store one of {STORES}"
        )
    if SUBJECT_SCOPE.match(scope):
        raise ScopeError(f"data key scope {scope!r} is a data subject's: use SubjectKeys")


@dataclass
class _Cached:
    key: DataKey
    aead: AESGCM
    checked: float  # time.monotonic() of the last state read


class Envelope:
    """Encrypt and decrypt values under data keys; manage those keys (create, rotate, retire,
    rewrap). Thread-safe; create one per process and settings (``shared_envelope``)."""

    def __init__(
        self, settings: Settings, *, provider: KeyProvider | None = None, actor: str | None = None
    ) -> None:
        self.settings = settings
        self.provider = provider if provider is not None else key_provider(settings)
        self.actor = actor or getpass.getuser()
        self._lock = threading.RLock()
        self._keys: dict[tuple[str, str, int], _Cached] = {}  # (scope, purpose, version)
        self._current: dict[tuple[str, str], tuple[int, float]] = {}  # -> (version, checked)
        self._subject_keys: SubjectKeys | None = None
        self._schema_checked = False
        # Shared by every SubjectKeys of this envelope: a shred evicts the key for all of them.
        self._subject_cache: dict[int, _SubjectKey] = {}
        self._subject_lock = threading.RLock()

    def forget_cached(self) -> None:
        """Drop every unwrapped key this envelope holds: the next use reads the key store again.
        For a caller that knows the store changed under it (oltp.db, when a database's key
        generation moved: a rotation, or a database dropped and created again under its name)."""
        with self._lock, self._subject_lock:
            self._keys.clear()
            self._current.clear()
            self._subject_cache.clear()
            self._schema_checked = False

    # -- values ------------------------------------------------------------------------------------
    def encrypt(self, scope: str, plaintext: bytes, *, aad: bytes = b"") -> bytes:
        cached = self._current_cached(scope, "encrypt")
        return _seal(cached.aead, _header(scope, cached.key.version), plaintext, aad)

    def encrypt_many(
        self, scope: str, values: Sequence[bytes | None], *, aad: bytes = b""
    ) -> list[bytes | None]:
        cached = self._current_cached(scope, "encrypt")
        header = _header(scope, cached.key.version)
        return [None if v is None else _seal(cached.aead, header, v, aad) for v in values]

    def decrypt(self, ciphertext: bytes, *, aad: bytes = b"", obj: str | None = None) -> bytes:
        ciphertext = bytes(ciphertext)
        scope, version, at = _parse(ciphertext)
        if SUBJECT_SCOPE.match(scope):
            return self.subject_keys().decrypt(ciphertext, aad=aad, obj=obj)
        cached = self._cached(scope, "encrypt", version, obj=obj)
        try:
            return cached.aead.decrypt(
                ciphertext[at : at + NONCE_BYTES],
                ciphertext[at + NONCE_BYTES :],
                ciphertext[:at] + aad,
            )
        except InvalidTag:
            self._audit_failure("decrypt", scope, version, "refused", {"error": "tag", "obj": obj})
            raise TamperedCiphertext(
                "the ciphertext does not authenticate (altered, or moved from another field)",
                key=f"{scope} v{version}",
                obj=obj,
            ) from None

    def decrypt_many(
        self, values: Sequence[bytes | None], *, aad: bytes = b""
    ) -> list[bytes | None]:
        return [None if v is None else self.decrypt(v, aad=aad) for v in values]

    @staticmethod
    def key_ref(ciphertext: bytes) -> tuple[str, int]:
        scope, version, _ = _parse(bytes(ciphertext))
        return scope, version

    @staticmethod
    def is_ciphertext(value: bytes) -> bool:
        try:
            _parse(bytes(value))
        except TamperedCiphertext:
            return False
        return True

    # -- data keys ---------------------------------------------------------------------------------
    def data_key(self, scope: str) -> DataKey:
        return self._current_cached(scope, "encrypt").key

    def data_key_version(self, scope: str, version: int) -> DataKey:
        _check_scope(scope)
        return self._cached(scope, "encrypt", version).key

    def all_versions(self, scope: str) -> list[DataKey]:
        _check_scope(scope)
        with self._connect() as conn:
            versions = conn.execute(
                "SELECT version FROM keys.data_key WHERE scope = %s AND purpose = 'encrypt' "
                "AND state <> 'retired' ORDER BY version",
                (scope,),
            ).fetchall()
        return [self._cached(scope, "encrypt", v).key for (v,) in versions]

    def lookup_key(self, scope: str) -> bytes:
        """The HMAC key of ``scope``'s keyed-hash lookups (e.g. an e-mail's): never rotated by
        rotate(), so a hash stays findable; rewrapped with the rest."""
        return self._current_cached(scope, "lookup").key.key

    def rotate(self, scope: str) -> DataKey:
        """A new current data-key version; the older ones keep decrypting until retired."""
        _check_scope(scope)
        store = scope.split("/", 1)[0]
        with self._lock, self._connect() as conn, conn.transaction():
            # Two rotations of one scope (other processes) queue: row locks do not cover the
            # first version, which has no row yet.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('keys.data_key:' || %s))", (scope,))
            rows = conn.execute(
                "SELECT version, state FROM keys.data_key WHERE scope = %s AND purpose = 'encrypt' "
                "ORDER BY version",
                (scope,),
            ).fetchall()
            version = (rows[-1][0] if rows else 0) + 1
            material = os.urandom(32)
            wrapped = self._wrap(store, scope, "encrypt", version, material, "rotate")
            conn.execute(
                "UPDATE keys.data_key SET state = 'previous' "
                "WHERE scope = %s AND purpose = 'encrypt' AND state = 'current'",
                (scope,),
            )
            self._insert_key(conn, scope, "encrypt", version, wrapped)
            self._audit(conn, "rotate", scope, version, "ok", {"kek_version": wrapped.version})
        key = DataKey(scope, version, material, wrapped.version)
        self._remember(scope, "encrypt", key)
        self._current[(scope, "encrypt")] = (version, time.monotonic())
        return key

    def retire(self, scope: str, version: int) -> None:
        """Stop a data-key version from decrypting (once re-encryption left nothing under it).
        Its wrapped material is kept (rewrapped with the rest) and refused."""
        _check_scope(scope)
        with self._lock, self._connect() as conn, conn.transaction():
            row = conn.execute(
                "SELECT state FROM keys.data_key WHERE scope = %s AND purpose = 'encrypt' "
                "AND version = %s FOR UPDATE",
                (scope, version),
            ).fetchone()
            refusal = None
            if row is None:
                refusal = UnknownKeyVersion("no such data key version", key=f"{scope} v{version}")
            elif row[0] == "current":
                refusal = KeyUnavailable(
                    "the current data key version cannot be retired: rotate first",
                    key=f"{scope} v{version}",
                )
            elif scope == WRAP_SCOPE:
                (live,) = conn.execute(
                    "SELECT count(*) FROM keys.subject_key WHERE wrap_version = %s", (version,)
                ).fetchone()
                if live:
                    refusal = KeyUnavailable(
                        f"{live} subject keys are still wrapped under it", key=f"{scope} v{version}"
                    )
            if refusal is None and row[0] == "previous":
                conn.execute(
                    "UPDATE keys.data_key SET state = 'retired', retired_at = clock_timestamp() "
                    "WHERE scope = %s AND purpose = 'encrypt' AND version = %s",
                    (scope, version),
                )
            if refusal is None:
                self._audit(conn, "retire", scope, version, "ok", {"was": row[0]})
        if refusal is not None:
            self._audit_failure("retire", scope, version, "refused", {"error": str(refusal)})
            raise refusal
        self._keys.pop((scope, "encrypt", version), None)

    def scopes(self) -> list[DataKeyInfo]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT scope, purpose, version, state, kek_id, kek_version, created_at, "
                "rewrapped_at, retired_at FROM keys.data_key ORDER BY scope, purpose, version"
            ).fetchall()
        return [DataKeyInfo(*row) for row in rows]

    def keks(self) -> dict[str, list[KeyVersion]]:
        """Each store's KEK versions held by the provider (stores without a KEK left out)."""
        return {s: v for s in STORES if (v := self.provider.kek_versions(s))}

    # -- key-encryption keys -----------------------------------------------------------------------
    def rewrap(self, store: str | None = None) -> RewrapResult:
        """Rotate the KEK of ``store`` (every store holding data keys when None) and re-wrap all its
        data keys under the new version, in one transaction. The data is not touched: its
        ciphertexts name data keys, whose material does not change."""
        started = time.perf_counter()
        if store is not None and store not in STORES:
            raise ScopeError(f"store {store!r}: expected one of {STORES}")
        with self._lock, self._connect() as conn:
            if store is None:
                stores = tuple(
                    s
                    for (s,) in conn.execute(
                        "SELECT DISTINCT kek_id FROM keys.data_key ORDER BY 1"
                    ).fetchall()
                )
            else:
                stores = (store,)
            try:
                new = {s: self.provider.rotate_kek(s).version for s in stores}
                kek_seconds = time.perf_counter() - started
            except KeyError_ as exc:
                self._audit_failure("rewrap", None, None, "failed", {"error": str(exc)})
                raise
            count = 0
            with conn.transaction():
                rows = conn.execute(
                    "SELECT scope, purpose, version, kek_id, kek_version, wrapped "
                    "FROM keys.data_key WHERE kek_id = ANY(%s) ORDER BY scope, purpose, version "
                    "FOR UPDATE",
                    (list(stores),),
                ).fetchall()
                updates = []
                for scope, purpose, version, kek_id, kek_version, wrapped in rows:
                    cached = self._keys.get((scope, purpose, version))
                    material = (
                        cached.key.key
                        if cached
                        else self._unwrap(scope, purpose, version, kek_id, kek_version, wrapped)
                    )
                    again = self._wrap(kek_id, scope, purpose, version, material, "rewrap")
                    updates.append((again.version, again.blob, scope, purpose, version))
                with conn.cursor() as cur:
                    cur.executemany(
                        "UPDATE keys.data_key SET kek_version = %s, wrapped = %s, "
                        "rewrapped_at = clock_timestamp() "
                        "WHERE scope = %s AND purpose = %s AND version = %s",
                        updates,
                    )
                count = len(updates)
                seconds = time.perf_counter() - started
                for s in stores:
                    self._audit(
                        conn,
                        "rewrap",
                        s,
                        new[s],
                        "ok",
                        {
                            "data_keys": sum(1 for r in rows if r[3] == s),
                            "seconds": round(seconds, 4),
                        },
                    )
        return RewrapResult(stores, new, count, time.perf_counter() - started, kek_seconds)

    def rotate_kek(self, store: str) -> KeyVersion:
        """A new KEK version without rewrapping (new data keys wrap under it; `rewrap` is the
        usual operation)."""
        if store not in STORES:
            raise ScopeError(f"store {store!r}: expected one of {STORES}")
        version = self.provider.rotate_kek(store)
        with self._connect() as conn:
            self._audit(conn, "rotate_kek", store, version.version, "ok", {})
        return version

    def retire_kek(self, store: str, version: int) -> None:
        """Retire a KEK version, refused while a data key is still wrapped under it."""
        with self._connect() as conn:
            (left,) = conn.execute(
                "SELECT count(*) FROM keys.data_key WHERE kek_id = %s AND kek_version = %s",
                (store, version),
            ).fetchone()
            if left:
                self._audit(conn, "retire_kek", store, version, "refused", {"data_keys": left})
                raise KeyUnavailable(
                    f"{left} data keys are still wrapped under it: rewrap first",
                    key=f"{store} v{version}",
                )
            self.provider.retire_kek(store, version)
            self._audit(conn, "retire_kek", store, version, "ok", {})

    # -- subject keys ------------------------------------------------------------------------------
    def subject_keys(self) -> SubjectKeys:
        with self._lock:
            if self._subject_keys is None:
                self._subject_keys = SubjectKeys(self)
            return self._subject_keys

    # -- internals ---------------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection:
        conn = _connect(self.settings)
        if not self._schema_checked:
            _check_schema(conn)
            self._schema_checked = True
        return conn

    def _audit(
        self,
        conn: psycopg.Connection,
        operation: str,
        scope: str | None,
        version: int | None,
        outcome: str,
        detail: dict,
    ) -> None:
        conn.execute(
            "INSERT INTO keys.key_event (actor, operation, scope, version, outcome, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (self.actor, operation, scope, version, outcome, Jsonb(detail)),
        )

    def _audit_failure(
        self, operation: str, scope: str | None, version: int | None, outcome: str, detail: dict
    ) -> None:
        """Record a refusal or failure on a connection of its own (the operation's transaction, if
        any, rolls back). A database that is down too cannot be told: logged, and the caller
        raises the original error."""
        try:
            with self._connect() as conn:
                self._audit(conn, operation, scope, version, outcome, detail)
        except psycopg.Error as exc:
            log.warning("key audit: could not record %s %s (%s)", operation, scope, exc)

    @staticmethod
    def _context(scope: str, purpose: str, version: int) -> dict[str, str]:
        # Bound to the wrapped key: a blob moved to another scope, purpose or version is refused.
        return {"scope": scope, "purpose": purpose, "version": str(version)}

    def _wrap(
        self, store: str, scope: str, purpose: str, version: int, material: bytes, operation: str
    ) -> WrappedKey:
        try:
            return self.provider.wrap(store, material, self._context(scope, purpose, version))
        except KeyError_ as exc:
            self._audit_failure(operation, scope, version, "failed", {"error": str(exc)})
            raise

    def _unwrap(
        self,
        scope: str,
        purpose: str,
        version: int,
        kek_id: str,
        kek_version: int,
        wrapped: bytes,
        obj: str | None = None,
    ) -> bytes:
        try:
            return self.provider.unwrap(
                WrappedKey(kek_id, kek_version, bytes(wrapped)),
                self._context(scope, purpose, version),
            )
        except KeyError_ as exc:
            self._audit_failure(
                "unwrap",
                scope,
                version,
                "failed",
                {"purpose": purpose, "kek_version": kek_version, "error": str(exc), "obj": obj},
            )
            raise exc.naming(obj) from None

    def _insert_key(
        self, conn: psycopg.Connection, scope: str, purpose: str, version: int, wrapped: WrappedKey
    ) -> bool:
        row = conn.execute(
            "INSERT INTO keys.data_key (scope, purpose, version, kek_id, kek_version, wrapped) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING version",
            (scope, purpose, version, wrapped.key_id, wrapped.version, wrapped.blob),
        ).fetchone()
        return row is not None

    def _remember(self, scope: str, purpose: str, key: DataKey) -> _Cached:
        cached = _Cached(key, AESGCM(key.key), time.monotonic())
        self._keys[(scope, purpose, key.version)] = cached
        return cached

    def _current_cached(self, scope: str, purpose: str) -> _Cached:
        entry = self._current.get((scope, purpose))
        if entry is not None and time.monotonic() - entry[1] < RECHECK_SECONDS:
            cached = self._keys.get((scope, purpose, entry[0]))
            if cached is not None:
                return cached
        _check_scope(scope)
        with self._lock:
            with self._connect() as conn:
                row = conn.execute(
                    "SELECT version FROM keys.data_key "
                    "WHERE scope = %s AND purpose = %s AND state = 'current'",
                    (scope, purpose),
                ).fetchone()
                if row is None:
                    created = self._create(conn, scope, purpose)
                    if created is not None:
                        self._current[(scope, purpose)] = (1, time.monotonic())
                        return created
                    row = (1,)  # another process created it first
            self._current[(scope, purpose)] = (row[0], time.monotonic())
            return self._cached(scope, purpose, row[0])

    def _create(self, conn: psycopg.Connection, scope: str, purpose: str) -> _Cached | None:
        """Version 1 of a scope's key; None when another process created it first."""
        store = scope.split("/", 1)[0]
        material = os.urandom(32)
        wrapped = self._wrap(store, scope, purpose, 1, material, "create")
        with conn.transaction():
            if not self._insert_key(conn, scope, purpose, 1, wrapped):
                return None
            self._audit(
                conn, "create", scope, 1, "ok", {"purpose": purpose, "kek_version": wrapped.version}
            )
        return self._remember(scope, purpose, DataKey(scope, 1, material, wrapped.version))

    def _cached(self, scope: str, purpose: str, version: int, *, obj: str | None = None) -> _Cached:
        cached = self._keys.get((scope, purpose, version))
        if cached is not None and time.monotonic() - cached.checked < RECHECK_SECONDS:
            return cached
        with self._lock, self._connect() as conn:
            row = conn.execute(
                "SELECT state, kek_id, kek_version, wrapped FROM keys.data_key "
                "WHERE scope = %s AND purpose = %s AND version = %s",
                (scope, purpose, version),
            ).fetchone()
            name = f"{scope} v{version}"
            if row is None or row[0] == "retired":
                self._keys.pop((scope, purpose, version), None)
                detail = {"purpose": purpose, "obj": obj}
                if row is None:
                    self._audit(
                        conn, "unwrap", scope, version, "refused", detail | {"error": "unknown"}
                    )
                    raise UnknownKeyVersion(
                        "no such data key version in this platform", key=name, obj=obj
                    )
                self._audit(
                    conn, "unwrap", scope, version, "refused", detail | {"error": "retired"}
                )
                raise KeyUnavailable("the data key version was retired", key=name, obj=obj)
            if cached is not None:  # still valid: only its state needed reading
                cached.checked = time.monotonic()
                return cached
            _, kek_id, kek_version, wrapped = row
            material = self._unwrap(scope, purpose, version, kek_id, kek_version, wrapped, obj)
            self._audit(
                conn,
                "unwrap",
                scope,
                version,
                "ok",
                {"purpose": purpose, "kek_version": kek_version},
            )
        return self._remember(scope, purpose, DataKey(scope, version, material, kek_version))


@dataclass
class _SubjectKey:
    key: bytes = field(repr=False)
    version: int
    checked: float
    _aead: AESGCM | None = field(default=None, repr=False)

    @property
    def aead(self) -> AESGCM:
        # Made on first use: ensure() of 100k subjects needs none of them.
        if self._aead is None:
            self._aead = AESGCM(self.key)
        return self._aead


class SubjectKeys:
    """Crypto-shredding: one data key per data subject (scope ``subjects/<id>``). Destroying it
    (``shred``) makes every copy of that subject's encrypted fields unreadable at once (lake files,
    warehouse history, backups), while everyone else's stay readable."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self._keys = envelope._subject_cache
        self._lock = envelope._subject_lock

    # -- values ------------------------------------------------------------------------------------
    def encrypt(self, subject_id: int, plaintext: bytes, *, aad: bytes = b"") -> bytes:
        key = self._load([subject_id], create=True)[subject_id]
        return _seal(key.aead, _header(_subject_scope(subject_id), key.version), plaintext, aad)

    def encrypt_many(
        self, subject_ids: Sequence[int], values: Sequence[bytes | None], *, aad: bytes = b""
    ) -> list[bytes | None]:
        if len(subject_ids) != len(values):
            raise ValueError(f"{len(subject_ids)} subject ids for {len(values)} values")
        keys = self._load(
            {s for s, v in zip(subject_ids, values, strict=True) if v is not None}, True
        )
        return [
            None
            if v is None
            else _seal(keys[s].aead, _header(_subject_scope(s), keys[s].version), v, aad)
            for s, v in zip(subject_ids, values, strict=True)
        ]

    def decrypt(self, ciphertext: bytes, *, aad: bytes = b"", obj: str | None = None) -> bytes:
        ciphertext = bytes(ciphertext)
        scope, version, at = _parse(ciphertext)
        match = SUBJECT_SCOPE.match(scope)
        if match is None:
            raise TamperedCiphertext(f"not a subject's ciphertext (scope {scope})", obj=obj)
        key = self._load([int(match[1])], create=False, obj=obj)[int(match[1])]
        if key.version != version:
            raise UnknownKeyVersion(
                "no such subject key version", key=f"{scope} v{version}", obj=obj
            )
        try:
            return key.aead.decrypt(
                ciphertext[at : at + NONCE_BYTES],
                ciphertext[at + NONCE_BYTES :],
                ciphertext[:at] + aad,
            )
        except InvalidTag:
            self.envelope._audit_failure(
                "decrypt", scope, version, "refused", {"error": "tag", "obj": obj}
            )
            raise TamperedCiphertext(
                "the ciphertext does not authenticate (altered, or moved from another field)",
                key=f"{scope} v{version}",
                obj=obj,
            ) from None

    def decrypt_many(
        self, values: Sequence[bytes | None], *, aad: bytes = b""
    ) -> list[bytes | None]:
        """Like decrypt, loading the subjects' keys in one query first."""
        ids = set()
        for v in values:
            if v is not None:
                match = SUBJECT_SCOPE.match(_parse(bytes(v))[0])
                if match:
                    ids.add(int(match[1]))
        self._load(ids, create=False, missing_ok=True, shredded_ok=True)
        return [None if v is None else self.decrypt(v, aad=aad) for v in values]

    # -- keys --------------------------------------------------------------------------------------
    def ensure(self, subject_ids: Iterable[int]) -> None:
        """Create the missing keys in one batch (shredded subjects get none: their erasure holds)."""
        self._load(subject_ids, create=True, missing_ok=True, shredded_ok=True)

    def shred(self, subject_id: int, *, reason: str) -> bool:
        """Destroy a subject's key (audited, idempotent). True if a key was destroyed now."""
        if not reason.strip():
            raise ValueError(f"shredding subject {subject_id}: a reason is required (audit)")
        scope = _subject_scope(subject_id)
        with self._lock, self.envelope._connect() as conn, conn.transaction():
            row = conn.execute(
                "SELECT shredded_at FROM keys.subject_key WHERE subject_id = %s FOR UPDATE",
                (subject_id,),
            ).fetchone()
            if row is None:  # a tombstone: no key is ever created for this subject
                conn.execute(
                    "INSERT INTO keys.subject_key (subject_id, shredded_at) "
                    "VALUES (%s, clock_timestamp())",
                    (subject_id,),
                )
            elif row[0] is None:
                conn.execute(
                    "UPDATE keys.subject_key SET wrapped = NULL, wrap_version = NULL, "
                    "shredded_at = clock_timestamp() WHERE subject_id = %s",
                    (subject_id,),
                )
            destroyed = row is not None and row[0] is None
            self.envelope._audit(
                conn, "shred", scope, None, "ok", {"reason": reason, "destroyed": destroyed}
            )
            self._keys.pop(subject_id, None)
        return destroyed

    def is_shredded(self, subject_id: int) -> bool:
        with self.envelope._connect() as conn:
            row = conn.execute(
                "SELECT shredded_at IS NOT NULL FROM keys.subject_key WHERE subject_id = %s",
                (subject_id,),
            ).fetchone()
        return bool(row and row[0])

    def counts(self) -> tuple[int, int]:
        """(live, shredded) subject keys."""
        with self.envelope._connect() as conn:
            return conn.execute(
                "SELECT count(*) FILTER (WHERE shredded_at IS NULL), "
                "count(*) FILTER (WHERE shredded_at IS NOT NULL) FROM keys.subject_key"
            ).fetchone()

    # -- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _aad(subject_id: int, version: int) -> bytes:
        # Bound to the wrapped subject key: a blob moved to another subject's row is refused.
        return b"subjects/%d:%d" % (subject_id, version)

    def _load(
        self,
        subject_ids: Iterable[int],
        create: bool,
        *,
        obj: str | None = None,
        missing_ok: bool = False,
        shredded_ok: bool = False,
    ) -> dict[int, _SubjectKey]:
        """The keys of ``subject_ids`` from the cache, else the database (one query), creating the
        missing ones when ``create``. KeyShredded / UnknownKeyVersion name the first subject
        without a key, unless told to skip them."""
        now = time.monotonic()
        found: dict[int, _SubjectKey] = {}
        wanted = []
        for s in subject_ids:
            s = int(s)
            key = self._keys.get(s)
            if key is not None and now - key.checked < RECHECK_SECONDS:
                found[s] = key
            elif s >= 0:
                wanted.append(s)
            else:
                raise ValueError(f"subject id {s}: expected a non-negative integer")
        if not wanted:
            return found
        wanted = sorted(set(wanted))
        with self._lock, self.envelope._connect() as conn, conn.transaction():
            if create:  # one creator at a time: the check and the COPY see the same rows
                conn.execute("LOCK TABLE keys.subject_key IN SHARE ROW EXCLUSIVE MODE")
            rows = conn.execute(
                "SELECT subject_id, version, wrap_version, wrapped, shredded_at "
                "FROM keys.subject_key JOIN unnest(%s::bigint[]) wanted (id) ON id = subject_id",
                # An array literal: psycopg's list adaptation costs ~0.2 s for 100k ids.
                ("{" + ",".join(map(str, wanted)) + "}",),
            ).fetchall()
            shredded = {}
            for subject_id, version, wrap_version, wrapped, shredded_at in rows:
                if shredded_at is not None:
                    shredded[subject_id] = shredded_at
                    continue
                wrap = self.envelope._cached(WRAP_SCOPE, "encrypt", wrap_version)
                try:
                    material = wrap.aead.decrypt(
                        wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], self._aad(subject_id, version)
                    )
                except InvalidTag:
                    self.envelope._audit(
                        conn, "unwrap", _subject_scope(subject_id), version, "failed", {"obj": obj}
                    )
                    raise TamperedCiphertext(
                        "the wrapped subject key does not authenticate (altered, or moved from "
                        "another subject)",
                        key=_subject_scope(subject_id),
                        obj=obj,
                    ) from None
                found[subject_id] = self._keys[subject_id] = _SubjectKey(material, version, now)
            missing = [s for s in wanted if s not in found and s not in shredded]
            if create and missing:
                found.update(self._create(conn, missing, now))
                missing = []
        if shredded and not shredded_ok:
            first = min(shredded)
            raise KeyShredded(
                f"data subject {first}'s key was destroyed on {shredded[first]:%Y-%m-%d %H:%M} "
                "(crypto-shredding): their data is unreadable for good",
                key=_subject_scope(first),
                obj=obj,
            )
        if missing and not missing_ok:
            raise UnknownKeyVersion(
                f"no key for data subject {missing[0]}", key=_subject_scope(missing[0]), obj=obj
            )
        return found

    def _create(
        self, conn: psycopg.Connection, subject_ids: list[int], now: float
    ) -> dict[int, _SubjectKey]:
        wrap = self.envelope._current_cached(WRAP_SCOPE, "encrypt")
        material = os.urandom(32 * len(subject_ids))
        nonces = os.urandom(NONCE_BYTES * len(subject_ids))
        # COPY in binary, built at once: write_row costs more a row than all the rest.
        created, parts = {}, [COPY_BINARY_HEADER]
        seal, wrap_version = wrap.aead.encrypt, wrap.key.version
        for i, s in enumerate(subject_ids):
            key = material[32 * i : 32 * (i + 1)]
            nonce = nonces[NONCE_BYTES * i : NONCE_BYTES * (i + 1)]
            wrapped = nonce + seal(nonce, key, b"subjects/%d:1" % s)  # as _aad(s, 1)
            parts.append(_SUBJECT_ROW.pack(3, 8, s, 4, wrap_version, len(wrapped)) + wrapped)
            created[s] = _SubjectKey(key, 1, now)
        parts.append(COPY_BINARY_TRAILER)
        with conn.cursor().copy(
            "COPY keys.subject_key (subject_id, wrap_version, wrapped) FROM STDIN (FORMAT binary)"
        ) as copy:
            copy.write(b"".join(parts))
        self.envelope._audit(
            conn,
            "create_subject_keys",
            "subjects",
            wrap.key.version,
            "ok",
            {"count": len(subject_ids), "first": subject_ids[0], "last": subject_ids[-1]},
        )
        self._keys.update(created)
        return created


# PostgreSQL's binary COPY: signature, flags, header extension; a row is its field count then each
# field's length and bytes (subject_id int8, wrap_version int4, wrapped bytea); -1 ends the data.
COPY_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_BINARY_TRAILER = struct.pack(">h", -1)
_SUBJECT_ROW = struct.Struct(">hiqiii")


def _subject_scope(subject_id: int) -> str:
    return f"subjects/{int(subject_id)}"


def _connect(settings: Settings) -> psycopg.Connection:
    # Unkeyed (and imported here): a keyed connection of oltp.db asks this module for its keys.
    from stripe_platform.oltp import db

    return db.connect(settings, with_key=False, autocommit=True)


def _check_schema(conn: psycopg.Connection) -> None:
    (present,) = conn.execute("SELECT to_regclass('keys.key_event') IS NOT NULL").fetchone()
    if not present:
        database = conn.info.dbname
        conn.close()
        raise KeyUnavailable(
            f"database {database} has no keys schema (migration 0012): "
            "run `stripe-platform db migrate`"
        )


_shared: dict[tuple, Envelope] = {}
_shared_lock = threading.Lock()


def shared_envelope(settings: Settings) -> Envelope:
    """One Envelope (one key cache) a process for the same database and key provider: keyed
    connections, writers and readers share their unwrapped keys instead of each unwrapping them."""
    identity = (
        settings.profile,
        str(settings.home_dir),
        settings.pg_dsn.get_secret_value() if settings.pg_dsn else None,
        settings.pg_database,
        settings.key_backend,
        settings.kms_endpoint_url,
        settings.kms_region,
        settings.kms_key_alias_prefix,
    )
    with _shared_lock:
        if identity not in _shared:
            _shared[identity] = Envelope(settings)
        return _shared[identity]


def audit_log(
    settings: Settings, *, since: dt.datetime | None = None, limit: int | None = None
) -> list[KeyAuditRecord]:
    """The key events since ``since`` (the last ``limit`` of them), oldest first."""
    with _connect(settings) as conn:
        _check_schema(conn)
        rows = conn.execute(
            "SELECT * FROM (SELECT id, at, actor, db_user, host(source_address), operation, scope, "
            "version, outcome, detail FROM keys.key_event WHERE %(since)s::timestamptz IS NULL "
            "OR at >= %(since)s ORDER BY id DESC LIMIT %(limit)s) last ORDER BY id",
            {"since": since, "limit": limit},
        ).fetchall()
    return [KeyAuditRecord(*row) for row in rows]
