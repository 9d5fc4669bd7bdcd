"""Encryption at rest of the raw layer: the lake's files and the warehouses' raw tables (issue 20).

What: every value of a catalog-PROTECTED field (classes pci, pii, credential) of a raw stream is
AES-256-GCM ciphertext (``security.envelope``'s format, naming its key and version), written once
in the path the lake and every warehouse share (``rawlayer.prepare``, through the stream's
:class:`RawProtector`), so both hold the same ciphertext. A field whose stream names its data
subject (the catalog entry's ``subject``: ``Customer.id``, ``Address.customerid``, a document's
``oltp_id``) is encrypted under that subject's own key (``SubjectKeys``, scope
``subjects/<customer id>``); one without uses the stream's data key (scope ``lake/<dataset>``).

Why values and not files: Parquet modular encryption keys whole columns of a file, and DuckDB,
Snowflake external tables and Athena cannot read pyarrow's KMS-wrapped files (ARCHITECTURE §7), so
the lake would stop being the plain Parquet every engine reads; and one key per file or column
cannot erase one customer. S3 server-side encryption with the KMS key (``lake.encryption``) covers
whole objects on prod, but the server decrypts them for anyone the bucket lets read, so it proves
nothing about a stolen credential or a backup copy, and it cannot erase a customer either.

Crypto-shredding: destroying a subject's key (``SubjectKeys.shred``) leaves their values in every
lake file, every superseded generation, every copy and every warehouse raw row unreadable at once.
A shredded subject's key is never created again here: a row of theirs that still arrives has its
protected values nulled (recorded as ``SUBJECT_KEY_SHREDDED`` in ``_airbyte_meta``), never written
in clear. Values that are already ciphertext of the source store (pgcrypto's bytea, the documents'
field encryption) are wrapped again: the source store's table key must not be able to undo a
shredding.

Erased subjects' rows still arriving: a PostgreSQL stream's changes carry every version of a row
(the WAL), so the versions an erasure wrote on its way (a transaction unlinked from a deleted
card, then stripped of its IP address) reach the raw layer after the privacy request's own
downstream steps ran. Such a row of a shredded subject also has its subject-bound fields that are
kept in clear (pii_quasi: IP address, user name, postal code...) nulled, recorded the same way:
nothing of an erased subject lands readable, whatever the order of syncs and erasures. (Streams
whose subject is a document id, not the customer id, are read whole from the documents, which the
erasure deleted: nothing of theirs arrives again.)

Turned off by ``settings.encrypt_at_rest = False`` (the bench's comparison only).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.governance.classification import PROTECTED, Catalog, load_catalog
from stripe_platform.rawlayer import (
    Column,
    RawStream,
    RawWriter,
    SchemaChangeError,
    WriteResult,
)
from stripe_platform.security.envelope import Envelope, SubjectKeys
from stripe_platform.security.keys import KeyShredded

SUBJECT_SCOPE = "subjects/"
STREAM_SCOPE = "lake/"  # the lake store's KEK wraps the data keys of subject-less fields


class RawEncryptionError(PlatformError, RuntimeError):
    """The catalog's declaration for a raw stream cannot be applied; the message names it."""


@dataclass(frozen=True)
class ProtectedField:
    column: str
    data_class: str
    subject: str | None  # the stream's column holding the data subject's id; None: no subject


def qualified(source: str, dataset: str) -> str:
    """A raw stream's source dataset as keys and ciphertexts name it: ``postgres.customer``."""
    return f"{source}.{dataset}".lower()


def aad(source: str, dataset: str, column: str) -> bytes:
    """What each raw ciphertext is bound to: its source, dataset and field, the same in the lake
    and every warehouse (a value copied into another column or stream does not decrypt)."""
    return f"raw/{qualified(source, dataset)}.{column.lower()}".encode()


def stream_scope(source: str, dataset: str) -> str:
    """The data key of a stream's fields that name no subject."""
    return f"{STREAM_SCOPE}{qualified(source, dataset)}"


