"""The raw layer's contract: what every raw writer and the sync engine share.

The raw tables follow Airbyte's Destinations V2 layout (ARCHITECTURE §4), so dbt reads the same
shape whether Airbyte or the embedded engine loaded them. A stream (:class:`RawStream`) lands in
``<namespace>.<stream>`` with its typed columns (:class:`Column`, a source-neutral type of
``ARROW``) plus Airbyte's metadata columns (``_airbyte_raw_id``, ``_airbyte_extracted_at``,
``_airbyte_meta``, ``_airbyte_generation_id``, and for CDC streams ``_ab_cdc_lsn``/``_ab_cdc_cursor``,
``_ab_cdc_updated_at``, ``_ab_cdc_deleted_at``). :func:`prepare` types a batch and adds those
columns the same way for every writer: a value that does not fit its column is nulled and recorded
in ``_airbyte_meta.changes`` rather than failing the sync.

A writer (:class:`RawWriter`: ``warehouse/duckdb.py``, ``warehouse/postgres.py``,
``warehouse/snowflake.py``, ``lake/target.py``) commits a batch with the sync state that covers it,
so the state (LSN, cursor, resume token) is never ahead of its data. Deduplicated streams keep one
row per primary key, the latest by LSN/cursor, and keep deletions as tombstones
(``_ab_cdc_deleted_at``) for the staging models to drop (the lake keeps every version; its readers
pick the latest). A column may change type along ``WIDENINGS``; any other change raises
:class:`SchemaChangeError` and stops that stream. tests/test_raw_layer.py holds every writer to this.

Encryption at rest (issue 20): a stream may carry a :class:`Protector`
(``security/subjects_layer.py`` attaches it); :func:`prepare` then hands it the typed batch and
stores what it returns, so the lake's files and every warehouse's raw rows hold the same ciphertext.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Mode = Literal["append", "append_dedup", "overwrite"]
CDC = Literal["postgres", "mongodb"]

# Source-neutral column types and their Arrow types (each warehouse writer maps them to its SQL
# types: DUCKDB, POSTGRES, SNOWFLAKE in warehouse/).
ARROW = {
    "integer": pa.int64(),
    "number": pa.float64(),
    "decimal": pa.decimal128(38, 9),
    "string": pa.string(),
    "boolean": pa.bool_(),
    "timestamp_tz": pa.timestamp("us", tz="UTC"),
    "timestamp": pa.timestamp("us"),
    "date": pa.date32(),
    "json": pa.string(),
    "binary": pa.binary(),
}
# Changes a destination column may take without losing data; anything else is incompatible.
WIDENINGS = {
    ("integer", "number"),
    ("integer", "decimal"),
    ("decimal", "number"),
    ("date", "timestamp"),
    ("date", "timestamp_tz"),
    ("timestamp", "timestamp_tz"),
}
WIDENINGS |= {(t, "string") for t in ARROW if t not in ("string", "binary")}
WIDENINGS |= {("json", "string"), ("string", "json")}

STATE_TABLE = "airbyte_internal.stripe_platform_sync_state"

# Dates and timestamps every destination holds alike: years 1 to 9999. DuckDB and PostgreSQL hold
# more, but Snowflake recommends years up to 9999 (and warns about years before 1582), the lake's
# readers (Spark, Athena) and Python's datetime stop there, and PostgreSQL's writer reads years as
# text. A value outside (a BC date, year 10000 on) is nulled and recorded like any value that does
# not fit; the sources' ±infinity land on these bounds.
FIRST_TIMESTAMP_US = -62_135_596_800_000_000  # 0001-01-01 00:00:00, microseconds since 1970
LAST_TIMESTAMP_US = 253_402_300_799_999_999  # 9999-12-31 23:59:59.999999
FIRST_DATE_DAYS = -719_162  # 0001-01-01, days since 1970
LAST_DATE_DAYS = 2_932_896  # 9999-12-31
# A batch column a source may add: per row, a JSON list of its own ``_airbyte_meta.changes``
# entries (a document's unusable cursor), kept ahead of those the destination adds.
SOURCE_CHANGES = "_source_changes"


class SchemaChangeError(RuntimeError):
    """A source change the destination cannot take without corrupting data; the stream stops."""


class Protector(Protocol):
    """Encrypts a stream's protected columns (``security.subjects_layer.RawProtector``).

    ``encrypt`` gets the batch's typed columns by name (the protected ones ``binary``) and returns
    the encrypted arrays of its ``columns`` and, per column, the rows whose value it could not
    keep and nulled (a data subject whose key was shredded): nothing goes out in clear."""

    columns: frozenset[str]

    def encrypt(
        self, arrays: dict[str, pa.Array | pa.ChunkedArray]
    ) -> tuple[dict[str, pa.Array], dict[str, list[int]]]: ...


@dataclass(frozen=True)
class Column:
    name: str
    type: str

    def __post_init__(self) -> None:
        if self.type not in ARROW:
            raise ValueError(
                f"column {self.name}: unknown type {self.type!r}; known: {', '.join(ARROW)}"
            )


@dataclass(frozen=True)
class RawStream:
    namespace: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()
    cursor: str | None = None
    mode: Mode = "append"
    cdc: CDC | None = None
    # Encryption at rest of the protected columns, applied by prepare(); not part of the identity.
    protector: Protector | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.name}"

    @property
    def meta_columns(self) -> tuple[Column, ...]:
        cols = [
            Column("_airbyte_raw_id", "string"),
            Column("_airbyte_extracted_at", "timestamp_tz"),
            Column("_airbyte_meta", "json"),
            Column("_airbyte_generation_id", "integer"),
        ]
        if self.cdc == "postgres":
            cols.append(Column("_ab_cdc_lsn", "integer"))
        if self.cdc == "mongodb":
            cols.append(Column("_ab_cdc_cursor", "integer"))
        if self.cdc:
            cols += [
                Column("_ab_cdc_updated_at", "timestamp_tz"),
                Column("_ab_cdc_deleted_at", "timestamp_tz"),
            ]
        return tuple(cols)

    @property
    def order_by(self) -> str | None:
        """What "latest" means when deduplicating."""
        if self.cdc == "postgres":
            return "_ab_cdc_lsn"
        if self.cdc == "mongodb":
            return "_ab_cdc_cursor"
        return self.cursor


@dataclass
class WriteResult:
    rows: int
    nulled: dict[str, int] = field(default_factory=dict)  # column -> values that did not fit
    added_columns: list[str] = field(default_factory=list)
    # Columns the stream's previous write had and this one has not (see ``dropped_columns``).
    dropped_columns: list[str] = field(default_factory=list)


class RawWriter(Protocol):
    """What the sync engine calls on a destination: DuckDBRaw, PostgresRaw, SnowflakeRaw
    (warehouse/) and LakeRaw (lake/target.py)."""

    # Whether ``write`` may run in several threads at once (the lake: each batch is a file of its
    # own); the engine then writes a snapshot's batches in parallel.
    concurrent_writes: bool

    def ensure(self, stream: RawStream) -> list[str]:
        """Create the stream's table or evolve it to ``stream``'s columns (adding new ones,
        widening along WIDENINGS, else SchemaChangeError); returns the columns added."""
        ...

    def begin_snapshot(self, stream: RawStream, generation_id: int) -> None:
        """A snapshot of ``stream`` (generation ``generation_id``) starts: its batches follow,
        then ``finish_overwrite``. A writer may load them differently (DuckDB appends into an
        empty table instead of merging); the others have nothing to do."""
        ...

    def write(
        self,
        stream: RawStream,
        batch: pa.Table,
        *,
        sync_id: str,
        generation_id: int,
        state: dict[str, Any] | None,
    ) -> WriteResult:
        """Write one batch and, if given, the stream's state that covers it. The state is never
        saved without its batch: the warehouses commit both in one transaction; the lake saves it
        once the batch's file is durable (a crash in between re-delivers the batch)."""
        ...

    def finish_overwrite(
        self, stream: RawStream, generation_id: int, state: dict[str, Any] | None
    ) -> int:
        """End of a snapshot or full refresh: rows of older generations leave the stream (the
        lake moves them to its history), then the final state, if given, is saved; returns how
        many rows left."""
        ...

    def state(self, stream: RawStream) -> dict[str, Any] | None:
        """The stream's state as its last write or finish left it."""
        ...

    def load_state(self, key: str) -> dict[str, Any] | None:
        """State under any key (a stream's, or a whole connection's such as its CDC position)."""
        ...

    def save_state(self, key: str, state: dict[str, Any]) -> None:
        """Replace the state under ``key`` on its own."""
        ...


