"""The raw layer: Airbyte Destinations V2 tables, written by the embedded sync engine.

Each stream lands in ``<namespace>.<stream>`` with its typed columns plus Airbyte's metadata columns
(``_airbyte_raw_id``, ``_airbyte_extracted_at``, ``_airbyte_meta``, ``_airbyte_generation_id``, and
for CDC streams ``_ab_cdc_lsn``/``_ab_cdc_cursor``, ``_ab_cdc_updated_at``, ``_ab_cdc_deleted_at``),
so dbt reads the same shape whether Airbyte or this engine loaded it (ARCHITECTURE §4).

A batch is written in one database transaction together with the stream's sync state, so the state
(LSN, cursor, resume token) is never ahead of the data it covers. Deduplicated streams keep one row
per primary key, the latest by LSN/cursor, and keep deletions as tombstones
(``_ab_cdc_deleted_at``) for the staging models to drop. A value that does not fit its column is
nulled and recorded in ``_airbyte_meta.changes`` rather than failing the sync.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Mode = Literal["append", "append_dedup", "overwrite"]
CDC = Literal["postgres", "mongodb"]

# Source-neutral column types and how each destination stores them.
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
DUCKDB = {
    "integer": "BIGINT",
    "number": "DOUBLE",
    "decimal": "DECIMAL(38,9)",
    "string": "VARCHAR",
    "boolean": "BOOLEAN",
    "timestamp_tz": "TIMESTAMPTZ",
    "timestamp": "TIMESTAMP",
    "date": "DATE",
    "json": "JSON",
    "binary": "BLOB",
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


class _PrivateUmask:
    """Files created while any ``private_files()`` block runs get no group or other access.

    DuckDB creates its database file, and creates the write-ahead log (``<file>.wal``) again after
    every checkpoint, with the process's umask: a mode set on a file once would not last. The umask
    is process-wide, so blocks (nested, or in several threads) share one change, undone by the last
    to leave."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = os.umask(0o077)
                os.umask(self._saved | 0o077)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    os.umask(self._saved)


private_files = _PrivateUmask()
_F = TypeVar("_F", bound=Callable[..., Any])