def protected_fields(store: str, catalog: Catalog | None = None) -> dict[str, list[ProtectedField]]:
    """The catalog's PROTECTED columns of each raw stream of ``store`` ("lake" or
    "warehouse_raw"), by stream as the store names it (``<namespace>.<stream>``, which is how the
    catalog names its raw and lake datasets)."""
    found: dict[str, list[ProtectedField]] = {}
    for e in (catalog or load_catalog()).protected(store):  # type: ignore[arg-type]
        found.setdefault(e.dataset, []).append(
            ProtectedField(e.field, str(e.data_class), e.subject)
        )
    return found


def erased_in_clear(store: str, catalog: Catalog | None = None) -> dict[str, list[ProtectedField]]:
    """The catalog's RESTRICTED columns kept in clear (pii_quasi) of each raw stream of ``store``
    that names its data subject: nulled in rows of a shredded subject (see the module's doc)."""
    found: dict[str, list[ProtectedField]] = {}
    for e in (catalog or load_catalog()).restricted(store):  # type: ignore[arg-type]
        if e.data_class not in PROTECTED and e.subject is not None:
            found.setdefault(e.dataset, []).append(
                ProtectedField(e.field, str(e.data_class), e.subject)
            )
    return found


class RawProtector:
    """``rawlayer.Protector`` of one stream: encrypts its protected columns batch by batch.

    Per batch: one ``SubjectKeys.ensure`` for the batch's subjects (keys created in bulk), then
    one ``encrypt_many`` per column (AES-GCM per value, keys cached in process)."""

    def __init__(
        self,
        source: str,
        dataset: str,
        fields: Sequence[ProtectedField],
        envelope: Envelope,
        subjects: SubjectKeys,
        ensure_lock: threading.Lock,
        in_clear: Sequence[ProtectedField] = (),
    ) -> None:
        self.source, self.dataset = source, dataset
        self.scope = stream_scope(source, dataset)
        self.fields = tuple(fields)
        self.in_clear = tuple(in_clear)  # nulled for shredded subjects, else left as they are
        self.columns = frozenset(f.column for f in fields)
        self.envelope, self.subjects = envelope, subjects
        self._ensure_lock = ensure_lock  # the lake writes batches in parallel threads

    def encrypt(
        self, arrays: dict[str, pa.Array | pa.ChunkedArray]
    ) -> tuple[dict[str, pa.Array], dict[str, list[int]]]:
        out: dict[str, pa.Array] = {}
        refused: dict[str, list[int]] = {}
        shredded_rows: dict[str, np.ndarray] = {}
        for f in self.fields:
            values = arrays[f.column]
            if values.null_count == len(values):  # deletions, a column the source lacks
                out[f.column] = pa.nulls(len(values), pa.binary())
                continue
            plain = values.to_pylist()
            scope_aad = aad(self.source, self.dataset, f.column)
            if f.subject is None:
                encrypted = self.envelope.encrypt_many(self.scope, plain, aad=scope_aad)
            else:
                if f.subject not in shredded_rows:
                    shredded_rows[f.subject] = self._shredded_rows(arrays[f.subject])
                encrypted, refused[f.column] = self._by_subject(
                    arrays[f.subject], plain, shredded_rows[f.subject], scope_aad
                )
            out[f.column] = pa.array(encrypted, pa.binary())
        for f in self.in_clear:
            if f.subject not in shredded_rows:
                shredded_rows[f.subject] = self._shredded_rows(arrays[f.subject])
            erased = shredded_rows[f.subject]
            values = arrays[f.column]
            if not erased.any() or values.null_count == len(values):
                continue
            mask = pa.array(erased)
            refused[f.column] = np.flatnonzero(
                erased & pc.is_valid(values).to_numpy(zero_copy_only=False)
            ).tolist()
            out[f.column] = pc.if_else(mask, pa.scalar(None, values.type), values)
        return out, {c: rows for c, rows in refused.items() if rows}

    def _shredded_rows(self, subject_column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Ensure the batch's subjects have keys (one call); the rows whose subject was shredded."""
        ids = pc.unique(subject_column.cast(pa.int64())).drop_null().to_pylist()
        with self._ensure_lock:
            self.subjects.ensure(ids)  # one query; a shredded subject gets no key again
        shredded = self._shredded(ids)
        if not shredded:
            return np.zeros(len(subject_column), dtype=bool)
        mask = pc.is_in(subject_column.cast(pa.int64()), pa.array(sorted(shredded), pa.int64()))
        return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)

    def _shredded(self, ids: list[int]) -> set[int]:
        """The shredded subjects among ``ids`` (their keys were just ensured): sealing an empty
        value under every key is a cache hit each, and names a shredded subject (KeyShredded)
        with one query; rare, as the privacy request deletes the source rows too."""
        shredded: set[int] = set()
        live = list(ids)
        while live:
            try:
                self.subjects.encrypt_many(live, [b""] * len(live))
                return shredded
            except KeyShredded as exc:
                subject = int(str(exc.key).removeprefix(SUBJECT_SCOPE))
                shredded.add(subject)
                live.remove(subject)
        return shredded

    def _by_subject(
        self,
        subject_column: pa.Array | pa.ChunkedArray,
        plain: list[bytes | None],
        shredded: np.ndarray,
        scope_aad: bytes,
    ) -> tuple[list[bytes | None], list[int]]:
        subjects = subject_column.cast(pa.int64()).to_pylist()
        refused = [i for i in np.flatnonzero(shredded).tolist() if plain[i] is not None]
        for i in refused:
            plain[i] = None
        # A row without a subject (a document not linked to a customer) under the stream's key.
        orphans = [i for i, s in enumerate(subjects) if s is None and plain[i] is not None]
        keyed = [i for i, s in enumerate(subjects) if s is not None and not shredded[i]]
        out: list[bytes | None] = [None] * len(plain)
        if keyed:
            encrypted = self.subjects.encrypt_many(
                [subjects[i] for i in keyed], [plain[i] for i in keyed], aad=scope_aad
            )
            for i, value in zip(keyed, encrypted, strict=True):
                out[i] = value
        if orphans:
            encrypted = self.envelope.encrypt_many(
                self.scope, [plain[i] for i in orphans], aad=scope_aad
            )
            for i, value in zip(orphans, encrypted, strict=True):
                out[i] = value
        return out, refused