def latest_first(stream: RawStream, quote: Callable[[str], str]) -> str:
    """ORDER BY putting a key's latest version first: the later generation (a new snapshot is
    the source's current state even when its LSNs are lower, as after a restore or a failover),
    then the stream's order (LSN, document cursor), then extraction time. ``quote`` turns a
    column name into the destination's identifier."""
    order = [f"{quote('_airbyte_generation_id')} DESC NULLS LAST"]
    if stream.order_by:
        order.append(f"{quote(stream.order_by)} DESC NULLS LAST")
    return ", ".join([*order, f"{quote('_airbyte_extracted_at')} DESC"])


def newer_than_stored(stream: RawStream, quote: Callable[[str], str]) -> str:
    """When a merge's incoming version ``s`` replaces the stored ``t`` of the same key: a later
    generation always, the same one when its LSN/cursor is not lower (a re-delivery replaces
    nothing newer), an earlier one never. Document streams are all generation 0: their cursor
    decides."""
    g = quote("_airbyte_generation_id")
    same = "TRUE"
    if stream.order_by:
        o = quote(stream.order_by)
        same = f"s.{o} >= t.{o} OR t.{o} IS NULL"
    return f"(s.{g} > t.{g} OR t.{g} IS NULL OR (s.{g} = t.{g} AND ({same})))"