def _private(method: _F) -> _F:
    """A DuckDBRaw method that may write the file (and so create its WAL) runs in private_files."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with private_files():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def private_duckdb_file(path: Path) -> Path:
    """Ready a DuckDB warehouse file to be kept private like the keyring (it holds personal data):
    a directory made for it is 0700, and a file or WAL an earlier version left readable to others
    is narrowed to 0600. Whatever then opens it for writing does so in ``private_files()``, which
    creates them 0600 (``connect_duckdb``; dbt's runs)."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)  # parents keep default modes (the home)
        path.parent.chmod(0o700)
    for file in (path, path.with_name(f"{path.name}.wal")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)
    return path


def connect_duckdb(path: Path) -> duckdb.DuckDBPyConnection:
    """A read-write connection to a private DuckDB warehouse file (``private_duckdb_file``)."""
    path = private_duckdb_file(path)  # first: its parents keep the process's own umask
    with private_files():
        return duckdb.connect(str(path))


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


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class DuckDBRaw:
    """Destinations V2 tables in a DuckDB file (the embedded warehouse). Methods that write run
    in ``private_files`` (open the file with ``connect_duckdb``)."""

    @_private
    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self.conn = connection
        # stream key -> generation of a snapshot loading into a table that was empty when it
        # began: its batches are appended (no MERGE) until finish_overwrite, which removes any
        # duplicate key the source might still have had.
        self._fresh: dict[str, int] = {}
        self._kept: dict[str, list[str]] = {}  # stream key -> kept_columns, as of ensure()
        self.conn.execute("CREATE SCHEMA IF NOT EXISTS airbyte_internal")
        self.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} (stream VARCHAR PRIMARY KEY, state JSON, "
            "primary_key JSON, updated_at TIMESTAMPTZ, source_columns JSON)"
        )
        # A state table from before the streams' columns were recorded.
        self.conn.execute(f"ALTER TABLE {STATE_TABLE} ADD COLUMN IF NOT EXISTS source_columns JSON")

    def _existing(self, stream: RawStream) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
            [stream.namespace, stream.name],
        ).fetchall()
        reverse = {v.split("(")[0]: k for k, v in DUCKDB.items()}
        reverse["TIMESTAMP WITH TIME ZONE"] = "timestamp_tz"
        return {name: reverse.get(kind.split("(")[0], kind) for name, kind in rows}

    @_private
    def ensure(self, stream: RawStream) -> list[str]:
        """Create the table, or evolve it: add new columns, widen compatible types, refuse the rest."""
        table = f"{_q(stream.namespace)}.{_q(stream.name)}"
        self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_q(stream.namespace)}")
        existing = self._existing(stream)
        self._kept[stream.key] = kept_columns(existing, stream)
        recorded = self.conn.execute(
            f"SELECT primary_key FROM {STATE_TABLE} WHERE stream = ?", [stream.key]
        ).fetchone()
        if (
            recorded
            and recorded[0] is not None
            and tuple(json.loads(recorded[0])) != stream.primary_key
        ):
            raise SchemaChangeError(
                f"stream {stream.key}: primary key changed from {json.loads(recorded[0])} to "
                f"{list(stream.primary_key)}; deduplicated history would be corrupted: reset the stream"
            )
        all_columns = (*stream.columns, *stream.meta_columns)
        if not existing:
            cols = ", ".join(f"{_q(c.name)} {DUCKDB[c.type]}" for c in all_columns)
            self.conn.execute(f"CREATE TABLE {table} ({cols})")
            added = []
        else:
            added = []
            for column in all_columns:
                current = existing.get(column.name)
                if current is None:
                    self.conn.execute(
                        f"ALTER TABLE {table} ADD COLUMN {_q(column.name)} {DUCKDB[column.type]}"
                    )
                    added.append(column.name)
                elif current != column.type:
                    if (current, column.type) not in WIDENINGS:
                        raise SchemaChangeError(
                            f"stream {stream.key}: column {column.name} changed type {current} -> "
                            f"{column.type}, which would lose data; the stream is stopped"
                        )
                    self.conn.execute(
                        f"ALTER TABLE {table} ALTER {_q(column.name)} TYPE {DUCKDB[column.type]}"
                    )
        self.conn.execute(
            f"INSERT INTO {STATE_TABLE} (stream, primary_key, updated_at) VALUES (?, ?, now()) "
            "ON CONFLICT (stream) DO UPDATE SET primary_key = excluded.primary_key",
            [stream.key, json.dumps(list(stream.primary_key))],
        )
        return added

    def state(self, stream: RawStream) -> dict[str, Any] | None:
        return self.load_state(stream.key)

    def load_state(self, key: str) -> dict[str, Any] | None:
        """State under any key (a stream, or a whole connection such as its CDC position)."""
        row = self.conn.execute(
            f"SELECT state FROM {STATE_TABLE} WHERE stream = ?", [key]
        ).fetchone()
        return json.loads(row[0]) if row and row[0] is not None else None

    @_private
    def save_state(self, key: str, state: dict[str, Any]) -> None:
        self.conn.execute(
            f"INSERT INTO {STATE_TABLE} (stream, state, updated_at) VALUES (?, ?, now()) "
            "ON CONFLICT (stream) DO UPDATE SET state = excluded.state, updated_at = now()",
            [key, json.dumps(state, default=str)],
        )

    @_private
    def begin_snapshot(self, stream: RawStream, generation_id: int) -> None:
        """A snapshot (a new generation) of ``stream`` starts. Into an empty table its batches
        are plain appends, much cheaper than merges; otherwise they are merged as usual."""
        self.ensure(stream)
        table = f"{_q(stream.namespace)}.{_q(stream.name)}"
        empty = self.conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {table})").fetchone()[0]
        if empty:
            self._fresh[stream.key] = generation_id
        else:
            self._fresh.pop(stream.key, None)

    @_private
    def write(
        self,
        stream: RawStream,
        batch: pa.Table,
        *,
        sync_id: str,
        generation_id: int,
        state: dict[str, Any] | None,
    ) -> WriteResult:
        """Write one batch and the state that covers it, atomically."""
        added = self.ensure(stream)
        fresh = self._fresh.get(stream.key) == generation_id
        typed, nulled = prepare(stream, batch, sync_id=sync_id, generation_id=generation_id)
        table = f"{_q(stream.namespace)}.{_q(stream.name)}"
        cols = [c.name for c in (*stream.columns, *stream.meta_columns)]
        col_list = ", ".join(_q(c) for c in cols)
        recorded = self.conn.execute(
            f"SELECT source_columns FROM {STATE_TABLE} WHERE stream = ?", [stream.key]
        ).fetchone()
        previous = json.loads(recorded[0]) if recorded and recorded[0] is not None else None
        self.conn.execute("BEGIN TRANSACTION")
        try:
            self.conn.register("_raw_batch", typed)
            if stream.mode == "append_dedup" and stream.primary_key and not fresh:
                keys = ", ".join(_q(k) for k in stream.primary_key)
                order = f"{_q(stream.order_by)} DESC NULLS LAST, " if stream.order_by else ""
                latest = (
                    f"SELECT * FROM _raw_batch QUALIFY row_number() OVER (PARTITION BY {keys} "
                    f"ORDER BY {order}_airbyte_extracted_at DESC) = 1"
                )
                on = " AND ".join(f"t.{_q(k)} = s.{_q(k)}" for k in stream.primary_key)
                newer = (
                    f"s.{_q(stream.order_by)} >= t.{_q(stream.order_by)} OR t.{_q(stream.order_by)} IS NULL"
                    if stream.order_by
                    else "true"
                )
                updates = ", ".join(
                    [f"{_q(c)} = s.{_q(c)}" for c in cols]
                    + [f"{_q(c)} = NULL" for c in self._kept.get(stream.key, [])]
                )
                values = ", ".join(f"s.{_q(c)}" for c in cols)
                self.conn.execute(
                    f"MERGE INTO {table} t USING ({latest}) s ON {on} "
                    f"WHEN MATCHED AND ({newer}) THEN UPDATE SET {updates} "
                    f"WHEN NOT MATCHED THEN INSERT ({col_list}) VALUES ({values})"
                )
            else:
                self.conn.execute(
                    f"INSERT INTO {table} ({col_list}) SELECT {col_list} FROM _raw_batch"
                )
            if state is not None:
                self.conn.execute(
                    f"UPDATE {STATE_TABLE} SET state = ?, updated_at = now() WHERE stream = ?",
                    [json.dumps(state, default=str), stream.key],
                )
            if previous != source_columns(stream):
                self.conn.execute(
                    f"UPDATE {STATE_TABLE} SET source_columns = ? WHERE stream = ?",
                    [json.dumps(source_columns(stream)), stream.key],
                )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        finally:
            self.conn.unregister("_raw_batch")
        return WriteResult(typed.num_rows, nulled, added, dropped_columns(previous, stream))

    @_private
    def finish_overwrite(
        self, stream: RawStream, generation_id: int, state: dict[str, Any] | None
    ) -> int:
        """End of a full refresh: drop the previous generations, with the final state, atomically."""
        table = f"{_q(stream.namespace)}.{_q(stream.name)}"
        fresh = self._fresh.get(stream.key) == generation_id
        self.conn.execute("BEGIN TRANSACTION")
        try:
            removed = self.conn.execute(
                f"DELETE FROM {table} WHERE _airbyte_generation_id < ?", [generation_id]
            ).fetchone()[0]
            if fresh and stream.mode == "append_dedup" and stream.primary_key:
                self._dedupe(stream, table)
            if state is not None:
                self.conn.execute(
                    f"UPDATE {STATE_TABLE} SET state = ?, updated_at = now() WHERE stream = ?",
                    [json.dumps(state, default=str), stream.key],
                )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        if fresh:
            del self._fresh[stream.key]
        return int(removed)

    def _dedupe(self, stream: RawStream, table: str) -> None:
        """Keep one row per primary key, the latest (appended batches are not merged)."""
        keys = ", ".join(_q(k) for k in stream.primary_key)
        duplicated = self.conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM {table} GROUP BY {keys} HAVING count(*) > 1)"
        ).fetchone()[0]
        if not duplicated:
            return
        order = f"{_q(stream.order_by)} DESC NULLS LAST, " if stream.order_by else ""
        self.conn.execute(
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} QUALIFY "
            f"row_number() OVER (PARTITION BY {keys} ORDER BY {order}"
            "_airbyte_extracted_at DESC) > 1)"
        )