def protect(
    stream: RawStream,
    source: str,
    dataset: str,
    fields: Sequence[ProtectedField],
    envelope: Envelope,
    subjects: SubjectKeys,
    ensure_lock: threading.Lock | None = None,
    in_clear: Sequence[ProtectedField] = (),
) -> RawStream:
    """``stream`` with its protected columns typed ``binary`` and the protector that fills them
    (and nulls ``in_clear`` fields of shredded subjects' rows)."""
    names = {c.name for c in stream.columns}
    # Only subjects named by an integer column (the customer id) can be checked for shredding.
    integer = {c.name for c in stream.columns if c.type == "integer"}
    in_clear = [f for f in in_clear if f.column in names and f.subject in integer]
    if not fields and not in_clear:
        return stream
    for f in fields:
        if f.column not in names:
            raise RawEncryptionError(
                f"catalog: protected field {dataset}.{f.column} is not a column of raw stream "
                f"{stream.key}"
            )
        if f.subject is not None and f.subject not in names:
            raise RawEncryptionError(
                f"catalog: {dataset}.{f.column} names its data subject in {f.subject!r}, which raw "
                f"stream {stream.key} does not carry: its values could not be erased per customer"
            )
    protected = {f.column for f in fields}
    columns = tuple(Column(c.name, "binary") if c.name in protected else c for c in stream.columns)
    protector = RawProtector(
        source, dataset, fields, envelope, subjects, ensure_lock or threading.Lock(), in_clear
    )
    return dataclasses.replace(stream, columns=columns, protector=protector)