def source_columns(stream: RawStream) -> list[str]:
    """The stream's own columns, as each writer records them with the stream's state."""
    return [c.name for c in stream.columns]


def dropped_columns(previous: Iterable[str] | None, stream: RawStream) -> list[str]:
    """Columns the stream's last write had (``previous``, as recorded) and ``stream`` has not:
    dropped at the source, or newly excluded.

    Every writer does what Airbyte's Destinations V2 do with a removed source column: the
    destination keeps the column and the values rows had, rows written from then on (new ones,
    and new versions of a key) hold NULL in it, and the write that first lacks it reports it
    (``WriteResult.dropped_columns``, then the sync report) once."""
    names = {c.name for c in stream.columns}
    return [c for c in previous or () if c not in names]


def kept_columns(existing: Iterable[str], stream: RawStream) -> list[str]:
    """A destination table's columns that ``stream`` no longer writes: NULL in rows it writes."""
    written = {c.name for c in (*stream.columns, *stream.meta_columns)}
    return [c for c in existing if c not in written]


def _out_of_range(
    values: pa.ChunkedArray | pa.Array,
) -> tuple[pa.Array | pa.ChunkedArray, list[int]]:
    """Dates and timestamps outside years 1-9999 nulled, with their positions."""
    if pa.types.is_timestamp(values.type):
        first, last = FIRST_TIMESTAMP_US, LAST_TIMESTAMP_US
        raw = values.cast(pa.int64())  # microseconds (the raw layer's timestamps are all "us")
    elif pa.types.is_date32(values.type):
        first, last = FIRST_DATE_DAYS, LAST_DATE_DAYS
        raw = values.cast(pa.int32())
    else:
        return values, []
    outside = pc.fill_null(pc.or_(pc.less(raw, first), pc.greater(raw, last)), False)
    if not pc.any(outside).as_py():
        return values, []
    bad = np.flatnonzero(outside.to_numpy(zero_copy_only=False)).tolist()
    return pc.if_else(outside, pa.scalar(None, values.type), values), bad


