"""The raw layer on Snowflake (the ``prod`` warehouse), to the ``rawlayer`` contract.

Identifiers follow Airbyte's Snowflake destination (Destinations V2, ``toSnowflakeCompatibleName``):
schema, table and column names are upper-cased and written quoted, so ``raw_postgres.merchant.id``
lands as ``RAW_POSTGRES.MERCHANT.ID`` and the metadata columns as ``_AIRBYTE_RAW_ID``,
``_AIRBYTE_EXTRACTED_AT``, ``_AIRBYTE_META``, ``_AIRBYTE_GENERATION_ID``, ``_AB_CDC_LSN``, ... Because
Snowflake folds unquoted names to upper case, dbt sources (and analysts) can name them unquoted in
any case, exactly as they would name a table Airbyte itself loaded. The sync state lives in
``AIRBYTE_INTERNAL.STRIPE_PLATFORM_SYNC_STATE`` (``rawlayer.STATE_TABLE`` read the Snowflake way).

Load path: the typed batch is written to a Parquet file, ``PUT`` to a temporary internal stage and
``COPY INTO`` a transient staging table in ``AIRBYTE_INTERNAL`` with ``MATCH_BY_COLUMN_NAME``. That
is what ``snowflake.connector.pandas_tools.write_pandas`` and Airbyte's own Snowflake destination do
(stage files, then COPY): one bulk load per batch instead of row-by-row binds, with no pandas
dependency. The staging table is transient, not temporary, so it can live in a named schema
whatever the session's current schema is (and because fakesnow cannot COPY into a temporary
table); it is dropped after every batch.

Atomicity: Snowflake commits implicitly around every DDL statement, so all DDL (schema evolution,
staging table) runs first and only DML runs inside ``BEGIN ... COMMIT``: the dedup and the state
``UPDATE``. The dedup is DuckDBRaw's MERGE "latest wins" rule written as two statements: ``DELETE``
the rows the batch supersedes, then ``INSERT`` the batch's latest row for every key with no
surviving row. Same result, plain Snowflake DML, and unlike a MERGE it also runs on fakesnow inside
an explicit transaction (fakesnow emulates MERGE with a temporary table, which DuckDB refuses to
create in a transaction that already wrote the database). Use a connection in autocommit mode
(the connector's default).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from snowflake.connector import SnowflakeConnection

from stripe_platform.rawlayer import (
    STATE_TABLE,
    WIDENINGS,
    Column,
    RawStream,
    SchemaChangeError,
    WriteResult,
    dropped_columns,
    latest_first,
    newer_than_stored,
    prepare,
    source_columns,
)

SNOWFLAKE = {
    "integer": "NUMBER(38,0)",
    "number": "FLOAT",
    "decimal": "NUMBER(38,9)",
    "string": "VARCHAR",
    "boolean": "BOOLEAN",
    "timestamp_tz": "TIMESTAMP_TZ",
    "timestamp": "TIMESTAMP_NTZ",
    "date": "DATE",
    "json": "VARIANT",
    "binary": "BINARY",
}
# INFORMATION_SCHEMA.COLUMNS.DATA_TYPE -> source-neutral type (NUMBER is told apart by its scale).
_REVERSE = {
    "FLOAT": "number",
    "TEXT": "string",
    "BOOLEAN": "boolean",
    "TIMESTAMP_TZ": "timestamp_tz",
    "TIMESTAMP_NTZ": "timestamp",
    "DATE": "date",
    "VARIANT": "json",
    "BINARY": "binary",
}
INTERNAL_SCHEMA, STATE_NAME = STATE_TABLE.upper().split(".")
LOAD_STAGE = "STRIPE_PLATFORM_LOAD"
# A column being widened is rebuilt under this suffix (Snowflake cannot change a column's type).
WIDEN_SUFFIX = "__SP_WIDEN"
_PARQUET = "FILE_FORMAT = (TYPE = PARQUET USE_LOGICAL_TYPE = TRUE BINARY_AS_TEXT = FALSE)"


def sf_name(name: str) -> str:
    """The identifier Airbyte's Snowflake destination gives a stream, namespace or column name."""
    if not name:
        raise ValueError("an empty name is not a Snowflake identifier")
    if "${" in name:  # Snowflake scripting would read it as a variable
        name = name.replace("$", "_").replace("{", "_").replace("}", "_")
    return name.upper()


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sf_q(name: str) -> str:
    """A stream's column name as the quoted identifier the writer created (``sf_name``)."""
    return _q(sf_name(name))