class ProtectedWriter:
    """A ``rawlayer.RawWriter`` that hands its writer each stream with its protection attached
    (``protect``); everything else passes through. The sync engine wraps its writer in it when
    ``encrypt_at_rest`` is on, so the lake and every warehouse get the same ciphertext.

    A destination that synced a stream before its protected columns were encrypted holds them in
    clear (a column already binary, PostgreSQL's bytea, would not show it by its type): on first
    use the writer compares the columns the destination records as encrypted (state key
    ``encryption:<connection>``) with the catalog's and refuses (SchemaChangeError, naming the
    remedy) if the destination has synced the connection without them; a destination that never
    synced it is recorded as encrypted from the start."""

    def __init__(
        self,
        writer: RawWriter,
        settings: Settings,
        *,
        store: str,
        source: str,
        namespace: str,
        datasets: dict[str, str],
        connection_state_key: str,
        envelope: Envelope | None = None,
    ) -> None:
        """``datasets``: raw stream name -> its source dataset (table or collection);
        ``namespace`` the raw streams' and ``connection_state_key`` where the destination keeps
        the connection's own state."""
        self.writer = writer
        self.concurrent_writes = writer.concurrent_writes
        self.store = store
        self.source = source
        self.namespace = namespace
        self.datasets = datasets
        self.connection_state_key = connection_state_key
        self._settings = settings
        self._envelope = envelope
        self._subjects: SubjectKeys | None = None
        self._lock = threading.Lock()
        self._ensure_lock = threading.Lock()
        self._fields: dict[str, list[ProtectedField]] | None = None
        self._in_clear: dict[str, list[ProtectedField]] = {}
        self._streams: dict[tuple[str, tuple[Column, ...]], RawStream] = {}

    def _keys(self) -> tuple[Envelope, SubjectKeys]:
        if self._envelope is None:
            self._envelope = Envelope(self._settings)
        if self._subjects is None:
            self._subjects = SubjectKeys(self._envelope)
        return self._envelope, self._subjects

    def _ready(self) -> dict[str, list[ProtectedField]]:
        """Each raw stream's protected fields, checked against the destination once."""
        with self._lock:
            if self._fields is None:
                catalog = load_catalog()  # read once a sync
                by_stream = protected_fields(self.store, catalog)
                fields = {
                    name: by_stream.get(f"{self.namespace}.{name}", []) for name in self.datasets
                }
                in_clear = erased_in_clear(self.store, catalog)
                self._in_clear = {
                    name: in_clear.get(f"{self.namespace}.{name}", []) for name in self.datasets
                }
                self._check_destination({n: [f.column for f in fs] for n, fs in fields.items()})
                self._fields = fields
            return self._fields

    def _check_destination(self, columns: dict[str, list[str]]) -> None:
        key = f"encryption:{self.connection_state_key}"
        marked = (self.writer.load_state(key) or {}).get("streams", {})
        missing = {
            name: sorted(set(cols) - set(marked.get(name, [])))
            for name, cols in columns.items()
            if set(cols) - set(marked.get(name, []))
        }
        if not missing:
            return
        synced = self.writer.load_state(self.connection_state_key) is not None or any(
            self.writer.state(RawStream(self.namespace, name, ())) is not None
            for name in self.datasets
        )
        if synced:
            listed = "; ".join(f"{n}: {', '.join(c)}" for n, c in sorted(missing.items()))
            raise SchemaChangeError(
                f"{self.connection_state_key}: columns are encrypted at rest now that this "
                f"destination synced without encryption ({listed}); its rows hold them in clear. "
                "Drop the streams' raw tables and sync state (the lake: their raw/ and "
                "superseded/ prefixes and state files) and sync again"
            )
        recorded = {n: sorted(set(c) | set(marked.get(n, []))) for n, c in columns.items() if c}
        self.writer.save_state(key, {"streams": recorded})

    def stream(self, stream: RawStream) -> RawStream:
        """``stream`` as it is stored: protected columns binary, with its protector."""
        fields = self._ready().get(stream.name) or []
        in_clear = self._in_clear.get(stream.name) or []
        if not fields and not in_clear:
            return stream
        cache_key = (stream.key, stream.columns)
        with self._lock:
            if cache_key not in self._streams:
                dataset = self.datasets[stream.name]
                envelope, subjects = self._keys()
                self._streams[cache_key] = protect(
                    stream,
                    self.source,
                    dataset,
                    fields,
                    envelope,
                    subjects,
                    self._ensure_lock,
                    in_clear,
                )
            return self._streams[cache_key]

    def ensure(self, stream: RawStream) -> list[str]:
        protected = self.stream(stream)
        try:
            return self.writer.ensure(protected)
        except SchemaChangeError as exc:
            raise _explained(exc, protected) from exc

    def begin_snapshot(self, stream: RawStream, generation_id: int) -> None:
        protected = self.stream(stream)
        try:
            self.writer.begin_snapshot(protected, generation_id)
        except SchemaChangeError as exc:
            raise _explained(exc, protected) from exc

    def write(
        self,
        stream: RawStream,
        batch: pa.Table,
        *,
        sync_id: str,
        generation_id: int,
        state: dict[str, Any] | None,
    ) -> WriteResult:
        protected = self.stream(stream)
        try:
            return self.writer.write(
                protected, batch, sync_id=sync_id, generation_id=generation_id, state=state
            )
        except SchemaChangeError as exc:
            raise _explained(exc, protected) from exc

    def finish_overwrite(
        self, stream: RawStream, generation_id: int, state: dict[str, Any] | None
    ) -> int:
        return self.writer.finish_overwrite(self.stream(stream), generation_id, state)

    def state(self, stream: RawStream) -> dict[str, Any] | None:
        return self.writer.state(self.stream(stream))

    def load_state(self, key: str) -> dict[str, Any] | None:
        self._ready()
        return self.writer.load_state(key)

    def save_state(self, key: str, state: dict[str, Any]) -> None:
        self._ready()
        self.writer.save_state(key, state)