def _cast_column(
    values: pa.ChunkedArray | pa.Array, target: pa.DataType
) -> tuple[pa.Array | pa.ChunkedArray, list[int]]:
    """Cast, nulling (and reporting) each value that does not fit instead of failing the batch:
    a value the cast refuses (numeric NaN into a decimal, ...), and a date or timestamp outside
    years 1-9999 (before the cast too: Python, used value by value below, cannot hold it)."""
    values, outside = _out_of_range(values)
    typed, bad = _cast_values(values, target)
    typed, after = _out_of_range(typed)
    return typed, sorted({*outside, *bad, *after})


def safe_cast(values: pa.ChunkedArray | pa.Array, target: pa.DataType) -> pa.Array:
    """``pc.cast(values, target, safe=True)``, except that decimal text too long for the decimal
    fails rather than landing wrong: Arrow reads a text of 129 digits or more as 0 (PostgreSQL's
    unconstrained numeric writes up to 147,455 digits; a display scale of hundreds of trailing
    zeros is common after arithmetic). Trailing zeros of the fraction lose nothing and go."""
    if pa.types.is_decimal(target) and pa.types.is_string(values.type):
        longest = target.precision + 2  # sign, point
        if (pc.max(pc.binary_length(values)).as_py() or 0) > longest:
            values = pc.replace_substring_regex(values, r"^(-?\d*\.\d*?)0+$", r"\1")
            values = pc.replace_substring_regex(values, r"\.$", "")
            if (pc.max(pc.binary_length(values)).as_py() or 0) > longest:
                raise pa.ArrowInvalid(f"a decimal text of more than {longest} characters: {target}")
    return pc.cast(values, target, safe=True)


def _cast_values(
    values: pa.ChunkedArray | pa.Array, target: pa.DataType
) -> tuple[pa.Array | pa.ChunkedArray, list[int]]:
    if values.type == target:  # the usual case: no copy (combining chunks would copy)
        return values, []
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    try:
        return safe_cast(array, target), []
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    out, bad = [], []
    for i, value in enumerate(array.to_pylist()):
        try:
            out.append(
                safe_cast(pa.array([value]), target)[0].as_py() if value is not None else None
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError):
            out.append(None)
            bad.append(i)
    return pa.array(out, target), bad


# Two lower-case hex digits per byte value, as the little-endian uint16 of their ASCII codes.
_HEX_PAIRS = np.array(
    [int.from_bytes(f"{i:02x}".encode(), "little") for i in range(256)], dtype=np.uint16
)
# (position in the text, first digit, end digit) of the five groups of 8-4-4-4-12 digits.
_UUID_GROUPS = ((0, 0, 8), (9, 8, 12), (14, 12, 16), (19, 16, 20), (24, 20, 32))
# Rows per chunk so that int32 string offsets never overflow.
_MAX_STRING_BYTES = 2**31 - 1


