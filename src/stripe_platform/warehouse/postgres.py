"""The raw layer on PostgreSQL (the ``compose`` profile's warehouse), to the ``rawlayer`` contract.

Names are the stream's own (lower-case, quoted), as in DuckDB, so the dbt sources are the same on
both; the sync state lives in ``airbyte_internal.stripe_platform_sync_state`` (``rawlayer.STATE_TABLE``).

Load path: the typed batch is streamed with ``COPY ... FROM STDIN (FORMAT csv)`` into a temporary
table (pyarrow renders the CSV in C++, far faster than building Python rows for COPY binary), then a
PostgreSQL 15 ``MERGE`` applies the "latest wins" rule. Airbyte's final tables carry no unique
index on the primary key, and none is needed: the source side is reduced to one row per key with
``DISTINCT ON`` first. PostgreSQL DDL is transactional, so schema evolution runs in one
transaction and each batch (temporary table, COPY, MERGE, state) in another.

Every method runs inside ``connection.transaction()``: on an autocommit or idle connection it
commits before returning; inside a caller's open transaction it becomes a savepoint and the caller
owns the commit.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.types.json import Jsonb

from stripe_platform.oltp.db import copy_arrow
from stripe_platform.rawlayer import (
    STATE_TABLE,
    WIDENINGS,
    Column,
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

POSTGRES = {
    "integer": "bigint",
    "number": "double precision",
    "decimal": "numeric(38,9)",
    "string": "text",
    "boolean": "boolean",
    "timestamp_tz": "timestamptz",
    "timestamp": "timestamp",
    "date": "date",
    "json": "jsonb",
    "binary": "bytea",
}
# information_schema.columns.data_type -> source-neutral type.
_REVERSE = {
    "bigint": "integer",
    "double precision": "number",
    "numeric": "decimal",
    "text": "string",
    "character varying": "string",
    "boolean": "boolean",
    "timestamp with time zone": "timestamp_tz",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "jsonb": "json",
    "json": "json",
    "bytea": "binary",
}
STATE_SCHEMA, STATE_NAME = STATE_TABLE.split(".")
# A text that is not JSON becomes a JSON string rather than failing the type change
# (PostgreSQL 15 has no pg_input_is_valid).
_TEXT_TO_JSONB = sql.SQL(
    "CREATE OR REPLACE FUNCTION pg_temp.stripe_platform_text_to_jsonb(value text) RETURNS jsonb "
    "LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN RETURN value::jsonb; "
    "EXCEPTION WHEN invalid_text_representation THEN RETURN to_jsonb(value); END $$"
)


def _jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=lambda v: json.dumps(v, default=str))


def _widen_expr(column: sql.Composable, current: str, new: str) -> sql.Composable:
    if new == "json" and current == "string":
        return sql.SQL("pg_temp.stripe_platform_text_to_jsonb({})").format(column)
    return sql.SQL("{}::{}").format(column, sql.SQL(POSTGRES[new]))


class PostgresRaw:
    """Destinations V2 tables in PostgreSQL 15+, written over a psycopg 3 connection."""

    concurrent_writes = False  # one connection, one transaction at a time

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.conn = connection
        self.state_table = sql.Identifier(STATE_SCHEMA, STATE_NAME)
        self._kept: dict[str, list[str]] = {}  # stream key -> kept_columns, as of ensure()
        with self.conn.transaction():
            self.conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(STATE_SCHEMA))
            )
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (stream text PRIMARY KEY, state jsonb, "
                    "primary_key jsonb, updated_at timestamptz, source_columns jsonb)"
                ).format(self.state_table)
            )
            # A state table from before the streams' columns were recorded (checked first: the
            # ALTER would lock the table even with nothing to add).
            if not self.conn.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = %s AND column_name = 'source_columns'",
                [STATE_SCHEMA, STATE_NAME],
            ).fetchone():
                self.conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN source_columns jsonb").format(
                        self.state_table
                    )
                )

    @staticmethod
    def table(stream: RawStream) -> sql.Identifier:
        return sql.Identifier(stream.namespace, stream.name)

    def _existing(self, stream: RawStream) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            [stream.namespace, stream.name],
        ).fetchall()
        return {name: _REVERSE.get(kind, kind) for name, kind in rows}

    def _update_state(self, stream: RawStream, state: dict[str, Any]) -> None:
        """The state of a batch, inside its transaction (``ensure`` created the row)."""
        self.conn.execute(
            sql.SQL("UPDATE {} SET state = %s, updated_at = now() WHERE stream = %s").format(
                self.state_table
            ),
            [_jsonb(state), stream.key],
        )

    def ensure(self, stream: RawStream) -> list[str]:
        """Create the table, or evolve it: add new columns, widen compatible types, refuse the rest."""
        table = self.table(stream)
        all_columns = (*stream.columns, *stream.meta_columns)
        added: list[str] = []
        with self.conn.transaction():
            recorded = self.conn.execute(
                sql.SQL("SELECT primary_key FROM {} WHERE stream = %s").format(self.state_table),
                [stream.key],
            ).fetchone()
            if recorded and recorded[0] is not None and tuple(recorded[0]) != stream.primary_key:
                raise SchemaChangeError(
                    f"stream {stream.key}: primary key changed from {recorded[0]} to "
                    f"{list(stream.primary_key)}; deduplicated history would be corrupted: reset "
                    "the stream"
                )
            self.conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(stream.namespace))
            )
            existing = self._existing(stream)
            self._kept[stream.key] = kept_columns(existing, stream)
            if not existing:
                self.conn.execute(
                    sql.SQL("CREATE TABLE {} ({})").format(
                        table,
                        sql.SQL(", ").join(
                            sql.SQL("{} {}").format(
                                sql.Identifier(c.name), sql.SQL(POSTGRES[c.type])
                            )
                            for c in all_columns
                        ),
                    )
                )
            else:
                changes: list[sql.Composable] = []
                for column in all_columns:
                    current = existing.get(column.name)
                    ident = sql.Identifier(column.name)
                    kind = sql.SQL(POSTGRES[column.type])
                    if current is None:
                        changes.append(sql.SQL("ADD COLUMN {} {}").format(ident, kind))
                        added.append(column.name)
                    elif current != column.type:
                        if (current, column.type) not in WIDENINGS:
                            raise SchemaChangeError(
                                f"stream {stream.key}: column {column.name} changed type "
                                f"{current} -> {column.type}, which would lose data; the stream "
                                "is stopped"
                            )
                        if column.type == "json":
                            self.conn.execute(_TEXT_TO_JSONB)
                        changes.append(
                            sql.SQL("ALTER COLUMN {} TYPE {} USING {}").format(
                                ident, kind, _widen_expr(ident, current, column.type)
                            )
                        )
                if changes:
                    self.conn.execute(
                        sql.SQL("ALTER TABLE {} {}").format(table, sql.SQL(", ").join(changes))
                    )
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (stream, primary_key, updated_at) VALUES (%s, %s, now()) "
                    "ON CONFLICT (stream) DO UPDATE SET primary_key = excluded.primary_key"
                ).format(self.state_table),
                [stream.key, Jsonb(list(stream.primary_key))],
            )
        return added

    def begin_snapshot(self, stream: RawStream, generation_id: int) -> None:
        pass  # a snapshot's batches are merged like any other

    def state(self, stream: RawStream) -> dict[str, Any] | None:
        return self.load_state(stream.key)

    def load_state(self, key: str) -> dict[str, Any] | None:
        """State under any key (a stream, or a whole connection such as its CDC position)."""
        with self.conn.transaction():
            row = self.conn.execute(
                sql.SQL("SELECT state FROM {} WHERE stream = %s").format(self.state_table), [key]
            ).fetchone()
        return row[0] if row and row[0] is not None else None

    def save_state(self, key: str, state: dict[str, Any]) -> None:
        """State that covers no batch of its own (e.g. a connection's CDC position), upserted."""
        with self.conn.transaction():
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (stream, state, updated_at) VALUES (%s, %s, now()) "
                    "ON CONFLICT (stream) DO UPDATE SET state = excluded.state, updated_at = now()"
                ).format(self.state_table),
                [key, _jsonb(state)],
            )

    def _copy(self, staging: sql.Identifier, columns: list[Column], typed: pa.Table) -> None:
        copy_arrow(self.conn, staging, typed.select([c.name for c in columns]))

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
        table = self.table(stream)
        columns = [*stream.columns, *stream.meta_columns]
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)
        staging = sql.Identifier(f"_stripe_platform_load_{uuid.uuid4().hex}")
        with self.conn.transaction():
            recorded = self.conn.execute(
                sql.SQL("SELECT source_columns FROM {} WHERE stream = %s").format(self.state_table),
                [stream.key],
            ).fetchone()
            previous = recorded[0] if recorded else None
            if typed.num_rows:
                self.conn.execute(
                    sql.SQL("CREATE TEMPORARY TABLE {} ({}) ON COMMIT DROP").format(
                        staging,
                        sql.SQL(", ").join(
                            sql.SQL("{} {}").format(
                                sql.Identifier(c.name), sql.SQL(POSTGRES[c.type])
                            )
                            for c in columns
                        ),
                    )
                )
                self._copy(staging, columns, typed)
                if stream.mode == "append_dedup" and stream.primary_key:
                    self._merge(stream, table, staging, columns)
                else:
                    self.conn.execute(
                        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
                            table, cols, cols, staging
                        )
                    )
                self.conn.execute(sql.SQL("DROP TABLE {}").format(staging))
            if state is not None:
                self._update_state(stream, state)
            if previous != source_columns(stream):
                self.conn.execute(
                    sql.SQL("UPDATE {} SET source_columns = %s WHERE stream = %s").format(
                        self.state_table
                    ),
                    [Jsonb(source_columns(stream)), stream.key],
                )
        return WriteResult(typed.num_rows, nulled, added, dropped_columns(previous, stream))

    def _merge(
        self,
        stream: RawStream,
        table: sql.Identifier,
        staging: sql.Identifier,
        columns: list[Column],
    ) -> None:
        keys = [sql.Identifier(k) for k in stream.primary_key]

        def quote(name: str) -> str:
            return sql.Identifier(name).as_string(self.conn)

        latest = sql.SQL("SELECT DISTINCT ON ({}) * FROM {} ORDER BY {}, {}").format(
            sql.SQL(", ").join(keys),
            staging,
            sql.SQL(", ").join(keys),
            sql.SQL(latest_first(stream, quote)),
        )
        on = sql.SQL(" AND ").join(sql.SQL("t.{k} = s.{k}").format(k=k) for k in keys)
        newer = sql.SQL(newer_than_stored(stream, quote))
        idents = [sql.Identifier(c.name) for c in columns]
        # Columns the stream no longer has (dropped_columns) are NULL in a key's new version.
        cleared = [
            sql.SQL("{} = NULL").format(sql.Identifier(c)) for c in self._kept.get(stream.key, [])
        ]
        self.conn.execute(
            sql.SQL(
                "MERGE INTO {table} t USING ({latest}) s ON {on} "
                "WHEN MATCHED AND ({newer}) THEN UPDATE SET {updates} "
                "WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({values})"
            ).format(
                table=table,
                latest=latest,
                on=on,
                newer=newer,
                updates=sql.SQL(", ").join(
                    [*(sql.SQL("{c} = s.{c}").format(c=c) for c in idents), *cleared]
                ),
                cols=sql.SQL(", ").join(idents),
                values=sql.SQL(", ").join(sql.SQL("s.{}").format(c) for c in idents),
            )
        )

    def finish_overwrite(
        self, stream: RawStream, generation_id: int, state: dict[str, Any] | None
    ) -> int:
        """End of a full refresh: drop the previous generations, with the final state, atomically."""
        with self.conn.transaction():
            removed = self.conn.execute(
                sql.SQL("DELETE FROM {} WHERE _airbyte_generation_id < %s").format(
                    self.table(stream)
                ),
                [generation_id],
            ).rowcount
            if state is not None:
                self._update_state(stream, state)
        return int(removed)
