"""The embedded sync engine: runs a connection of the airbyte/ catalog without Airbyte.

PostgreSQL sources: full-refresh streams are re-read whole; incremental streams start with a
snapshot consistent with a fresh logical replication slot (cdc.consistent_snapshot) and then read
the slot's changes (pgoutput), mapping inserts, updates and deletes to the ``_ab_cdc_*`` columns.
The slot is advanced only after the destination committed the changes, so a crash (even
``kill -9``) re-delivers and the merge on primary key makes re-delivery harmless. A sync resumes
only from the slot its destination's own snapshot created (``_resume_refusal``: the slot's
position must lie between the state's snapshot and saved positions, on the PostgreSQL system and
timeline the snapshot recorded); a slot that is missing, lost, or was re-created meanwhile, and
a snapshot interrupted half-way (its state says "in progress" from before the slot is touched),
are snapshotted again, and the report says why.

MongoDB sources: a full read, then incremental reads by cursor field (or change streams on a
server that has them), the cursor saved with each batch.

Destinations: a raw-layer writer (rawlayer.RawWriter), the warehouse's or the lake's. Each slot
belongs to one connection, so connections to different destinations advance independently.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg.types.string import TextLoader

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.ingestion.catalog import (
    MongoSource,
    PostgresSource,
    ResolvedConnection,
    Stream,
)
from stripe_platform.ingestion.engine import mongo_source
from stripe_platform.ingestion.postgres import cdc, pgcopy, pgvalues
from stripe_platform.ingestion.postgres.pgoutput import (
    TYPED_OIDS,
    UNCHANGED,
    convert_value,
    format_lsn,
)
from stripe_platform.oltp import db
from stripe_platform.rawlayer import (
    ARROW,
    Column,
    RawStream,
    RawWriter,
    SchemaChangeError,
    WriteResult,
    safe_cast,
)

BATCH_ROWS = 50_000
# Snapshots: rows per destination write (fewer, larger lake files) and parallel readers (each a
# connection sharing the slot's exported snapshot; a partitioned table is read partition by
# partition).
SNAPSHOT_BATCH_ROWS = 250_000
SNAPSHOT_READERS = max(2, min(4, os.cpu_count() or 2))
SNAPSHOT_WRITES = 2  # snapshot batches encoded and written at once, where the writer allows it
# How long a PostgreSQL sync waits for another run of its connection (same slot) to end before
# failing: two DAG runs due at once must both succeed, one after the other.
RUN_LOCK_TIMEOUT = 600.0
PG_TYPES = {
    "int2": "integer",
    "int4": "integer",
    "int8": "integer",
    "numeric": "decimal",
    "float4": "number",
    "float8": "number",
    "bool": "boolean",
    "text": "string",
    "varchar": "string",
    "bpchar": "string",
    "inet": "string",
    "uuid": "string",
    "name": "string",
    "timestamptz": "timestamp_tz",
    "timestamp": "timestamp",
    "date": "date",
    "json": "json",
    "jsonb": "json",
    "bytea": "binary",
}

Progress = Callable[[str, int], None]  # (stream, rows just written)
FIRST_SYNC = "first sync to this destination"

log = logging.getLogger(__name__)


class SyncError(PlatformError, RuntimeError):
    """A sync failed; the message names the connection and stream."""


class _SlotReplaced(SyncError):
    """The slot stopped being the one the state resumes from while a sync read it (another
    sync of the connection, to another destination, re-created it): nothing it returned since
    was written."""


@dataclass
class StreamReport:
    rows: int = 0
    nulled: dict[str, int] = field(default_factory=dict)
    added_columns: list[str] = field(default_factory=list)
    # Source columns no longer sent: kept in the destination, NULL in rows written from now on.
    dropped_columns: list[str] = field(default_factory=list)
    error: str | None = None
    # Documents delivered with a cursor that could not order them: missing, null, a BSON type
    # name, or "future" (after the sync's start); ``warnings`` says so in words.
    cursor_issues: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add(self, part: StreamReport | WriteResult) -> None:
        """Count ``part`` in: one batch's write result, or another run's report of the stream."""
        self.rows += part.rows
        for column, n in part.nulled.items():
            self.nulled[column] = self.nulled.get(column, 0) + n
        self.added_columns += part.added_columns
        self.dropped_columns += part.dropped_columns
        if isinstance(part, StreamReport):
            self.error = part.error or self.error
            for issue, n in part.cursor_issues.items():
                self.cursor_issues[issue] = self.cursor_issues.get(issue, 0) + n
            self.warnings += part.warnings


@dataclass
class SyncReport:
    connection: str
    sync_id: str
    phase: str = "incremental"
    streams: dict[str, StreamReport] = field(default_factory=dict)
    seconds: float = 0.0
    snapshot_reason: str | None = None
    """Why this sync took a new snapshot instead of resuming the slot (None: it resumed)."""

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.streams.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "connection": self.connection,
            "sync_id": self.sync_id,
            "phase": self.phase,
            "snapshot_reason": self.snapshot_reason,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "streams": {k: v.__dict__ for k, v in self.streams.items()},
        }


def _drop_slot_of_older_name(conn: psycopg.Connection, state: dict[str, Any], slot: str) -> None:
    """A connection's state may name a slot of an earlier naming scheme (without the database):
    drop it if it is this database's, or it would keep WAL on the server for ever."""
    old = state.get("slot")
    if old and old != slot:
        info = cdc.slot_info(conn, old)
        if info is not None and info.database == conn.info.dbname:
            cdc.drop_slot(conn, old)