def _fixed_width_strings(text: np.ndarray) -> pa.Array | pa.ChunkedArray:
    """An (n, width) uint8 matrix of ASCII as a string array, one row per value, no Python loop."""
    n, width = text.shape
    if n == 0:
        return pa.array([], pa.string())
    per_chunk = max(1, _MAX_STRING_BYTES // max(width, 1))
    chunks = []
    for start in range(0, n, per_chunk):
        part = np.ascontiguousarray(text[start : start + per_chunk])
        rows = part.shape[0]
        offsets = np.arange(0, width * (rows + 1), width, dtype=np.int32)
        chunks.append(
            pa.Array.from_buffers(
                pa.string(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(part)]
            )
        )
    return chunks[0] if len(chunks) == 1 else pa.chunked_array(chunks, pa.string())


def _uuid4_strings(n: int) -> pa.Array | pa.ChunkedArray:
    """Random (version 4) UUIDs as text, generated in bulk with numpy: uuid.uuid4() (or any
    Python-level formatting) per row costs seconds per million rows."""
    data = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    data[:, 6] = (data[:, 6] & 0x0F) | 0x40  # version 4
    data[:, 8] = (data[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    digits = _HEX_PAIRS[data].view(np.uint8)  # (n, 32) ASCII hex digits
    text = np.empty((n, 36), dtype=np.uint8)
    text[:, [8, 13, 18, 23]] = ord("-")
    for at, start, end in _UUID_GROUPS:
        text[:, at : at + end - start] = digits[:, start:end]
    return _fixed_width_strings(text)


def _repeat_string(value: str, n: int) -> pa.Array | pa.ChunkedArray:
    """``n`` copies of one string (pyarrow.repeat builds strings one by one: ~1.5 s per million)."""
    encoded = np.frombuffer(value.encode(), dtype=np.uint8)
    return _fixed_width_strings(np.broadcast_to(encoded, (n, encoded.size)))


def _repeat(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    """``n`` copies of one (non-string) scalar, without a Python list of ``n`` items."""
    return pa.repeat(pa.scalar(value, type_), n)


def prepare(
    stream: RawStream,
    batch: pa.Table,
    *,
    sync_id: str,
    generation_id: int,
    extracted_at: dt.datetime | None = None,
) -> tuple[pa.Table, dict[str, int]]:
    """Type the batch to the stream's columns and add the metadata columns."""
    n = batch.num_rows
    changes: dict[int, list[dict[str, str]]] = {}  # row -> its changes; most rows have none
    if SOURCE_CHANGES in batch.column_names:
        for i, recorded in enumerate(batch.column(SOURCE_CHANGES).to_pylist()):
            if recorded:
                changes[i] = json.loads(recorded)
    nulled: dict[str, int] = {}
    arrays, names = [], []
    for column in stream.columns:
        source = batch.column(column.name) if column.name in batch.column_names else pa.nulls(n)
        if column.type == "json" and not pa.types.is_string(source.type):
            source = pa.array(
                [None if v is None else json.dumps(v, default=str) for v in source.to_pylist()],
                pa.string(),
            )
        typed, bad = _cast_column(source, ARROW[column.type])
        for i in bad:
            changes.setdefault(i, []).append(
                {"field": column.name, "change": "NULLED", "reason": "DESTINATION_TYPECAST_ERROR"}
            )
        if bad:
            nulled[column.name] = len(bad)
        arrays.append(typed)
        names.append(column.name)
    if stream.protector is not None:
        encrypted, refused = stream.protector.encrypt(dict(zip(names, arrays, strict=True)))
        arrays = [encrypted.get(name, array) for name, array in zip(names, arrays, strict=True)]
        for name, rows in refused.items():
            for i in rows:
                changes.setdefault(i, []).append(
                    {"field": name, "change": "NULLED", "reason": "SUBJECT_KEY_SHREDDED"}
                )
            if rows:
                nulled[name] = nulled.get(name, 0) + len(rows)
    extracted = extracted_at or dt.datetime.now(dt.UTC)
    clean_meta = json.dumps({"sync_id": sync_id, "changes": []})
    if changes:
        meta_json: pa.Array | pa.ChunkedArray = pa.array(
            [
                json.dumps({"sync_id": sync_id, "changes": changes[i]})
                if i in changes
                else clean_meta
                for i in range(n)
            ],
            pa.string(),
        )
    else:  # the usual case: one shared string, built without a per-row loop
        meta_json = _repeat_string(clean_meta, n)
    meta = {
        "_airbyte_raw_id": _uuid4_strings(n),
        "_airbyte_extracted_at": _repeat(extracted, n, ARROW["timestamp_tz"]),
        "_airbyte_meta": meta_json,
        "_airbyte_generation_id": _repeat(generation_id, n, pa.int64()),
    }
    for column in stream.meta_columns[4:]:
        source = batch.column(column.name) if column.name in batch.column_names else pa.nulls(n)
        meta[column.name] = _cast_column(source, ARROW[column.type])[0]
    return pa.table(dict(zip(names, arrays, strict=True)) | meta), nulled
