"""The raw layer in DuckDB (the embedded warehouse), to the ``rawlayer`` contract.

Tables are ``<namespace>.<stream>`` with the stream's own (lower-case) names; the sync state lives
in ``airbyte_internal.stripe_platform_sync_state`` (``rawlayer.STATE_TABLE``). A batch is written in
one DuckDB transaction together with the stream's state; deduplicated streams are merged on their
primary key (the versions replaced deleted, the new ones appended; latest wins: a later
generation, then within one the higher LSN/cursor, ``rawlayer.newer_than_stored``), except a
snapshot into an empty table, which appends and removes duplicate keys once at
``finish_overwrite``.

The file holds personal data: it and its write-ahead log are created 0600 in a 0700 directory
(``connect_duckdb``, ``private_files``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from stripe_platform.rawlayer import (
    STATE_TABLE,
    WIDENINGS,
    RawStream,
    SchemaChangeError,
    WriteResult,
    dropped_columns,
    kept_columns,
    latest_first,
    newer_than_stored,
    prepare,
    source_columns,
)

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

# How large DuckDB's write-ahead log may grow before a checkpoint (DuckDBRaw).
CHECKPOINT_THRESHOLD = "1GB"


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
    a directory made for it is 0700, and so is made an existing ``warehouse/`` of its own (the
    platform's ``<home>/warehouse/``: holding nothing but the warehouse's files) that this user
    owns and an earlier version left open; a file or WAL left readable to others is narrowed to
    0600. Whatever then opens it for writing does so in ``private_files()``, which creates them
    0600 (``connect_duckdb``; dbt's runs)."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(parents=True, exist_ok=True)  # parents keep default modes (the home)
        directory.chmod(0o700)
    else:
        # Not the platform's to narrow: the home, for a home made before (the cluster's OS user
        # must reach <home>/pg), or a directory WAREHOUSE_PATH names that holds anything else.
        info = directory.stat()
        if (
            directory.name == "warehouse"
            and info.st_mode & 0o077
            and info.st_uid == os.geteuid()
            and all(entry.name.startswith(path.name) for entry in directory.iterdir())
        ):
            directory.chmod(0o700)
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


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _widen_expr(column: str, current: str, new: str) -> str:
    """The value of a column after a lossless type change (see ``rawlayer.WIDENINGS``)."""
    if current == "string" and new == "json":
        # JSON text becomes its value; any other text a JSON string (a plain cast refuses it),
        # as the PostgreSQL and Snowflake writers do.
        return f"CASE WHEN json_valid({column}) THEN {column}::JSON ELSE to_json({column}) END"
    return f"{column}::{DUCKDB[new]}"


class DuckDBRaw:
    """Destinations V2 tables in a DuckDB file (the embedded warehouse). Methods that write run
    in ``private_files`` (open the file with ``connect_duckdb``)."""

    concurrent_writes = False  # one connection, one transaction at a time

    @_private
    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self.conn = connection
        # stream key -> generation of a snapshot loading into a table that was empty when it
        # began: its batches are appended (no MERGE) until finish_overwrite, which removes any
        # duplicate key the source might still have had.
        self._fresh: dict[str, int] = {}
        self._kept: dict[str, list[str]] = {}  # stream key -> kept_columns, as of ensure()
        # Each commit is durable in the write-ahead log; a checkpoint then rewrites the row
        # groups it touched into the file. At DuckDB's 16 MB a sync checkpointed after nearly
        # every batch (a 100,000-change CDC batch rewrote most of a 1M-row table: 2x its CPU);
        # here the log grows to CHECKPOINT_THRESHOLD first, and closing checkpoints what is left.
        self.conn.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
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
                        f" USING {_widen_expr(_q(column.name), current, column.type)}"
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
                latest = (
                    f"SELECT * FROM _raw_batch QUALIFY row_number() OVER (PARTITION BY {keys} "
                    f"ORDER BY {latest_first(stream, _q)}) = 1"
                )
                on = " AND ".join(f"t.{_q(k)} = s.{_q(k)}" for k in stream.primary_key)
                newer = newer_than_stored(stream, _q)
                # A merge: the stored versions this batch replaces are deleted and the new ones
                # appended (columns the stream no longer writes, kept_columns, are NULL in them);
                # a key whose stored version is newer keeps it. DuckDB appends cheaply and
                # updates slowly: a MERGE updating every column cost ~1.5x the CPU.
                self.conn.execute(f"CREATE OR REPLACE TEMP TABLE _raw_latest AS {latest}")
                self.conn.execute(
                    f"DELETE FROM {table} AS t USING _raw_latest s WHERE {on} AND ({newer})"
                )
                self.conn.execute(
                    f"INSERT INTO {table} ({col_list}) SELECT {col_list} FROM _raw_latest s "
                    f"WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {on})"
                )
                self.conn.execute("DROP TABLE _raw_latest")
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
        self.conn.execute(
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} QUALIFY "
            f"row_number() OVER (PARTITION BY {keys} ORDER BY {latest_first(stream, _q)}) > 1)"
        )
