"""The embedded engine's change source: a logical replication slot (pgoutput) on the platform's
PostgreSQL, read with ``ingestion.postgres.cdc`` (peek, then advance once durable).

``cdc.read_changes`` *peeks*: every read starts again at the slot's confirmed position, so until
:meth:`EmbeddedSource.checkpoint` it returns the changes already returned as well. The source
remembers how far it has returned (the last batch's ``resume_lsn``: every transaction committed
before it was returned) and drops what comes before, so :meth:`~EmbeddedSource.poll` returns each
change once per process. A new process (after a crash) starts from the confirmed position and is
given again everything not checkpointed: re-delivered, never lost.

When caught up, ``poll`` re-reads after a short sleep (``idle_sleep``, 5 ms): a commit is scored
within a few milliseconds of being flushed (the slot decodes flushed WAL only). It never sleeps
when a read was cut short (more is waiting).

``temporary=True`` (the API's follower) makes a temporary slot, bound to this source's session:
the server drops it when the session ends, so a process that dies holds no WAL. It starts at its
creation: create the source *before* warming the feature state from the database.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from stripe_platform.ingestion.postgres import cdc
from stripe_platform.ingestion.postgres.pgoutput import format_lsn, parse_lsn
from stripe_platform.streaming.changes import TABLES, Lag, Poll, Rejected, RowEvent

if TYPE_CHECKING:
    from stripe_platform.config import Settings

T = TypeVar("T")

DEFAULT_SLOT = "stripe_fraud_stream"
DEFAULT_PUBLICATION = "stripe_fraud_stream"
IDLE_SLEEP = 0.005  # seconds between reads when caught up: latency against idle load
# pgoutput messages that are not row changes, per transaction (BEGIN, COMMIT) and per read
# (RELATION, TYPE messages): added to the read limit so that re-read changes fit in it.
_PER_TRANSACTION = 2
_PER_READ = 16


class EmbeddedSource:
    """A :class:`~stripe_platform.streaming.changes.ChangeSource` over a replication slot of the
    platform's PostgreSQL (``settings``). Creates the publication over ``changes.TABLES``
    (partitioned tables under their root) and the slot if missing. One connection, not shared:
    use a source from one thread at a time."""

    name = "embedded"

    def __init__(
        self,
        settings: Settings,
        slot: str = DEFAULT_SLOT,
        publication: str = DEFAULT_PUBLICATION,
        temporary: bool = False,
        *,
        idle_sleep: float = IDLE_SLEEP,
    ) -> None:
        from stripe_platform.oltp import db

        self.settings = settings
        self.slot = slot
        self.publication = publication
        self.temporary = temporary
        self.idle_sleep = idle_sleep
        self._conn = db.connect(settings, autocommit=True, with_key=False)
        try:
            cdc.ensure_publication(self._conn, publication, TABLES)
            if temporary:
                self._create_temporary_slot()
            else:
                cdc.ensure_slot(self._conn, slot)
                # A predecessor killed mid-read holds the slot until the server notices.
                cdc.slot_info_when_free(self._conn, slot)
            info = cdc.slot_info(self._conn, slot)
            assert info is not None
        except BaseException:
            self._conn.close()
            raise
        # Everything before it was returned by this source (none yet: from the confirmed position).
        self._returned = info.confirmed_flush_lsn or 0
        self._confirmed = self._returned
        self._pending = 0  # protocol messages returned but not checkpointed (a re-read's length)

    def _create_temporary_slot(self) -> None:
        cdc._check_slot_name(self.slot)
        cdc.check_wal_level(self._conn, self.slot)
        try:
            self._conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, %s, true)", (self.slot, cdc.PLUGIN)
            )
        except psycopg.errors.DuplicateObject:
            raise cdc.SlotExistsError(
                f"replication slot {self.slot!r} already exists: a temporary slot needs a name "
                "of its own"
            ) from None

    # -- ChangeSource --------------------------------------------------------------------------
    def poll(self, max_events: int, timeout: float) -> Poll:
        """The changes committed after those already returned, whole transactions (more than
        ``max_events`` only when one transaction is larger), waiting up to ``timeout`` s."""
        deadline = time.monotonic() + max(timeout, 0.0)
        limit = max(int(max_events), 1)
        while True:
            batch = self._call(
                cdc.read_changes, self.slot, self.publication, max_changes=limit + self._pending
            )
            fresh = [c for c in batch.changes if c.commit_lsn >= self._returned]
            if fresh:
                return self._take(fresh, limit, batch)
            self._returned = max(self._returned, batch.resume_lsn)
            if not batch.caught_up:
                # The read held only changes returned before: read further at once.
                self._pending = self._pending * 2 + _PER_READ
                continue
            if time.monotonic() >= deadline:
                return Poll((), (), True)
            time.sleep(self.idle_sleep)

    def checkpoint(self) -> None:
        """Confirm everything returned so far: the slot will not give it again."""
        if self._returned > self._confirmed:
            self._confirmed = self._call(cdc.advance, self.slot, self._returned)
        self._pending = 0

    def lag(self) -> Lag:
        def read(conn: psycopg.Connection) -> tuple[int | None, str | None] | None:
            return conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8, "
                "confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot,),
            ).fetchone()

        row = self._call(read)
        if row is None:
            raise cdc.SlotNotFoundError(f"replication slot {self.slot!r} does not exist")
        lag_bytes, position = row
        return Lag(
            slot_lag_bytes=None if lag_bytes is None else int(lag_bytes),
            position=position,
            extra={"slot": self.slot, "returned": format_lsn(self._returned)},
        )

    def close(self) -> None:
        """Close the session (a temporary slot goes with it; a persistent one stays)."""
        self._conn.close()

    def drop(self) -> None:
        """Close and drop the slot (a persistent slot kept unread holds WAL forever)."""
        from stripe_platform.oltp import db

        self.close()
        if not self.temporary:
            with db.connect(self.settings, autocommit=True, with_key=False) as conn:
                cdc.slot_info_when_free(conn, self.slot)
                cdc.drop_slot(conn, self.slot)

    def __enter__(self) -> EmbeddedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _call(self, action: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``action(connection, ...)``, reconnecting once if the connection was lost (a server
        restart): a persistent slot and the positions are on the server, nothing is lost; the
        changes not checkpointed are returned again. A temporary slot went with its session."""
        from stripe_platform.oltp import db

        try:
            return action(self._conn, *args, **kwargs)
        except psycopg.OperationalError:
            if not self._conn.closed and not self._conn.broken:
                raise
            if self.temporary:
                raise cdc.SlotLostError(
                    f"temporary replication slot {self.slot!r} went with its lost connection: "
                    "start a new source (and warm the state again)"
                ) from None
        self._conn = db.connect(self.settings, autocommit=True, with_key=False)
        cdc.slot_info_when_free(self._conn, self.slot)
        return action(self._conn, *args, **kwargs)

    def _take(self, fresh: list[cdc.Change], limit: int, batch: cdc.ChangeBatch) -> Poll:
        """Whole transactions of ``fresh`` up to ``limit`` changes (at least one transaction),
        as a Poll; remembers where the next poll starts."""
        end = transactions = 0
        while end < len(fresh):
            nxt = end
            while nxt < len(fresh) and fresh[nxt].commit_lsn == fresh[end].commit_lsn:
                nxt += 1
            if transactions and nxt > limit:
                break
            end, transactions = nxt, transactions + 1
        if end < len(fresh):
            # Stop before a transaction: the server skips commits before a confirmed position
            # and returns those at it, so its commit LSN is where the next read starts.
            self._returned = fresh[end].commit_lsn
            caught_up = False
        else:
            self._returned = max(self._returned, batch.resume_lsn)
            caught_up = batch.caught_up
        taken = fresh[:end]
        self._pending += len(taken) + _PER_TRANSACTION * transactions
        events: list[RowEvent] = []
        rejected: list[Rejected] = []
        for c in taken:
            if c.op == "truncate":
                where = f"{c.table}@{format_lsn(c.lsn)}"
                rejected.append(
                    Rejected("embedded", where, "truncate", f"{c.schema}.{c.table} truncated")
                )
                continue
            events.append(RowEvent("embedded", c.table, c.op, c.row, c.lsn, c.commit_time))
        return Poll(events, rejected, caught_up)


def position(text: str) -> int:
    """A position as ``lag().position`` shows it, as an LSN (for tests and tools)."""
    return parse_lsn(text)