def _explained(exc: SchemaChangeError, stream: RawStream) -> SchemaChangeError:
    """A protected column the destination holds with another type was written before encryption
    at rest: its rows hold the values in clear, and converting them would keep them so."""
    columns = sorted(stream.protector.columns) if stream.protector is not None else []
    hit = [c for c in columns if f"column {c} " in str(exc)]
    if not hit:
        return exc
    return SchemaChangeError(
        f"{exc}. Column(s) {', '.join(hit)} are encrypted at rest (binary ciphertext) since "
        "issue 20; this table was synced before and holds them in clear: drop the stream's raw "
        "table and its sync state (or the lake's raw/ and superseded/ prefixes of the stream) and "
        "sync again"
    )


def protected_writer(settings: Settings, writer: RawWriter, connection: Any) -> RawWriter:
    """The writer a sync of ``connection`` (a ``ResolvedConnection``) uses: ``writer`` wrapped in
    :class:`ProtectedWriter` when ``settings.encrypt_at_rest`` is on."""
    if not settings.encrypt_at_rest or isinstance(writer, ProtectedWriter):
        return writer
    prefix = connection.connection.prefix or ""
    return ProtectedWriter(
        writer,
        settings,
        store="lake" if connection.to_lake else "warehouse_raw",
        source=connection.source.kind,
        namespace=connection.connection.namespace.lower(),
        datasets={f"{prefix}{s.name}".lower(): s.name for s in connection.streams},
        connection_state_key=connection.state_key,
    )


def decrypt_column(
    envelope: Envelope,
    source: str,
    dataset: str,
    column: str,
    values: Iterable[bytes | None],
    *,
    subjects: SubjectKeys | None = None,
) -> list[bytes | None]:
    """A raw column's values in clear, for readers that hold the keys (privacy access requests):
    ``source`` "postgres" or "mongodb", ``dataset`` the source table or collection; the bytes
    the source held (a PostgreSQL bytea still pgcrypto's ciphertext). Raises
    ``KeyShredded`` for a value of a shredded subject, ``TamperedCiphertext`` for one that is not
    ours or was altered."""
    subjects = subjects or SubjectKeys(envelope)
    bound = aad(source, dataset, column)
    out: list[bytes | None] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        scope, _ = Envelope.key_ref(value)
        if scope.startswith(SUBJECT_SCOPE):
            out.append(subjects.decrypt(value, aad=bound, obj=bound.decode()))
        else:
            out.append(envelope.decrypt(value, aad=bound, obj=bound.decode()))
    return out


__all__ = [
    "KeyShredded",
    "ProtectedField",
    "ProtectedWriter",
    "RawEncryptionError",
    "RawProtector",
    "aad",
    "decrypt_column",
    "erased_in_clear",
    "protect",
    "protected_fields",
    "protected_writer",
    "qualified",
    "stream_scope",
]