def _resume_refusal(
    state: dict[str, Any],
    info: cdc.SlotInfo | None,
    slot: str,
    identity: cdc.SystemIdentity | None = None,
) -> str | None:
    """Why this destination's ``state`` cannot resume from ``slot`` as the server has it now
    (None: it can).

    Only the slot this destination's own snapshot created may be resumed. Its position starts at
    the snapshot's (``snapshot_lsn``, the slot's consistent point) and moves only when
    ``cdc.advance`` confirms a position the state saved first, so
    ``snapshot_lsn <= confirmed_flush_lsn <= state["lsn"]``. A slot dropped and created again
    under the same name (by a DBA, ``max_slot_wal_keep_size``, a failover, a snapshot killed
    half-way, or a sync of this connection to another destination, whose state is its own)
    starts past every position flushed before its creation, hence past ``state["lsn"]``: the
    changes in between are in neither, and resuming from it would lose them.

    Those positions compare only within one server history: ``identity`` (the server's now,
    checked once per sync start; None: not checked) must be the one the state recorded at its
    snapshot, or a slot created on a restored or migrated cluster, or on a new primary after a
    failover (which may be at a lower LSN), could pass. A state saved before identities were
    recorded has none: it resumes, and records one at its next complete snapshot.
    """
    if not state:
        if info is None:
            return FIRST_SYNC
        return (
            f"{FIRST_SYNC}: slot {slot} exists without a state here (another destination of "
            "this connection reads it, or an earlier attempt left it) and is replaced; a "
            "destination that read it takes a new snapshot on its next sync"
        )
    if state.get("snapshot") == "in_progress" or "snapshot_lsn" not in state or "lsn" not in state:
        return f"the previous snapshot (generation {state.get('generation')}) did not finish"
    if identity is not None and "system_id" in state:
        if state["system_id"] != identity.system_id:
            return (
                f"the source is another PostgreSQL system (system id {identity.system_id}, the "
                f"state's {state['system_id']}): restored or migrated, so its slot positions "
                "say nothing about this destination's"
            )
        if state.get("timeline") != identity.timeline:
            return (
                f"the source's timeline changed (failover or point-in-time recovery: timeline "
                f"{identity.timeline}, the state's {state.get('timeline')}), so its slot "
                "positions say nothing about this destination's"
            )
    if state.get("slot") != slot:
        return f"the state names slot {state.get('slot')}, not {slot}"
    if info is None:
        return f"replication slot {slot} is missing (dropped, or not carried over by a failover)"
    if info.wal_status == "lost":
        return (
            f"replication slot {slot} was invalidated by the server: the WAL it needed was "
            "removed (max_slot_wal_keep_size)"
        )
    position = info.confirmed_flush_lsn or 0
    lsn, start = int(state["lsn"]), int(state["snapshot_lsn"])
    if position > lsn:
        return (
            f"replication slot {slot} was re-created past this destination's position (slot at "
            f"{format_lsn(position)}, state at {format_lsn(lsn)}): it was dropped and created "
            "again (by a DBA, a failover, a snapshot killed half-way, or a sync of this "
            "connection to another destination), so the changes in between are not in it"
        )
    if position < start:
        return (
            f"replication slot {slot} is behind this destination's snapshot (slot at "
            f"{format_lsn(position)}, snapshot at {format_lsn(start)}): not the slot that "
            "snapshot was taken with"
        )
    return None