def _kind(data_type: str, scale: int | None) -> str:
    if data_type in ("NUMBER", "DECIMAL", "NUMERIC"):
        return {0: "integer", 9: "decimal"}.get(scale or 0, f"NUMBER(38,{scale})")
    return _REVERSE.get(data_type, data_type.lower())


def _widen_expr(column: str, current: str, new: str) -> str:
    """The value of a column after a lossless type change (see ``rawlayer.WIDENINGS``)."""
    if current == "json" and new == "string":
        return f"TO_JSON({column})"
    if new == "json":  # JSON text becomes its value; any other string stays a JSON string
        return f"COALESCE(TRY_PARSE_JSON({column}), TO_VARIANT({column}))"
    return f"CAST({column} AS {SNOWFLAKE[new]})"


class SnowflakeRaw:
    """Destinations V2 tables in Snowflake, written over a snowflake-connector (DB-API) connection."""

    concurrent_writes = False  # one session, one transaction at a time

    def __init__(self, connection: SnowflakeConnection, *, database: str | None = None) -> None:
        """``database`` is the exact database name; by default the session's current database."""
        self.conn = connection
        self._p = "%s" if connection.is_pyformat else "?"
        if database is None:
            database = self._rows("SELECT CURRENT_DATABASE()")[0][0]
        if not database:
            raise ValueError(
                "the Snowflake session has no current database: pass database= or set it on the "
                "connection"
            )
        self.database = database
        self._db = _q(database)
        self.state_table = f"{self._db}.{_q(INTERNAL_SCHEMA)}.{_q(STATE_NAME)}"
        self.stage = f"{self._db}.{_q(INTERNAL_SCHEMA)}.{_q(LOAD_STAGE)}"
        self._create_schema(INTERNAL_SCHEMA)
        self._run(
            f"CREATE TABLE IF NOT EXISTS {self.state_table} (STREAM VARCHAR NOT NULL PRIMARY KEY, "
            "STATE VARIANT, PRIMARY_KEY VARIANT, UPDATED_AT TIMESTAMP_TZ, SOURCE_COLUMNS VARIANT)"
        )
        if "SOURCE_COLUMNS" not in self._existing(INTERNAL_SCHEMA, STATE_NAME):
            # A state table from before the streams' columns were recorded.
            self._run(f"ALTER TABLE {self.state_table} ADD COLUMN SOURCE_COLUMNS VARIANT")
        # Temporary: dropped with the session, so a crashed loader leaves no files behind.
        self._run(f"CREATE TEMPORARY STAGE IF NOT EXISTS {self.stage}")

    # -- plumbing -----------------------------------------------------------------------------

    def _run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute one statement; the number of rows it affected."""
        with self.conn.cursor() as cur:
            cur.execute(sql, tuple(params) or None)
            return int(cur.rowcount or 0)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, tuple(params) or None)
            return [tuple(row) for row in cur.fetchall()]

    def _transaction(self, work: Callable[[], Any]) -> Any:
        """Run DML atomically (no DDL inside: Snowflake would commit the transaction early)."""
        self._run("BEGIN")
        try:
            result = work()
            self._run("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):  # keep the original error if the session is gone
                self._run("ROLLBACK")
            raise
        return result

    def _create_schema(self, schema: str) -> None:
        """Create a schema without moving the session: CREATE SCHEMA makes it the current one."""
        exists = self._rows(
            f"SELECT COUNT(*) FROM {self._db}.INFORMATION_SCHEMA.SCHEMATA WHERE SCHEMA_NAME = {self._p}",
            [schema],
        )[0][0]
        if exists:
            return
        current_db, current_schema = self._rows("SELECT CURRENT_DATABASE(), CURRENT_SCHEMA()")[0]
        self._run(f"CREATE SCHEMA IF NOT EXISTS {self._db}.{_q(schema)}")
        if current_db and current_schema:
            self._run(f"USE SCHEMA {_q(current_db)}.{_q(current_schema)}")
        elif current_db:
            self._run(f"USE DATABASE {_q(current_db)}")

    def table(self, stream: RawStream) -> str:
        """The stream's fully qualified, quoted table name."""
        return f"{self._db}.{_q(sf_name(stream.namespace))}.{_q(sf_name(stream.name))}"

    @staticmethod
    def _columns(stream: RawStream) -> list[tuple[Column, str]]:
        columns = [(c, sf_name(c.name)) for c in (*stream.columns, *stream.meta_columns)]
        names = [name for _, name in columns]
        if len(set(names)) != len(names):
            raise SchemaChangeError(
                f"stream {stream.key}: column names collide once upper-cased for Snowflake: {names}"
            )
        return columns

    def _existing(self, schema: str, table: str) -> dict[str, str]:
        rows = self._rows(
            f"SELECT COLUMN_NAME, DATA_TYPE, NUMERIC_SCALE FROM {self._db}.INFORMATION_SCHEMA.COLUMNS "
            f"WHERE TABLE_SCHEMA = {self._p} AND TABLE_NAME = {self._p} ORDER BY ORDINAL_POSITION",
            [schema, table],
        )
        return {name: _kind(kind, scale) for name, kind, scale in rows}

    def _finish_interrupted_widening(self, table: str, existing: dict[str, str]) -> None:
        """Each widening step commits on its own: complete or undo one a crash cut short."""
        for name in [n for n in existing if n.endswith(WIDEN_SUFFIX)]:
            original = name[: -len(WIDEN_SUFFIX)]
            if original in existing:  # the old column is intact: start that widening over
                self._run(f"ALTER TABLE {table} DROP COLUMN {_q(name)}")
            else:  # the copy was complete and the old column dropped: finish the rename
                self._run(f"ALTER TABLE {table} RENAME COLUMN {_q(name)} TO {_q(original)}")
                existing[original] = existing[name]
            del existing[name]

    def _widen(self, table: str, column: Column, name: str, current: str) -> None:
        tmp = _q(name + WIDEN_SUFFIX)
        self._run(f"ALTER TABLE {table} ADD COLUMN {tmp} {SNOWFLAKE[column.type]}")
        self._run(f"UPDATE {table} SET {tmp} = {_widen_expr(_q(name), current, column.type)}")
        self._run(f"ALTER TABLE {table} DROP COLUMN {_q(name)}")
        self._run(f"ALTER TABLE {table} RENAME COLUMN {tmp} TO {_q(name)}")

    def _update_state(self, stream: RawStream, state: dict[str, Any]) -> None:
        """The state of a batch, inside its transaction (``ensure`` created the row)."""
        self._run(
            f"UPDATE {self.state_table} SET STATE = PARSE_JSON({self._p}), "
            f"UPDATED_AT = CURRENT_TIMESTAMP() WHERE STREAM = {self._p}",
            [json.dumps(state, default=str), stream.key],
        )

    # -- the raw-layer interface --------------------------------------------------------------

    def ensure(self, stream: RawStream) -> list[str]:
        """Create the table, or evolve it: add new columns, widen compatible types, refuse the rest."""
        schema, name = sf_name(stream.namespace), sf_name(stream.name)
        table = self.table(stream)
        columns = self._columns(stream)
        recorded = self._rows(
            f"SELECT PRIMARY_KEY FROM {self.state_table} WHERE STREAM = {self._p}", [stream.key]
        )
        if recorded and recorded[0][0] is not None:
            previous = json.loads(recorded[0][0])
            if tuple(previous) != stream.primary_key:
                raise SchemaChangeError(
                    f"stream {stream.key}: primary key changed from {previous} to "
                    f"{list(stream.primary_key)}; deduplicated history would be corrupted: reset "
                    "the stream"
                )
        self._create_schema(schema)
        existing = self._existing(schema, name)
        added: list[str] = []
        if not existing:
            cols = ", ".join(f"{_q(n)} {SNOWFLAKE[c.type]}" for c, n in columns)
            self._run(f"CREATE TABLE IF NOT EXISTS {table} ({cols})")
        else:
            self._finish_interrupted_widening(table, existing)
            widen = []
            for column, col in columns:  # check every column before changing any
                current = existing.get(col)
                if current is not None and current != column.type:
                    if (current, column.type) not in WIDENINGS:
                        raise SchemaChangeError(
                            f"stream {stream.key}: column {column.name} changed type {current} -> "
                            f"{column.type}, which would lose data; the stream is stopped"
                        )
                    widen.append((column, col, current))
            for column, col in columns:
                if col not in existing:
                    self._run(f"ALTER TABLE {table} ADD COLUMN {_q(col)} {SNOWFLAKE[column.type]}")
                    added.append(column.name)
            for column, col, current in widen:
                self._widen(table, column, col, current)
        self._run(
            f"MERGE INTO {self.state_table} t USING (SELECT {self._p} AS STREAM, "
            f"PARSE_JSON({self._p}) AS PRIMARY_KEY) s ON t.STREAM = s.STREAM "
            "WHEN MATCHED THEN UPDATE SET PRIMARY_KEY = s.PRIMARY_KEY "
            "WHEN NOT MATCHED THEN INSERT (STREAM, PRIMARY_KEY, UPDATED_AT) "
            "VALUES (s.STREAM, s.PRIMARY_KEY, CURRENT_TIMESTAMP())",
            [stream.key, json.dumps(list(stream.primary_key))],
        )
        return added

    def begin_snapshot(self, stream: RawStream, generation_id: int) -> None:
        pass  # a snapshot's batches are merged like any other

    def state(self, stream: RawStream) -> dict[str, Any] | None:
        return self.load_state(stream.key)

    def load_state(self, key: str) -> dict[str, Any] | None:
        """State under any key (a stream, or a whole connection such as its CDC position)."""
        rows = self._rows(f"SELECT STATE FROM {self.state_table} WHERE STREAM = {self._p}", [key])
        if not rows or rows[0][0] is None:
            return None
        value = rows[0][0]
        return json.loads(value) if isinstance(value, str) else value

    def save_state(self, key: str, state: dict[str, Any]) -> None:
        """State that covers no batch of its own (e.g. a connection's CDC position), upserted."""
        self._run(
            f"MERGE INTO {self.state_table} t USING (SELECT {self._p} AS STREAM, "
            f"PARSE_JSON({self._p}) AS STATE) s ON t.STREAM = s.STREAM "
            "WHEN MATCHED THEN UPDATE SET STATE = s.STATE, UPDATED_AT = CURRENT_TIMESTAMP() "
            "WHEN NOT MATCHED THEN INSERT (STREAM, STATE, UPDATED_AT) "
            "VALUES (s.STREAM, s.STATE, CURRENT_TIMESTAMP())",
            [key, json.dumps(state, default=str)],
        )

    def _stage_batch(
        self, staging: str, columns: list[tuple[Column, str]], typed: pa.Table
    ) -> None:
        """Bulk-load the typed batch into a fresh staging table: Parquet -> PUT -> COPY INTO."""
        # JSON stays text here; the final statement turns it into VARIANT with PARSE_JSON.
        cols = ", ".join(
            f"{_q(n)} {'VARCHAR' if c.type == 'json' else SNOWFLAKE[c.type]}" for c, n in columns
        )
        self._run(f"CREATE TRANSIENT TABLE {staging} ({cols}) DATA_RETENTION_TIME_IN_DAYS = 0")
        upper = pa.table({n: typed.column(c.name) for c, n in columns})
        prefix = uuid.uuid4().hex  # one stage directory per batch: COPY never sees another's files
        with tempfile.TemporaryDirectory(prefix="stripe-platform-snowflake-") as tmp:
            path = os.path.join(tmp, "batch.parquet")
            pq.write_table(upper, path)
            local = path.replace("\\", "\\\\").replace("'", "\\'")
            self._run(f"PUT 'file://{local}' @{self.stage}/{prefix} AUTO_COMPRESS = FALSE")
        copied = self._rows(
            f"COPY INTO {staging} FROM @{self.stage}/{prefix}/ {_PARQUET} "
            "MATCH_BY_COLUMN_NAME = CASE_SENSITIVE PURGE = TRUE"
        )
        # One row per file: file, status, rows_parsed, rows_loaded, ... (or a lone status message
        # when no file matched).
        loaded = sum(int(row[3] or 0) for row in copied if len(row) > 3)
        if loaded != typed.num_rows:
            raise RuntimeError(f"COPY INTO {staging} loaded {loaded} of {typed.num_rows} rows")

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
        typed, nulled = prepare(stream, batch, sync_id=sync_id, generation_id=generation_id)
        columns = self._columns(stream)
        table = self.table(stream)
        staging_name = (
            f"{sf_name(stream.namespace)}__{sf_name(stream.name)}__LOAD_{uuid.uuid4().hex[:12]}"
        ).upper()
        staging = f"{self._db}.{_q(INTERNAL_SCHEMA)}.{_q(staging_name)}"
        col_list = ", ".join(_q(n) for _, n in columns)
        values = ", ".join(
            f"PARSE_JSON(s.{_q(n)})" if c.type == "json" else f"s.{_q(n)}" for c, n in columns
        )
        recorded = self._rows(
            f"SELECT SOURCE_COLUMNS FROM {self.state_table} WHERE STREAM = {self._p}", [stream.key]
        )
        previous = recorded[0][0] if recorded else None
        previous = json.loads(previous) if isinstance(previous, str) else previous
        # Rows inserted below leave a column the stream no longer has NULL (dropped_columns).

        def load() -> None:
            if typed.num_rows and stream.mode == "append_dedup" and stream.primary_key:
                keys = [_sf_q(k) for k in stream.primary_key]
                latest = (
                    f"SELECT * FROM {staging} QUALIFY ROW_NUMBER() OVER (PARTITION BY "
                    f"{', '.join(keys)} ORDER BY {latest_first(stream, _sf_q)}) = 1"
                )
                on = " AND ".join(f"t.{k} = s.{k}" for k in keys)
                newer = newer_than_stored(stream, _sf_q)
                # MERGE's "latest wins" as DELETE + INSERT (see the module docstring).
                self._run(f"DELETE FROM {table} t USING ({latest}) s WHERE {on} AND {newer}")
                self._run(
                    f"INSERT INTO {table} ({col_list}) SELECT {values} FROM ({latest}) s "
                    f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {on})"
                )
            elif typed.num_rows:
                self._run(f"INSERT INTO {table} ({col_list}) SELECT {values} FROM {staging} s")
            if state is not None:
                self._update_state(stream, state)
            if previous != source_columns(stream):
                self._run(
                    f"UPDATE {self.state_table} SET SOURCE_COLUMNS = PARSE_JSON({self._p}) "
                    f"WHERE STREAM = {self._p}",
                    [json.dumps(source_columns(stream)), stream.key],
                )

        dropped = dropped_columns(previous, stream)
        if not typed.num_rows:
            if state is not None or previous != source_columns(stream):
                self._transaction(load)
            return WriteResult(0, nulled, added, dropped)
        try:
            self._stage_batch(staging, columns, typed)
            self._transaction(load)
        finally:
            self._run(f"DROP TABLE IF EXISTS {staging}")
        return WriteResult(typed.num_rows, nulled, added, dropped)

    def finish_overwrite(
        self, stream: RawStream, generation_id: int, state: dict[str, Any] | None
    ) -> int:
        """End of a full refresh: drop the previous generations, with the final state, atomically."""

        def drop_previous() -> int:
            removed = self._run(
                f'DELETE FROM {self.table(stream)} WHERE "_AIRBYTE_GENERATION_ID" < {self._p}',
                [generation_id],
            )
            if state is not None:
                self._update_state(stream, state)
            return removed

        return int(self._transaction(drop_previous))