def _batches(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


class Engine:
    """Runs one connection (resolved once, :meth:`Catalog.resolve`) against one raw-layer writer
    (DuckDBRaw, PostgresRaw, SnowflakeRaw, LakeRaw)."""

    def __init__(
        self,
        settings: Settings,
        connection: ResolvedConnection,
        writer: RawWriter,
        progress: Progress = lambda stream, rows: None,
    ) -> None:
        from stripe_platform.security.subjects_layer import protected_writer

        self.settings = settings
        self.connection = connection
        # The catalog's protected fields are encrypted on the way in (encrypt_at_rest): the
        # writer gets each stream with its protection (security/subjects_layer.py).
        self.writer = protected_writer(settings, writer, connection)
        self.progress = progress
        self._run_locked = False  # this engine holds its connection's run lock (_one_run)

    # -- shared ------------------------------------------------------------------------------------
    def _raw_stream(
        self, stream: Stream, columns: tuple[Column, ...], cdc_kind: str | None
    ) -> RawStream:
        connection = self.connection.connection
        return RawStream(
            namespace=connection.namespace.lower(),
            name=f"{connection.prefix}{stream.name}".lower(),
            columns=columns,
            primary_key=tuple(stream.primary_key),
            cursor=stream.cursor_field,
            mode=stream.sync_mode.destination_sync_mode,
            cdc=cdc_kind if stream.sync_mode.incremental else None,  # type: ignore[arg-type]
        )

    def _write(
        self,
        report: SyncReport,
        raw: RawStream,
        stream: str,
        table: pa.Table,
        state: dict[str, Any] | None,
        generation: int = 0,
    ) -> None:
        result = self.writer.write(
            raw, table, sync_id=report.sync_id, generation_id=generation, state=state
        )
        self._count(report, stream, result)

    def _count(self, report: SyncReport, stream: str, result: WriteResult) -> None:
        report.streams.setdefault(stream, StreamReport()).add(result)
        self.progress(stream, result.rows)

    def sync(self) -> SyncReport:
        connection = self.connection
        report = SyncReport(connection.name, sync_id=uuid.uuid4().hex[:12])
        started = time.monotonic()
        try:
            if isinstance(connection.source, PostgresSource):
                with self._one_run():
                    self._sync_postgres(report)
            elif isinstance(connection.source, MongoSource):
                self._sync_mongo(report)
        except SchemaChangeError as exc:
            # Nothing was written for the batch that hit it, and the slot did not move.
            raise SyncError(f"connection {connection.name}: {exc}") from exc
        report.seconds = time.monotonic() - started
        failed = {name: r.error for name, r in report.streams.items() if r.error}
        if failed:
            details = "; ".join(f"{e}" for e in failed.values())
            raise SyncError(
                f"connection {connection.name}: {len(failed)} stream(s) stopped: {details}"
            )
        return report

    # -- PostgreSQL ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _one_run(self) -> Iterator[None]:
        """Hold the connection's run lock (:func:`_lock_run`) on a session of its own for the
        block; re-entrant, so :meth:`follow` holds it for its life across its syncs. Closing the
        session releases it, and so does the server when the process dies (even ``kill -9``)."""
        if self._run_locked:
            yield
            return
        conninfo = db.conninfo(self.settings, with_key=False)
        name = self.connection.name
        with psycopg.connect(
            conninfo, autocommit=True, application_name=f"stripe-platform sync {name}"[:63]
        ) as conn:
            _lock_run(conn, name, self.connection.slot(conn.info.dbname))
            self._run_locked = True
            try:
                yield
            finally:
                self._run_locked = False

    def _pg_columns(self, conn: psycopg.Connection, stream: Stream) -> tuple[Column, ...]:
        rows = conn.execute(
            """SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
               WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
               ORDER BY a.attnum""",
            (f"public.{stream.name}",),
        ).fetchall()
        if not rows:
            raise SyncError(f"stream {stream.name}: table public.{stream.name} does not exist")
        excluded = set(stream.exclude_columns)
        return tuple(
            Column(name, PG_TYPES.get(kind, "string"))
            for name, kind in rows
            if name not in excluded
        )

    def _sync_postgres(self, report: SyncReport) -> None:
        conninfo = db.conninfo(self.settings, with_key=False)
        streams = self.connection.streams
        with psycopg.connect(conninfo, autocommit=True) as conn:
            cdc.use_cdc_types(conn)  # full-refresh rows typed like change rows (inet as text, ...)
            conn.execute("SET TIME ZONE 'UTC'")
            raw = {
                s.name: self._raw_stream(s, self._pg_columns(conn, s), "postgres") for s in streams
            }
            for stream in streams:
                if not stream.sync_mode.incremental:
                    try:
                        self._full_refresh(conn, report, stream, raw[stream.name])
                    except SchemaChangeError as exc:  # stop this stream, keep the others going
                        report.streams.setdefault(stream.name, StreamReport()).error = str(exc)
            if self.connection.incremental:
                self._cdc(conn, conninfo, report, raw)

    def _full_refresh(
        self, conn: psycopg.Connection, report: SyncReport, stream: Stream, raw: RawStream
    ) -> None:
        generation = _new_generation((self.writer.state(raw) or {}).get("generation"))
        columns = ", ".join(f'"{c.name}"' for c in raw.columns)
        rows = _source_rows(conn, f"SELECT {columns} FROM public.{stream.name}")
        schema = pa.schema([(c.name, ARROW[c.type]) for c in raw.columns])
        for chunk in _batches(rows, BATCH_ROWS):  # typed as change rows are
            table = pa.Table.from_batches([_typed(pgvalues.table(raw.columns, chunk), schema)])
            self._write(report, raw, stream.name, table, None, generation)
        if not rows:
            self.writer.ensure(raw)
        self.writer.finish_overwrite(raw, generation, {"generation": generation})

    def _cdc(
        self,
        conn: psycopg.Connection,
        conninfo: str,
        report: SyncReport,
        raw: dict[str, RawStream],
    ) -> None:
        slot = self.connection.slot(conn.info.dbname)
        state = self.writer.load_state(self.connection.state_key) or {}
        _drop_slot_of_older_name(conn, state, slot)
        identity = cdc.identify_system(conninfo, slot) if "system_id" in state else None
        refusal = _resume_refusal(state, cdc.slot_info_when_free(conn, slot), slot, identity)
        if refusal is not None:
            state = self._snapshot(conn, conninfo, slot, report, raw, refusal)
        _wait_for_flush(conn)
        try:
            self._drain_changes(conn, slot, state, raw, report)
        except _SlotReplaced as exc:  # a concurrent sync to another destination took the slot
            state = self._snapshot(conn, conninfo, slot, report, raw, str(exc))
            self._drain_changes(conn, slot, state, raw, report)

    def _snapshot(
        self,
        conn: psycopg.Connection,
        conninfo: str,
        slot: str,
        report: SyncReport,
        raw: dict[str, RawStream],
        reason: str,
    ) -> dict[str, Any]:
        """Take a snapshot of the incremental streams consistent with a new slot, write every
        stream, and only then save the state that resumes from that slot (returned)."""
        state_key = self.connection.state_key
        streams = self.connection.incremental
        report.phase = "snapshot"
        report.snapshot_reason = reason
        if reason != FIRST_SYNC:
            log.warning("connection %s: taking a new snapshot: %s", self.connection.name, reason)
        # A new generation: rows an interrupted earlier snapshot left behind, that the source
        # no longer has, are removed once this snapshot is complete.
        generation = _new_generation((self.writer.load_state(state_key) or {}).get("generation"))
        # Durably "in progress" before the slot is touched: a sync killed from here until the
        # complete state below is saved leaves a state that cannot resume (whatever slot the
        # next sync finds), so that sync snapshots again instead of trusting the new slot.
        self.writer.save_state(
            state_key, {"slot": slot, "snapshot": "in_progress", "generation": generation}
        )
        cdc.drop_slot(conn, slot)
        with contextlib.ExitStack() as stack:
            snap = stack.enter_context(
                cdc.consistent_snapshot(
                    conninfo, slot, self.connection.publication, [s.name for s in streams]
                )
            )
            taken = dt.datetime.now(dt.UTC)
            reader = stack.enter_context(_SnapshotReader(snap, SNAPSHOT_READERS))
            # Entered after the reader, so it exits first: a failed write waits for the others.
            writes = stack.enter_context(_SnapshotWrites(self, report, generation))
            for stream in streams:
                self.writer.begin_snapshot(raw[stream.name], generation)
                for table in reader.tables(stream.name, raw[stream.name].columns):
                    n = table.num_rows
                    table = table.append_column(
                        "_ab_cdc_lsn", pa.repeat(pa.scalar(snap.lsn, pa.int64()), n)
                    )
                    table = table.append_column(
                        "_ab_cdc_updated_at",
                        pa.repeat(pa.scalar(taken, pa.timestamp("us", tz="UTC")), n),
                    )
                    writes.submit(raw[stream.name], stream.name, table)
                writes.wait()
                if stream.name not in report.streams:
                    self.writer.ensure(raw[stream.name])
            for stream in streams:
                self.writer.finish_overwrite(raw[stream.name], generation, None)
            # Every stream is durable: only now may the state name this slot. snapshot_lsn is
            # the slot's consistent point (where it was created), the floor of its position.
            state = {
                "slot": slot,
                "snapshot": "complete",
                "snapshot_lsn": snap.lsn,
                "lsn": snap.lsn,
                "generation": generation,
            }
            if snap.identity is not None:  # the history snapshot_lsn and lsn belong to
                state["system_id"] = snap.identity.system_id
                state["timeline"] = snap.identity.timeline
            self.writer.save_state(state_key, state)
        return state

    def _drain_changes(
        self,
        conn: psycopg.Connection,
        slot: str,
        state: dict[str, Any],
        raw: dict[str, RawStream],
        report: SyncReport,
    ) -> dict[str, Any]:
        """Read the slot until caught up: write each batch, then save the state, then advance the
        slot (in that order, so a crash anywhere re-delivers). Returns the new state.

        After each read the slot is checked to still be the one ``state`` resumes from (see
        :func:`_resume_refusal`; a slot re-created before or during the read shows a position
        past the state's): if not, nothing read is written and :class:`_SlotReplaced` is raised.

        A column added to (or dropped from) a source table while this runs shows up in its change
        rows (inserts and updates carry every column): the stream's columns are read again before
        those rows are written (``raw`` is updated)."""
        connection = self.connection
        while True:
            try:
                batch = cdc.read_changes(
                    conn, slot, connection.publication, max_changes=BATCH_ROWS, columnar=True
                )
            except (cdc.SlotNotFoundError, cdc.SlotLostError) as exc:
                raise _SlotReplaced(f"connection {connection.name}: {exc}") from exc
            refusal = _resume_refusal(state, cdc.slot_info(conn, slot), slot)
            if refusal is not None:
                raise _SlotReplaced(f"connection {connection.name}: {refusal}")
            for group in batch.relations:  # truncations (batch.changes) are not synced
                table_name = group.relation.name
                if table_name not in raw:
                    continue
                stream = connection.stream(table_name)
                names = {c.name for c in raw[table_name].columns}
                allowed = names | set(stream.exclude_columns)
                sent = set(group.relation.column_names)  # every column, deletes' NULL but the key
                if not (allowed.issuperset(sent) and names.issubset(sent)):
                    raw[table_name] = self._raw_stream(
                        stream, self._pg_columns(conn, stream), "postgres"
                    )
                table = _columnar_change_table(raw[table_name], group)
                if table is None:  # not of the plain shape: a change at a time
                    changes = group.changes()
                    table = _change_table(
                        raw[table_name],
                        changes,
                        _toasted_values(conn, raw[table_name], table_name, changes),
                    )
                self._write(
                    report,
                    raw[table_name],
                    table_name,
                    table,
                    None,
                    int(state.get("generation", 0)),
                )
            if batch.relations or batch.resume_lsn != state.get("lsn"):
                # Only now, with the changes durable in the destination, may the slot move on.
                state = {**state, "lsn": batch.resume_lsn}
                self.writer.save_state(connection.state_key, state)
                cdc.advance(conn, slot, batch.resume_lsn)
            if batch.caught_up:
                return state

    def follow(self, stop: threading.Event, interval: float = 0.2) -> SyncReport:
        """Sync once, then keep the connection's change streams flowing until ``stop`` is set.

        PostgreSQL: one connection stays open and the slot is polled every ``interval`` seconds
        (a backlog is drained at once); each batch is written, then the state saved, then the
        slot advanced, exactly as in :meth:`sync`, so stopping or killing it anywhere loses
        nothing. Full-refresh streams are read by the first sync only. The connection's run lock
        is held throughout: any other sync of it waits until this returns (or times out). Other
        sources: :meth:`sync` every ``interval`` seconds. Returns the report of everything
        written.
        """
        if isinstance(self.connection.source, PostgresSource):
            with self._one_run():
                return self._follow(stop, interval)
        return self._follow(stop, interval)

    def _follow(self, stop: threading.Event, interval: float) -> SyncReport:
        first = self.sync()
        connection = self.connection
        total = SyncReport(
            connection.name,
            first.sync_id,
            first.phase,
            dict(first.streams),
            snapshot_reason=first.snapshot_reason,
        )
        started = time.monotonic() - first.seconds
        streams = connection.incremental
        if not isinstance(connection.source, PostgresSource) or not streams:
            while not stop.wait(interval):
                _add_report(total, self.sync())
            total.seconds = time.monotonic() - started
            return total
        try:
            with psycopg.connect(
                db.conninfo(self.settings, with_key=False), autocommit=True
            ) as conn:
                slot = connection.slot(conn.info.dbname)
                cdc.use_cdc_types(conn)
                conn.execute("SET TIME ZONE 'UTC'")
                raw = {
                    s.name: self._raw_stream(s, self._pg_columns(conn, s), "postgres")
                    for s in streams
                }
                state = self.writer.load_state(connection.state_key) or {}
                while not stop.is_set():
                    try:
                        state = self._drain_changes(conn, slot, state, raw, total)
                    except _SlotReplaced:  # another sync took the slot: snapshot again, go on
                        again = self.sync()
                        _add_report(total, again)
                        total.phase, total.snapshot_reason = again.phase, again.snapshot_reason
                        state = self.writer.load_state(connection.state_key) or {}
                        continue
                    stop.wait(interval)
        except SchemaChangeError as exc:
            raise SyncError(f"connection {connection.name}: {exc}") from exc
        total.seconds = time.monotonic() - started
        return total

    # -- MongoDB ---------------------------------------------------------------------------------
    def _sync_mongo(self, report: SyncReport) -> None:
        from stripe_platform.docstore.client import connect

        docs = connect(self.settings)
        change_streams = mongo_source.supports_change_streams(docs)
        started = dt.datetime.now(dt.UTC)  # no saved cursor goes past it (CursorReader)
        for stream in self.connection.streams:
            columns = mongo_source.collection_columns(stream.name)
            raw = self._raw_stream(stream, columns, "mongodb")
            state = self.writer.state(raw)
            if change_streams and state and state.get("mode") == "change_stream":
                reader = mongo_source.read_change_stream(
                    docs, stream.name, columns, state, BATCH_ROWS
                )
            else:
                reader = mongo_source.read_by_cursor(
                    docs,
                    stream.name,
                    stream.cursor_field or "_id",
                    columns,
                    state,
                    batch_size=BATCH_ROWS,
                    started=started,
                )
            entry = report.streams.setdefault(stream.name, StreamReport())
            try:
                wrote = False
                for batch in reader:
                    self._write(report, raw, stream.name, batch.table, batch.state)
                    wrote = True
                if not wrote:
                    self.writer.ensure(raw)
            except SchemaChangeError as exc:  # stop this stream, keep the others going
                entry.error = str(exc)
            if isinstance(reader, mongo_source.CursorReader):
                for issue, n in reader.issues.items():
                    entry.cursor_issues[issue] = entry.cursor_issues.get(issue, 0) + n
                entry.warnings += reader.warnings


def _add_report(total: SyncReport, more: SyncReport) -> None:
    for name, part in more.streams.items():
        total.streams.setdefault(name, StreamReport()).add(part)


class _SnapshotReader:
    """Reads the tables of a consistent snapshot as typed Arrow tables, in parallel.

    ``readers`` connections import the slot's exported snapshot (``Snapshot.attach``), so every
    one of them sees exactly the rows the slot starts after. A partitioned table is split into
    its leaf partitions, read concurrently, largest first; each reader streams Arrow record
    batches (``pgcopy``: COPY binary decoded by a compiled loop) and casts them to the destination
    types, while the calling thread writes the previous batch. Batches come out in no
    particular order.
    """

    def __init__(self, snap: cdc.Snapshot, readers: int) -> None:
        self.snap = snap
        self.readers = max(1, readers)
        self._stack = contextlib.ExitStack()
        self._attached: list[cdc.SnapshotReader] = []

    def __enter__(self) -> _SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _connections(self, n: int) -> list[cdc.SnapshotReader]:
        missing = n - len(self._attached)
        if missing > 0:
            # Opened side by side: each connection spends most of its setup (TLS, authentication,
            # importing the snapshot) waiting on the server.
            # One that fails fails the read; the others are in the stack already, and close with it.
            with ThreadPoolExecutor(missing) as pool:
                opened = pool.map(
                    lambda _: self._stack.enter_context(self.snap.attach()), range(missing)
                )
                self._attached.extend(list(opened))
        return self._attached[:n]

    def tables(self, table: str, columns: tuple[Column, ...]) -> Iterator[pa.Table]:
        batch_rows = SNAPSHOT_BATCH_ROWS  # read here, not at import: tests make it small
        names = [c.name for c in columns]
        schema = pa.schema([(c.name, ARROW[c.type]) for c in columns])
        pieces: queue.SimpleQueue[str] = queue.SimpleQueue()
        leaves = self.snap.leaves(table)
        for ref, _ in leaves:  # queries built here: the snapshot's connection is not shared
            pieces.put(self.snap.arrow_query(ref, names))
        readers = self._connections(min(self.readers, len(leaves)))
        # Room for more than one output batch (a reader's batches are up to 65,536 rows): readers
        # keep reading while the calling thread writes the previous batch and waits for its fsync.
        out: queue.Queue[pa.RecordBatch | BaseException | None] = queue.Queue(
            maxsize=max(2 * len(readers), 2 * batch_rows // pgcopy.ROWS_PER_BATCH)
        )
        stop = threading.Event()

        def put(item: pa.RecordBatch | BaseException | None) -> None:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def work(reader: cdc.SnapshotReader) -> None:
            try:
                while not stop.is_set():
                    try:
                        query = pieces.get_nowait()
                    except queue.Empty:
                        break
                    for batch in reader.batches(query):
                        if stop.is_set():
                            break  # closing the generator closes this mid-read connection
                        put(_typed(batch, schema))
            except BaseException as exc:  # handed to the consuming thread, which raises it
                put(exc)
            finally:
                put(None)

        threads = [
            threading.Thread(target=work, args=(r,), name=f"snapshot-{i}", daemon=True)
            for i, r in enumerate(readers)
        ]
        for thread in threads:
            thread.start()
        try:
            running, pending, rows = len(threads), [], 0
            while running:
                item = out.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                if not item.schema.equals(schema):  # a value did not fit: the writer nulls it
                    yield pa.Table.from_batches([item])
                    continue
                pending.append(item)
                rows += item.num_rows
                if rows >= batch_rows:
                    yield pa.Table.from_batches(pending, schema)
                    pending, rows = [], 0
            if pending:
                yield pa.Table.from_batches(pending, schema)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            # A reader stopped mid-read closed its connection: attach anew next time.
            self._attached = [r for r in self._attached if not r.closed]


class _SnapshotWrites:
    """Writes snapshot batches, up to ``SNAPSHOT_WRITES`` at once where the writer allows it
    (``concurrent_writes``: the lake, whose files are independent), else one by one in the
    calling thread. The parquet encoding of a batch is the longest step on the calling thread;
    two at once keep both cores busy while the readers finish. Counting happens on the calling
    thread, as each write completes."""

    def __init__(self, engine: Engine, report: SyncReport, generation: int) -> None:
        self.engine, self.report, self.generation = engine, report, generation
        self.parallel = SNAPSHOT_WRITES if engine.writer.concurrent_writes else 1
        self._pool = (
            ThreadPoolExecutor(self.parallel, thread_name_prefix="snapshot-write")
            if self.parallel > 1
            else None
        )
        self._pending: collections.deque[tuple[str, Future[WriteResult]]] = collections.deque()

    def __enter__(self) -> _SnapshotWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _write(self, raw: RawStream, table: pa.Table) -> WriteResult:
        return self.engine.writer.write(
            raw, table, sync_id=self.report.sync_id, generation_id=self.generation, state=None
        )

    def submit(self, raw: RawStream, stream: str, table: pa.Table) -> None:
        if self._pool is None:
            self.engine._count(self.report, stream, self._write(raw, table))
            return
        self._pending.append((stream, self._pool.submit(self._write, raw, table)))
        while len(self._pending) >= self.parallel:
            self._finish_oldest()

    def wait(self) -> None:
        while self._pending:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        stream, future = self._pending.popleft()
        self.engine._count(self.report, stream, future.result())


def _typed(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Cast a batch to the destination's Arrow types (int2 -> int64, numeric text -> decimal,
    ...), in the reader's thread. A column with a value that does not fit stays as it came, for
    the writer to null that value and record it (DESTINATION_TYPECAST_ERROR)."""
    arrays = []
    for target in schema:
        array = batch.column(target.name)
        if array.type != target.type:
            with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError):
                array = safe_cast(array, target.type)
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, names=schema.names)


def _new_generation(previous: Any = None) -> int:
    """A generation id greater than any earlier attempt's, including attempts that died before
    recording anything (their rows must not survive the next complete read): the wall clock in
    milliseconds, but past ``previous`` (the last generation the state recorded) if the clock
    has stepped back (NTP, a restored VM), or the older generation would outlive the new one."""
    return max(time.time_ns() // 1_000_000, int(previous or 0) + 1)


def _lock_run(conn: psycopg.Connection, name: str, slot: str) -> None:
    """Take the session-level advisory lock of the connection's slot on ``conn``: one run of a
    connection at a time per source database. Two runs at once would take each other's slot
    (a needless re-snapshot, phantom rows from overlapping snapshots). Waits up to
    :data:`RUN_LOCK_TIMEOUT` seconds, saying so, then fails naming the session holding it."""
    key = conn.execute("SELECT hashtextextended(%s, 0)", (f"stripe_platform:{slot}",)).fetchone()[0]
    if conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
        return
    log.warning(
        "connection %s: waiting up to %g s for another run of it to end (%s)",
        name,
        RUN_LOCK_TIMEOUT,
        _lock_holder(conn, key),
    )
    # lock_timeout bounds advisory lock waits too; 0 would mean "wait forever".
    conn.execute(f"SET lock_timeout = {max(1, int(RUN_LOCK_TIMEOUT * 1000))}")
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg.errors.LockNotAvailable:
        raise SyncError(
            f"connection {name}: another run of it still runs after {RUN_LOCK_TIMEOUT:g} s "
            f"({_lock_holder(conn, key)}); a `sync --follow` of it holds it until stopped: "
            "stop that first, or run again once it ends"
        ) from None
    finally:
        conn.execute("RESET lock_timeout")


def _lock_holder(conn: psycopg.Connection, key: int) -> str:
    """Who holds the advisory lock ``key``: its server process and client, as pg_locks and
    pg_stat_activity show them (a bigint key is split into classid, objid; objsubid 1)."""
    row = conn.execute(
        """SELECT l.pid, a.application_name, a.client_addr, a.backend_start
           FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND l.classid::int8 = (%(key)s::int8 >> 32) & 4294967295
             AND l.objid::int8 = %(key)s::int8 & 4294967295""",
        {"key": key},
    ).fetchone()
    if row is None:
        return "its holder has just ended"
    pid, application, client, since = row
    where = f" from {client}" if client else ""
    started = f", connected since {since:%Y-%m-%d %H:%M:%S %Z}" if since else ""
    return (
        f"held by PostgreSQL server process PID {pid}, {application or 'unnamed'}{where}{started}"
    )


def _wait_for_flush(conn: psycopg.Connection, timeout: float = 5.0) -> None:
    """Make a sync include every commit made before it started: with asynchronous commit the
    WAL writer flushes within a few hundred milliseconds, and only flushed WAL is decoded."""
    target = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]:
            return
        time.sleep(0.02)


def _toasted_values(
    conn: psycopg.Connection, raw: RawStream, table: str, changes: list[cdc.Change]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Current source values of rows whose update left a large (TOASTed) column unchanged:
    pgoutput does not resend it, and writing NULL would erase the stored value."""
    keys = {
        tuple(c.row.get(k) for k in raw.primary_key)
        for c in changes
        if c.op == "update" and any(v is UNCHANGED for v in c.row.values())
    }
    if not keys or not raw.primary_key:
        return {}
    columns = ", ".join(f'"{c.name}"' for c in raw.columns)
    key_list = ", ".join(f'"{k}"' for k in raw.primary_key)
    placeholders = ", ".join("(" + ", ".join(["%s"] * len(raw.primary_key)) + ")" for _ in keys)
    rows = _source_rows(
        conn,
        f"SELECT {columns} FROM public.{table} WHERE ({key_list}) IN ({placeholders})",
        [v for key in keys for v in key],
    )
    return {tuple(r[k] for k in raw.primary_key): r for r in rows}


def _source_rows(
    conn: psycopg.Connection, query: str, params: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    """Rows of a query on the source, typed exactly as change rows are: every column read as the
    server's text, in the settings change decoding uses, then ``pgoutput.convert_value`` (a value
    Python cannot hold, such as a BC date, stays text: no value can fail the read)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(cdc._SESSION_SETTINGS)  # DateStyle, UTC, float digits: pgoutput's text
        for oid in TYPED_OIDS:
            cur.adapters.register_loader(oid, TextLoader)
        cur.execute(query, params)
        described = [(d.name, d.type_code) for d in cur.description or ()]
        return [
            {n: convert_value(oid, v) for (n, oid), v in zip(described, row, strict=True)}
            for row in cur
        ]


def _change_table(
    raw: RawStream, changes: list[cdc.Change], current: dict[tuple[Any, ...], dict[str, Any]]
) -> pa.Table:
    """Change events as rows: new values for inserts/updates, the key plus a deletion time for
    deletes. Values become the arrays a snapshot reads (``pgvalues``), then take the destination's
    types as snapshot batches do (``_typed``): a value lands the same whichever path carried it."""
    rows = []
    for change in changes:
        values = change.row
        if any(v is UNCHANGED for v in values.values()):
            stored = current.get(tuple(values.get(k) for k in raw.primary_key), {})
            values = {k: (stored.get(k) if v is UNCHANGED else v) for k, v in values.items()}
        rows.append(values)
    schema = pa.schema([(c.name, ARROW[c.type]) for c in raw.columns])
    table = pa.Table.from_batches([_typed(pgvalues.table(raw.columns, rows), schema)])
    at = pa.timestamp("us", tz="UTC")
    return (
        table.append_column("_ab_cdc_lsn", pa.array([c.lsn for c in changes], pa.int64()))
        .append_column("_ab_cdc_updated_at", pa.array([c.commit_time for c in changes], at))
        .append_column(
            "_ab_cdc_deleted_at",
            pa.array([c.commit_time if c.op == "delete" else None for c in changes], at),
        )
    )


def _columnar_change_table(raw: RawStream, group: cdc.RelationChanges) -> pa.Table | None:
    """What :func:`_change_table` gives for the same changes, decoded a column at a time
    (``RelationChanges.text_columns``) and typed by Arrow in bulk (``pgvalues.from_text``): no
    Python per value. A column Arrow does not read as pgoutput's converters do (bytea, a value
    such as ``infinity``) is converted value by value as change rows are. None when the changes
    are not of the plain shape ``text_columns`` takes: the caller then decodes change by change."""
    decoded = group.text_columns()
    if decoded is None or not {c.name for c in raw.columns} <= decoded[1].keys():
        return None
    ops, texts = decoded
    oids = {c.name: c.type_oid for c in group.relation.columns}
    arrays = []
    for column in raw.columns:
        text, oid = texts[column.name], oids[column.name]
        array = pgvalues.from_text(text, oid, column.type)
        if array is None:
            array = pgvalues.column([convert_value(oid, v) for v in text.to_pylist()], column.type)
        arrays.append(array)
    schema = pa.schema([(c.name, ARROW[c.type]) for c in raw.columns])
    batch = pa.RecordBatch.from_arrays(arrays, names=[c.name for c in raw.columns])
    table = pa.Table.from_batches([_typed(batch, schema)])
    at = pa.timestamp("us", tz="UTC")
    committed = pa.array([commit_time for _, commit_time, _ in group.commits], at)
    deleted = pa.array(ops == ord("D"))
    return (
        table.append_column("_ab_cdc_lsn", pa.array(group.lsns, pa.int64()))
        .append_column("_ab_cdc_updated_at", committed)
        .append_column("_ab_cdc_deleted_at", pc.if_else(deleted, committed, pa.scalar(None, at)))
    )


def open_writer(settings: Settings, connection: ResolvedConnection) -> RawWriter:
    """Where a connection writes on the embedded engine: the lake for S3 connections, else the
    configured warehouse's raw layer."""
    from stripe_platform.lake.target import LakeRaw
    from stripe_platform.lake.writer import LakeWriter
    from stripe_platform.warehouse import open_raw_writer

    if connection.to_lake:
        return LakeRaw(LakeWriter.from_settings(settings), connection.connection.namespace)
    return open_raw_writer(settings)


def follow(
    settings: Settings,
    connection: ResolvedConnection,
    stop_event: threading.Event,
    interval: float = 0.2,
    *,
    writer: RawWriter | None = None,
    progress: Progress = lambda stream, rows: None,
) -> SyncReport:
    """Run a connection continuously until ``stop_event`` is set (see :meth:`Engine.follow`):
    change data lands within about ``interval`` seconds of its commit. ``writer`` defaults to
    the connection's destination (:func:`open_writer`)."""
    writer = writer if writer is not None else open_writer(settings, connection)
    return Engine(settings, connection, writer, progress).follow(stop_event, interval)


def run_sync(
    settings: Settings,
    connection: ResolvedConnection,
    writer: RawWriter,
    progress: Progress = lambda stream, rows: None,
) -> SyncReport:
    try:
        return Engine(settings, connection, writer, progress).sync()
    except SchemaChangeError as exc:
        raise SyncError(f"connection {connection.name}: {exc}") from exc
