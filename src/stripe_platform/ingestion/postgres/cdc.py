"""PostgreSQL change data capture for the embedded sync engine: publication and slot management,
a consistent initial snapshot, and polling of the slot's pgoutput stream.

psycopg 3 has no streaming-replication protocol, so changes are *peeked* with
``pg_logical_slot_peek_binary_changes`` and the slot is moved with ``pg_replication_slot_advance``
only after the destination has committed them (ARCHITECTURE §4-5). Until then every read returns
the same changes again, so a crash re-delivers and never loses anything.

Typical engine loop::

    ensure_publication(conn, "stripe_cdc", ["transaction", "merchant"])
    with consistent_snapshot(conninfo, "stripe_slot", "stripe_cdc", tables) as snap:
        for table in snap.tables:
            load(snap.rows(table))            # small tables; bulk reads take Arrow batches:
        with snap.attach() as reader:         # (one reader per thread, all in this snapshot)
            for batch in reader.batches(snap.arrow_query("transaction")):
                load(batch)
    while True:
        batch = read_changes(conn, "stripe_slot", "stripe_cdc", max_changes=10_000)
        merge(batch.changes)                  # idempotent on primary key, durable on return
        advance(conn, "stripe_slot", batch.resume_lsn)

Tables of the ``tables`` argument are names as SQL would read them (``"transaction"``,
``"public.merchant"``) or ``(schema, name)`` pairs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import pq, sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader

from stripe_platform.errors import PlatformError
from stripe_platform.ingestion.postgres import pgcopy
from stripe_platform.ingestion.postgres.pgoutput import (
    PG_EPOCH,
    TYPED_OIDS,
    Begin,
    Commit,
    Decoder,
    Relation,
    RowChange,
    Truncate,
    format_lsn,
    parse_lsn,
)

__all__ = [
    "CDCError",
    "Change",
    "ChangeBatch",
    "ColumnInfo",
    "PublicationNotFoundError",
    "RelationChanges",
    "ReplicaIdentityError",
    "SlotExistsError",
    "SlotInUseError",
    "SlotInfo",
    "SlotLostError",
    "SlotNotFoundError",
    "Snapshot",
    "SystemIdentity",
    "TableNotFoundError",
    "TableRef",
    "WalLevelError",
    "advance",
    "check_replica_identity",
    "check_wal_level",
    "consistent_snapshot",
    "drop_slot",
    "ensure_publication",
    "ensure_slot",
    "identify_system",
    "read_changes",
    "resolve_tables",
    "slot_info",
    "slot_info_when_free",
    "use_cdc_types",
]

PLUGIN: Final = "pgoutput"
PUBLISHED_ACTIONS: Final = "insert, update, delete, truncate"
DEFAULT_MAX_CHANGES: Final = 10_000
_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")
# The Python codecs for the server encodings pgoutput may send text in (it does not convert).
_PY_ENCODINGS: Final = {"UTF8": "utf-8", "SQL_ASCII": "ascii", "LATIN1": "latin-1"}

TableName = str | tuple[str, str]


# -- errors ----------------------------------------------------------------------------------------
class CDCError(PlatformError, RuntimeError):
    """Change data capture cannot proceed; the message names the slot/table and what to do."""


class WalLevelError(CDCError):
    """The server does not write logical WAL (wal_level is not 'logical')."""


class SlotNotFoundError(CDCError):
    """The replication slot does not exist (never created, dropped, or another database's)."""


class SlotExistsError(CDCError):
    """A slot to be created for a fresh snapshot already exists."""


class SlotInUseError(CDCError):
    """Another session is consuming the slot right now."""


class SlotLostError(CDCError):
    """The server invalidated the slot (WAL it needed was removed): re-snapshot."""


class PublicationNotFoundError(CDCError):
    """The publication does not exist (or did not exist where decoding starts)."""


class TableNotFoundError(CDCError):
    """A table to publish or snapshot does not exist."""


class ReplicaIdentityError(CDCError):
    """A table cannot be published: its UPDATEs/DELETEs would have no key to report."""


def _check_slot_name(slot: str) -> None:
    if not _SLOT_NAME.fullmatch(slot):
        raise ValueError(
            f"invalid replication slot name {slot!r}: use 1-63 lower-case letters, digits, '_'"
        )


# -- tables ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TableRef:
    oid: int
    schema: str
    name: str
    partitioned: bool

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


def resolve_tables(conn: psycopg.Connection, tables: Sequence[TableName]) -> list[TableRef]:
    """Resolve names the way SQL would (search_path, case folding) and require real tables."""
    refs: list[TableRef] = []
    for table in tables:
        text = sql.Identifier(*table).as_string(conn) if isinstance(table, tuple) else str(table)
        row = conn.execute(
            "SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
            (text,),
        ).fetchone()
        if row is None:
            raise TableNotFoundError(f"table {text!r} does not exist in database {_db(conn)!r}")
        oid, schema, name, relkind = row
        if relkind not in ("r", "p"):
            raise TableNotFoundError(f"{schema}.{name} is not a table (relkind {relkind!r})")
        refs.append(TableRef(oid, schema, name, relkind == "p"))
    return refs


def _db(conn: psycopg.Connection) -> str:
    return conn.info.dbname


def check_replica_identity(conn: psycopg.Connection, refs: Sequence[TableRef]) -> None:
    """Refuse tables (or partitions) whose UPDATE/DELETE could not be published.

    Once a table is in a publication, PostgreSQL rejects UPDATE and DELETE on it unless it has a
    replica identity: publishing such a table would break the application, not just CDC.
    """
    for ref in refs:
        rows = conn.execute(
            """SELECT c.oid::regclass::text, c.relreplident,
                      EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                      EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
               FROM pg_class c
               WHERE c.oid = %(oid)s
                  OR c.oid IN (SELECT relid FROM pg_partition_tree(%(oid)s::regclass))""",
            {"oid": ref.oid},
        ).fetchall()
        for relname, ident, has_pk, has_index in rows:
            ok = ident == "f" or (ident == "d" and has_pk) or (ident == "i" and has_index)
            if not ok:
                raise ReplicaIdentityError(
                    f"table {relname} (publishing {ref.qualified}) has no usable replica "
                    f"identity (relreplident={ident!r}): its UPDATE/DELETE would fail once "
                    f"published and CDC could not key them. Add a primary key or run "
                    f"ALTER TABLE {relname} REPLICA IDENTITY FULL."
                )


# -- publication and slot --------------------------------------------------------------------------
def check_wal_level(conn: psycopg.Connection, slot: str | None = None) -> None:
    level = conn.execute("SELECT current_setting('wal_level')").fetchone()[0]  # type: ignore[index]
    if level != "logical":
        what = f"replication slot {slot!r}" if slot else "logical replication slots"
        raise WalLevelError(
            f"wal_level is {level!r} on this server, so {what} cannot decode changes: set "
            "wal_level = logical (postgresql.conf or ALTER SYSTEM) and restart PostgreSQL."
        )


def ensure_publication(
    conn: psycopg.Connection, name: str, tables: Sequence[TableName]
) -> list[TableRef]:
    """Make publication ``name`` cover exactly ``tables``, all actions, partitioned tables
    reported under their root (``publish_via_partition_root``). Idempotent.

    Create it before the slot: pgoutput reads publications as of the WAL position it decodes,
    so a slot that starts before the publication existed fails with "publication does not
    exist".
    """
    refs = resolve_tables(conn, tables)
    if not refs:
        raise ValueError(f"publication {name!r}: no tables given")
    check_replica_identity(conn, refs)
    ident = sql.Identifier(name)
    targets = sql.SQL(", ").join(r.identifier for r in refs)
    options = sql.SQL("publish = {}, publish_via_partition_root = true").format(
        sql.Literal(PUBLISHED_ACTIONS)
    )
    row = conn.execute(
        "SELECT oid, puballtables, pubinsert AND pubupdate AND pubdelete AND pubtruncate, "
        "pubviaroot FROM pg_publication WHERE pubname = %s",
        (name,),
    ).fetchone()
    if row is None:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH ({})").format(ident, targets, options)
        )
        return refs
    pub_oid, all_tables, all_actions, via_root = row
    if all_tables:
        raise CDCError(f"publication {name!r} is FOR ALL TABLES; refusing to narrow it")
    current = {
        r[0]
        for r in conn.execute(
            "SELECT prrelid FROM pg_publication_rel WHERE prpubid = %s", (pub_oid,)
        )
    }
    has_schemas = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_publication_namespace WHERE pnpubid = %s)", (pub_oid,)
    ).fetchone()[0]  # type: ignore[index]
    if current != {r.oid for r in refs} or has_schemas:
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(ident, targets))
    if not (all_actions and via_root):
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET ({})").format(ident, options))
    return refs


@dataclass(frozen=True, slots=True)
class SlotInfo:
    name: str
    plugin: str | None
    database: str | None
    active_pid: int | None
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    wal_status: str | None


class SystemIdentity(NamedTuple):
    """Which PostgreSQL history a position belongs to (``IDENTIFY_SYSTEM``): LSNs compare only
    within one system (``system_id``, new for every ``initdb``; a restore or a physical copy
    keeps it) and one timeline (new at every promotion: failover, point-in-time recovery)."""

    system_id: str
    timeline: int


def _identify(repl: pq.PGconn, what: str) -> SystemIdentity:
    result = repl.exec_(b"IDENTIFY_SYSTEM")
    if result.status != pq.ExecStatus.TUPLES_OK:
        message = (result.get_error_message() or "").strip()
        raise CDCError(f"{what}: IDENTIFY_SYSTEM failed: {message}")
    fields = {result.fname(i): result.get_value(0, i) for i in range(result.nfields)}
    return SystemIdentity(
        (fields[b"systemid"] or b"").decode(), int((fields[b"timeline"] or b"0").decode())
    )


def identify_system(conninfo: str, slot: str) -> SystemIdentity:
    """The server's identity, over a replication connection of its own (closed on return)."""
    repl = _replication_connect(conninfo, slot)
    try:
        return _identify(repl, f"slot {slot!r}")
    finally:
        repl.finish()


def _lsn_or_none(text: str | None) -> int | None:
    return None if text is None else parse_lsn(text)


def slot_info(conn: psycopg.Connection, slot: str) -> SlotInfo | None:
    row = conn.execute(
        "SELECT slot_name, plugin, database, active_pid, restart_lsn::text, "
        "confirmed_flush_lsn::text, wal_status FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    name, plugin, database, pid, restart, confirmed, wal_status = row
    return SlotInfo(
        name, plugin, database, pid, _lsn_or_none(restart), _lsn_or_none(confirmed), wal_status
    )


def slot_info_when_free(
    conn: psycopg.Connection, slot: str, timeout: float = 10.0
) -> SlotInfo | None:
    """:func:`slot_info` once no session holds the slot. A process killed while it held the
    slot (creating it, or mid-read) leaves it held until the server notices the closed
    connection, a moment later. :class:`SlotInUseError` if still held after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        info = slot_info(conn, slot)
        if info is None or info.active_pid is None:
            return info
        if time.monotonic() >= deadline:
            raise SlotInUseError(
                f"replication slot {slot!r} is in use by the process with PID "
                f"{info.active_pid}: is another sync of this connection running?"
            )
        time.sleep(0.05)


def ensure_slot(conn: psycopg.Connection, slot: str) -> SlotInfo:
    """Create logical slot ``slot`` (pgoutput) in ``conn``'s database unless it exists. Idempotent.

    A slot made this way has no snapshot to go with it: use :func:`consistent_snapshot` for the
    first sync of tables that already hold rows.
    """
    _check_slot_name(slot)
    info = slot_info(conn, slot)
    if info is None:
        check_wal_level(conn, slot)
        # Created concurrently? Then it is validated below like any existing slot.
        with contextlib.suppress(psycopg.errors.DuplicateObject):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (slot, PLUGIN))
        info = slot_info(conn, slot)
        assert info is not None
    _validate_slot(conn, info)
    return info


def _validate_slot(conn: psycopg.Connection, info: SlotInfo) -> None:
    if info.plugin != PLUGIN:
        raise CDCError(
            f"replication slot {info.name!r} exists but is not a logical {PLUGIN} slot "
            f"(plugin {info.plugin!r}); drop it or choose another name"
        )
    if info.database != _db(conn):
        raise SlotNotFoundError(
            f"replication slot {info.name!r} belongs to database {info.database!r}, not "
            f"{_db(conn)!r}: slots decode only their own database"
        )
    if info.wal_status == "lost":
        raise SlotLostError(
            f"replication slot {info.name!r} was invalidated (the WAL it needed is gone, see "
            "max_slot_wal_keep_size): drop it and take a new consistent snapshot"
        )


def drop_slot(conn: psycopg.Connection, slot: str, *, missing_ok: bool = True) -> bool:
    """Drop the slot; an abandoned slot retains WAL forever. Returns whether it existed."""
    try:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    except psycopg.errors.UndefinedObject:
        if missing_ok:
            return False
        raise SlotNotFoundError(f"replication slot {slot!r} does not exist") from None
    except psycopg.errors.ObjectInUse as exc:
        raise SlotInUseError(f"replication slot {slot!r} is in use: {exc}") from exc
    return True


# -- changes ---------------------------------------------------------------------------------------
Operation = Literal["insert", "update", "delete", "truncate"]


class Change(NamedTuple):
    """One row change (or one truncated table) of a committed transaction.

    An immutable NamedTuple rather than a frozen dataclass: one is built per change on the hot
    path, where a frozen dataclass costs about four times more to construct.
    """

    op: Operation
    schema: str
    table: str
    row: dict[str, Any]
    """insert/update: the new row; delete: the key columns (the whole old row with REPLICA
    IDENTITY FULL); truncate: empty. Unchanged TOASTed columns of an update hold
    ``pgoutput.UNCHANGED``: keep the stored value."""
    old: dict[str, Any] | None
    """update only: the old key when it changed (or the old row with REPLICA IDENTITY FULL)."""
    key: tuple[str, ...]
    """The table's replica-identity columns: the primary key by default, every column under
    REPLICA IDENTITY FULL."""
    lsn: int
    """WAL position of this change (orders changes inside a transaction)."""
    commit_lsn: int
    commit_time: dt.datetime
    xid: int


@dataclass(frozen=True, slots=True)
class RelationChanges:
    """Row changes (inserts, updates, deletes) of one relation, in commit order, as pgoutput sent
    them (``read_changes(..., columnar=True)``): decoded a column at a time
    (:meth:`text_columns`), or a change at a time (:meth:`changes`) where that does not apply.
    A relation redefined within a batch (a column added) has a group per definition."""

    relation: Relation
    encoding: str
    messages: list[bytes] = field(default_factory=list)
    lsns: list[int] = field(default_factory=list)
    # per change: (commit LSN, commit time, xid) of its transaction, shared by its changes
    commits: list[tuple[int, dt.datetime, int]] = field(default_factory=list)

    def changes(self) -> list[Change]:
        """The changes as :func:`read_changes` returns them without ``columnar``."""
        decoder = Decoder(self.encoding)
        decoder.relations[self.relation.oid] = self.relation
        out = []
        for data, lsn, (commit_lsn, commit_time, xid) in zip(
            self.messages, self.lsns, self.commits, strict=True
        ):
            op, rel, row, old = decoder.decode_change(data)  # type: ignore[misc]
            out.append(
                Change(
                    op,
                    rel.namespace,
                    rel.name,
                    row,
                    old,
                    rel.key_columns,
                    lsn,
                    commit_lsn,
                    commit_time,
                    xid,
                )
            )
        return out

    def text_columns(self) -> tuple[np.ndarray, dict[str, pa.StringArray]] | None:
        """Each change's operation (b"I", b"U" or b"D" as uint8) and, per column, the server's
        text of the new values (deletes: the key, other columns NULL), as Arrow string arrays,
        found by a compiled loop (``pgoutput_kernel``) with no per-value Python. None when a
        change is not of that plain shape (an update carrying its old key or row, an unchanged
        TOASTed value, a binary value, text not in UTF-8): :meth:`changes` then applies."""
        from stripe_platform.ingestion.postgres import pgcopy_kernel, pgoutput_kernel

        n, columns = len(self.messages), self.relation.column_names
        if self.encoding != "utf-8" or not n:
            return None
        sizes = np.fromiter((len(m) for m in self.messages), np.int64, n)
        ends = np.cumsum(sizes)
        starts = ends - sizes
        buf = np.frombuffer(b"".join(self.messages), np.uint8)
        ops, kinds_at_5 = buf[starts], buf[starts + 5]
        plain = np.where(
            ops == ord("D"), np.isin(kinds_at_5, (ord("K"), ord("O"))), kinds_at_5 == ord("N")
        )
        if not plain.all():
            return None
        ncols = len(columns)
        kinds = np.zeros((ncols, n), np.uint8)
        at = np.zeros((ncols, n), np.int64)
        length = np.zeros((ncols, n), np.int64)
        if pgoutput_kernel.split_tuples(buf, starts, ends, ncols, kinds, at, length) != -1:
            return None
        if (kinds == pgoutput_kernel.UNCHANGED).any() or (kinds == pgoutput_kernel.BINARY).any():
            return None
        if int(length.sum(axis=1).max(initial=0)) >= 2**31:  # Arrow string offsets are int32
            return None
        texts = {}
        for j, name in enumerate(columns):
            valid = kinds[j] == pgoutput_kernel.TEXT
            offsets, data = pgcopy_kernel.gather(buf, at[j], length[j], n)
            validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
            array = pa.Array.from_buffers(
                pa.string(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(data)]
            )
            try:
                array.validate(full=True)  # UTF-8, as Arrow strings must be
            except pa.ArrowInvalid:
                return None
            texts[name] = array
        return ops, texts


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    changes: list[Change]
    """With ``columnar``: truncations only (row changes are in ``relations``)."""
    resume_lsn: int
    """Pass to :func:`advance` once ``changes`` are durable: every transaction that committed
    before it has been returned (in this batch or earlier)."""
    caught_up: bool
    """False when ``max_changes`` cut the read short: more is waiting, read again now."""
    transactions: int
    relations: list[RelationChanges] = field(default_factory=list)
    """With ``columnar``: the row changes, one group per relation (and definition)."""


_PRECHECK = sql.SQL(
    """SELECT current_setting('wal_level'), pg_current_wal_flush_lsn()::text,
              current_setting('server_encoding'),
              s.slot_name, s.plugin, s.database, s.active_pid, s.restart_lsn::text,
              s.confirmed_flush_lsn::text, s.wal_status,
              EXISTS (SELECT FROM pg_publication WHERE pubname = %(publication)s)
       FROM (SELECT) AS one
       LEFT JOIN pg_replication_slots s ON s.slot_name = %(slot)s"""
)
# Output functions run in this session while decoding: pin the settings that shape value text.
_SESSION_SETTINGS = (
    "SELECT set_config('datestyle', 'ISO, MDY', true), set_config('intervalstyle', 'postgres', "
    "true), set_config('bytea_output', 'hex', true), set_config('timezone', 'UTC', true), "
    "set_config('extra_float_digits', '1', true)"
)
_PEEK = (
    "SELECT (lsn - '0/0')::int8, data FROM pg_logical_slot_peek_binary_changes("
    "%s, %s::pg_lsn, %s::int4, 'proto_version', '1', 'publication_names', %s)"
)


def _map_error(exc: psycopg.Error, slot: str, publication: str) -> CDCError | None:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, psycopg.errors.ObjectInUse):
        return SlotInUseError(f"replication slot {slot!r} is in use by another session: {message}")
    if isinstance(exc, psycopg.errors.UndefinedObject) and "publication" in message:
        return PublicationNotFoundError(
            f"slot {slot!r}: {message}. The publication must exist at the slot's start "
            f"position: if {publication!r} was created after the slot, recreate the slot and "
            "take a new snapshot."
        )
    if isinstance(exc, psycopg.errors.UndefinedObject) and "slot" in message:
        return SlotNotFoundError(f"replication slot {slot!r} does not exist: {message}")
    return None


def read_changes(
    conn: psycopg.Connection,
    slot: str,
    publication: str,
    upto_lsn: int | str | None = None,
    max_changes: int = DEFAULT_MAX_CHANGES,
    *,
    convert: bool = True,
    columnar: bool = False,
) -> ChangeBatch:
    """Peek the next committed transactions from ``slot`` without consuming them.

    Only whole transactions are returned: the server stops decoding at a commit once about
    ``max_changes`` protocol messages are produced (a single larger transaction is returned
    whole, so the limit is soft), and any unfinished tail would be dropped. Calling again
    without :func:`advance` returns the same changes. ``upto_lsn`` bounds the read to
    transactions committed before it. With ``convert`` values are Python objects
    (:func:`pgoutput.convert_value`), else the server's text. With ``columnar`` the row
    changes come undecoded, grouped by relation (``ChangeBatch.relations``), for a reader that
    decodes them a column at a time (:meth:`RelationChanges.text_columns`).

    Only WAL already flushed is decoded: under ``synchronous_commit = off`` a commit becomes
    visible here after the WAL writer flushes it (at most 3 x wal_writer_delay). Each call
    decodes from the slot's restart_lsn, which the server moves only at its periodic
    running-transactions records (~15 s), so skipping confirmed transactions costs a little
    per call: drain a backlog with large batches.
    """
    _check_slot_name(slot)
    if max_changes < 1:
        raise ValueError("max_changes must be at least 1")
    upto = parse_lsn(upto_lsn) if isinstance(upto_lsn, str) else upto_lsn
    try:
        with conn.transaction():
            return _peek(conn, slot, publication, upto, max_changes, convert, columnar)
    except psycopg.Error as exc:
        mapped = _map_error(exc, slot, publication)
        if mapped is None:
            raise
        raise mapped from exc


def _peek(
    conn: psycopg.Connection,
    slot: str,
    publication: str,
    upto: int | None,
    max_changes: int,
    convert: bool,
    columnar: bool = False,
) -> ChangeBatch:
    pre = conn.execute(_PRECHECK, {"publication": publication, "slot": slot}).fetchone()
    assert pre is not None
    (wal_level, flush, encoding, name, plugin, database, pid, restart, confirmed, wal_status) = pre[
        :10
    ]
    if name is None:
        raise SlotNotFoundError(
            f"replication slot {slot!r} does not exist in database {_db(conn)!r}: create it "
            "with consistent_snapshot() (first sync) or ensure_slot()"
        )
    info = SlotInfo(
        name, plugin, database, pid, _lsn_or_none(restart), _lsn_or_none(confirmed), wal_status
    )
    _validate_slot(conn, info)
    if wal_level != "logical":
        check_wal_level(conn, slot)
    if not pre[10]:
        raise PublicationNotFoundError(
            f"publication {publication!r} does not exist in database {_db(conn)!r} (slot "
            f"{slot!r}): create it with ensure_publication()"
        )
    if pid is not None:
        raise SlotInUseError(f"replication slot {slot!r} is in use by the process with PID {pid}")
    # Everything committed before `bound` is decoded unless max_changes cuts the read short.
    bound = parse_lsn(flush) if upto is None else min(upto, parse_lsn(flush))
    start = info.confirmed_flush_lsn or 0
    if bound <= start:
        return ChangeBatch([], start, True, 0)
    conn.execute(_SESSION_SETTINGS)
    with conn.cursor(binary=True) as cursor:  # binary: bytea arrives as raw bytes
        rows = cursor.execute(_PEEK, (slot, format_lsn(bound), max_changes, publication)).fetchall()
    relations: list[RelationChanges] | None = [] if columnar else None
    changes, transactions, last_end, torn = _decode(
        rows, _py_encoding(encoding, slot), convert, relations
    )
    truncated = len(rows) >= max_changes or torn
    # Cut short: only up to the last returned commit is known complete; else up to `bound`.
    resume = max(start, last_end or 0) if truncated else max(bound, start, last_end or 0)
    return ChangeBatch(changes, resume, not truncated, transactions, relations or [])


def _py_encoding(server_encoding: str, slot: str) -> str:
    """pgoutput sends text in the database encoding, unconverted: decode it with that codec."""
    try:
        return _PY_ENCODINGS[server_encoding]
    except KeyError:
        raise CDCError(
            f"slot {slot!r}: database encoding {server_encoding} is not supported by the CDC "
            f"decoder (supported: {', '.join(_PY_ENCODINGS)})"
        ) from None


def _decode(
    rows: list[tuple[int, bytes]],
    encoding: str,
    convert: bool,
    relations: list[RelationChanges] | None = None,
) -> tuple[list[Change], int, int | None, bool]:
    """pgoutput rows -> changes of complete transactions, their count, the last end LSN, and
    whether an unfinished transaction was dropped at the end (the server emits whole
    transactions, so that would only follow a cut-short read; it is never returned).

    Given ``relations``, row changes are not decoded but appended there, grouped by relation
    (and its definition): only truncations are returned as changes."""
    decoder = Decoder(encoding)
    done: list[Change] = []
    pending: list[Change] = []
    append = pending.append
    # columnar: (group, message, lsn) of the open transaction; its commit info is added at COMMIT
    pending_rows: list[tuple[RelationChanges, bytes, int]] = []
    # relation OID -> the group of its current definition, and the Relation last checked for it
    groups: dict[int, tuple[RelationChanges, Relation]] = {}
    transactions = 0
    last_end: int | None = None
    commit_lsn, commit_time, xid = 0, PG_EPOCH, 0
    open_txn = False
    for lsn, data in rows:
        if relations is not None and data[:1] in (b"I", b"U", b"D"):
            relation = decoder.relation(int.from_bytes(data[1:5], "big"))
            group, known = groups.get(relation.oid, (None, None))
            # pgoutput sends a partitioned table's Relation again for each partition: the same
            # definition keeps its group (compared once per Relation message, not per change),
            # a new one (a column added) starts another
            if relation is not known:
                if group is None or group.relation != relation:
                    group = RelationChanges(relation, encoding)
                    relations.append(group)
                groups[relation.oid] = (group, relation)
            pending_rows.append((group, data, lsn))
            continue
        message = decoder.decode_change(data, convert=convert)
        if message.__class__ is RowChange:
            op, rel, row, old = message  # type: ignore[misc]
            append(
                Change(
                    op,
                    rel.namespace,
                    rel.name,
                    row,
                    old,
                    rel.key_columns,
                    lsn,
                    commit_lsn,
                    commit_time,
                    xid,
                )
            )
        elif isinstance(message, Begin):
            commit_lsn, commit_time, xid = message.final_lsn, message.commit_time, message.xid
            pending.clear()
            pending_rows.clear()
            open_txn = True
        elif isinstance(message, Commit):
            done.extend(pending)
            pending.clear()
            commit = (commit_lsn, commit_time, xid)
            for group, message_data, message_lsn in pending_rows:
                group.messages.append(message_data)
                group.lsns.append(message_lsn)
                group.commits.append(commit)
            pending_rows.clear()
            transactions += 1
            last_end = message.end_lsn
            open_txn = False
        elif isinstance(message, Truncate):
            for oid in message.relation_oids:
                rel = decoder.relation(oid)
                append(
                    Change(
                        "truncate",
                        rel.namespace,
                        rel.name,
                        {},
                        None,
                        rel.key_columns,
                        lsn,
                        commit_lsn,
                        commit_time,
                        xid,
                    )
                )
        # Relation/Type fill the decoder's caches; Origin/LogicalMessage carry nothing to sync.
    return done, transactions, last_end, open_txn


def advance(conn: psycopg.Connection, slot: str, lsn: int | str) -> int:
    """Confirm everything before ``lsn`` (normally a batch's ``resume_lsn``): those transactions
    will not be returned again. Call it only once the destination has committed them.
    Idempotent: a position at or behind the slot's is a no-op. Returns the slot's position.

    The slot's position is made durable by the server's next checkpoint: after a server crash it
    may step back, which re-delivers (harmless with merges on primary key).
    """
    _check_slot_name(slot)
    target = parse_lsn(lsn) if isinstance(lsn, str) else lsn
    info = slot_info(conn, slot)
    if info is None:
        raise SlotNotFoundError(f"replication slot {slot!r} does not exist; cannot advance it")
    _validate_slot(conn, info)
    current = info.confirmed_flush_lsn or 0
    if target <= current:
        return current
    try:
        row = conn.execute(
            "SELECT end_lsn::text FROM pg_replication_slot_advance(%s, %s::pg_lsn)",
            (slot, format_lsn(target)),
        ).fetchone()
    except psycopg.errors.ObjectInUse as exc:
        raise SlotInUseError(f"replication slot {slot!r} is in use; cannot advance it") from exc
    assert row is not None
    return parse_lsn(row[0])


# -- consistent snapshot ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    name: str
    type_oid: int


class Snapshot:
    """Tables as of the slot's start: exactly the transactions committed before ``lsn``.

    ``conn`` is a read-only REPEATABLE READ transaction that imported the snapshot exported by
    the slot's creation. Rows come with the same Python types as :func:`read_changes` values
    (numbers, timestamps, bytea, json typed; inet and all other types as text). Bulk reads go
    through :meth:`attach` (Arrow record batches, one reader connection per thread).
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        slot: str,
        publication: str,
        lsn: int,
        snapshot_name: str,
        tables: Sequence[TableRef],
        conninfo: str | None = None,
        identity: SystemIdentity | None = None,
    ) -> None:
        self.conn = conn
        self.slot = slot
        self.publication = publication
        self.lsn = lsn
        self.snapshot_name = snapshot_name
        self.tables = tuple(tables)
        self.conninfo = conninfo
        self.identity = identity  # the server (system, timeline) the slot was created on
        self._cursors = itertools.count()

    def table(self, table: TableName | TableRef) -> TableRef:
        if isinstance(table, TableRef):
            return table
        (ref,) = resolve_tables(self.conn, [table])
        return ref

    def columns(self, table: TableName | TableRef) -> list[ColumnInfo]:
        """The columns pgoutput publishes (not dropped, not generated), in table order."""
        ref = self.table(table)
        rows = self.conn.execute(
            "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
            "AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            (ref.oid,),
        ).fetchall()
        return [ColumnInfo(name, oid) for name, oid in rows]

    def _select(
        self, ref: TableRef, columns: Sequence[str] | None = None, *, arrow: bool = False
    ) -> sql.Composed:
        types = {c.name: c.type_oid for c in self.columns(ref)} if arrow or columns is None else {}
        names = list(types) if columns is None else list(columns)

        def column(name: str) -> sql.Composable:
            ident = sql.Identifier(name)
            if name not in types or types[name] in pgcopy.BINARY_OIDS or not arrow:
                return ident  # an unknown column is left for the server to report
            return sql.SQL("{}::text AS {}").format(ident, ident)

        cols = sql.SQL(", ").join(column(name) for name in names)
        only = sql.SQL("" if ref.partitioned else "ONLY ")  # partitions are read via the root
        return sql.SQL("SELECT {} FROM {}{}").format(cols, only, ref.identifier)

    def leaves(self, table: TableName | TableRef) -> list[tuple[TableRef, int]]:
        """Pieces to read a table in parallel: the leaf partitions of a partitioned table (each a
        plain table), else the table itself; with their size in bytes, largest first.

        Reading every leaf under this snapshot gives exactly the rows of the root under it.
        """
        ref = self.table(table)
        if not ref.partitioned:
            return [(ref, 0)]
        rows = self.conn.execute(
            "SELECT c.oid, n.nspname, c.relname, pg_relation_size(c.oid) "
            "FROM pg_partition_tree(%s::regclass) t JOIN pg_class c ON c.oid = t.relid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.isleaf AND c.relkind = 'r'",
            (ref.oid,),
        ).fetchall()
        leaves = [(TableRef(oid, schema, name, False), size) for oid, schema, name, size in rows]
        return sorted(leaves, key=lambda leaf: -leaf[1]) or [(ref, 0)]

    def arrow_query(self, table: TableName | TableRef, columns: Sequence[str] | None = None) -> str:
        """The SELECT that :meth:`SnapshotReader.batches` runs to read ``table`` as Arrow.

        Columns whose binary form the reader decodes to the value change rows carry
        (``pgcopy.BINARY_OIDS``; numeric and inet as the text the server would write) are read
        as they are; every other column as its text output, as pgoutput sends it (the type's
        output function): float4 its shortest decimal form (widening it to float8 would add
        digits), json the server's text, uuid and arrays their text.
        """
        return self._select(self.table(table), columns, arrow=True).as_string(self.conn)

    @contextmanager
    def attach(self) -> Iterator[SnapshotReader]:
        """Another connection reading this very snapshot (``SET TRANSACTION SNAPSHOT``) into
        Arrow, for parallel bulk reads: valid while the snapshot's block is open. Use one per
        thread; give it queries from :meth:`arrow_query`."""
        if self.conninfo is None:
            raise CDCError(f"slot {self.slot!r}: this snapshot has no conninfo to attach with")
        # Autocommit, so that psycopg sends no BEGIN of its own: the import must be the first
        # statement of the transaction opened here.
        # UTF8 whatever the database's encoding: the server converts text for the Arrow arrays.
        conn = psycopg.connect(self.conninfo, autocommit=True, client_encoding="UTF8")
        reader = SnapshotReader(conn)
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            conn.execute(
                sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot_name))
            )
            conn.execute(_SESSION_SETTINGS)  # shapes the text of the columns cast to text
            yield reader
        finally:
            reader.close()

    def rows(
        self, table: TableName | TableRef, *, batch_size: int = 10_000
    ) -> Iterator[dict[str, Any]]:
        """Stream a table's rows through a server-side cursor, ``batch_size`` rows at a time."""
        ref = self.table(table)
        name = f"cdc_snapshot_{next(self._cursors)}"
        with self.conn.cursor(name=name, row_factory=dict_row) as cur:
            cur.itersize = batch_size
            cur.execute(self._select(ref))
            yield from cur

    @contextmanager
    def copy(self, table: TableName | TableRef, *, binary: bool = True) -> Iterator[psycopg.Copy]:
        """``COPY (SELECT ...) TO STDOUT`` of a table, for bulk loaders (binary by default)."""
        ref = self.table(table)
        query = sql.SQL("COPY ({}) TO STDOUT (FORMAT {})").format(
            self._select(ref), sql.SQL("binary" if binary else "csv, HEADER")
        )
        with self.conn.cursor() as cur, cur.copy(query) as copy:
            yield copy


class SnapshotReader:
    """A connection inside a slot's exported snapshot that reads query results as Arrow record
    batches (:mod:`~stripe_platform.ingestion.postgres.pgcopy`: ``COPY ... (FORMAT binary)``
    decoded by a compiled loop, with no Python work per row). Made by :meth:`Snapshot.attach`."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.closed = False

    def batches(self, query: str) -> Iterator[pa.RecordBatch]:
        """Run ``query`` and stream its rows as record batches (up to 65,536 rows, about 7 MB of
        Transaction). Timestamps and dates at ±infinity come out as the bounds change rows use
        (``datetime.max``/``min``), inet as its text.

        If the consumer stops early (or the read fails) the connection is closed: it is no
        longer usable inside the snapshot.
        """
        finished = False
        try:
            yield from pgcopy.read_arrow(self.conn, query)
            finished = True
        finally:
            if not finished:
                self.close(interrupted=True)

    def close(self, *, interrupted: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if not interrupted:  # mid-COPY the connection takes no other command: just close it
            with contextlib.suppress(psycopg.Error):
                self.conn.execute("ROLLBACK")  # read-only: nothing to commit
        self.conn.close()


def use_cdc_types(conn: psycopg.Connection) -> None:
    """Make ``conn`` load values with the Python types change rows have: every type the CDC
    decoder keeps as text is loaded as text here too (psycopg would turn inet into ipaddress,
    arrays into lists, ...), so snapshot rows and change rows match. Also run
    ``SET TIME ZONE 'UTC'`` on it if timestamptz values should be in UTC like change rows."""
    for info in psycopg.postgres.types:
        for oid in (info.oid, info.array_oid):
            if oid and oid not in TYPED_OIDS:
                conn.adapters.register_loader(oid, TextLoader)


def _import_snapshot(conn: psycopg.Connection, snapshot_name: str) -> None:
    """Make ``conn``'s transaction read exactly the exported snapshot, typed like change rows."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    # Must be the transaction's first statement (psycopg has just sent BEGIN).
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
    conn.execute(_SESSION_SETTINGS)
    use_cdc_types(conn)


def _replication_connect(conninfo: str, slot: str) -> pq.PGconn:
    pgconn = pq.PGconn.connect(make_conninfo(conninfo, replication="database").encode())
    if pgconn.status != pq.ConnStatus.OK:
        message = pgconn.get_error_message()
        pgconn.finish()
        raise CDCError(f"slot {slot!r}: replication connection failed: {message}")
    return pgconn


def _create_slot_exporting_snapshot(repl: pq.PGconn, slot: str) -> tuple[int, str]:
    if repl.server_version >= 150000:
        command = f"CREATE_REPLICATION_SLOT {slot} LOGICAL {PLUGIN} (SNAPSHOT 'export')"
    else:
        command = f"CREATE_REPLICATION_SLOT {slot} LOGICAL {PLUGIN} EXPORT_SNAPSHOT"
    result = repl.exec_(command.encode())
    if result.status != pq.ExecStatus.TUPLES_OK:
        message = (result.get_error_message() or "").strip()
        sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
        if sqlstate == b"42710":
            raise SlotExistsError(f"replication slot {slot!r} already exists: {message}")
        if sqlstate == b"55000" and "wal_level" in message:
            raise WalLevelError(f"replication slot {slot!r}: {message}")
        raise CDCError(f"creating replication slot {slot!r} failed: {message}")
    fields = {result.fname(i): result.get_value(0, i) for i in range(result.nfields)}
    lsn = parse_lsn((fields[b"consistent_point"] or b"").decode())
    return lsn, (fields[b"snapshot_name"] or b"").decode()


@contextmanager
def consistent_snapshot(
    conninfo: str,
    slot: str,
    publication: str,
    tables: Sequence[TableName],
) -> Iterator[Snapshot]:
    """Create ``slot`` and read ``tables`` exactly as of the slot's start position.

    The slot is created over a ``replication=database`` connection with
    ``CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')``: PostgreSQL exports the very snapshot
    at which the slot becomes consistent, and it stays importable while that connection is
    idle. A second connection imports it (``SET TRANSACTION SNAPSHOT`` in REPEATABLE READ), so
    it sees every transaction committed before ``snap.lsn`` and none after, while the slot
    returns exactly the transactions committed from ``snap.lsn`` on: replaying the snapshot then
    :func:`read_changes` neither misses nor duplicates anything.

    The publication is ensured first (see :func:`ensure_publication`). The slot must not exist
    yet (:class:`SlotExistsError`). Creating it waits for transactions already running to end.
    If the block raises, the slot is dropped: its position means nothing without a complete
    snapshot, and keeping it would retain WAL.
    """
    _check_slot_name(slot)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        check_wal_level(admin, slot)
        if slot_info(admin, slot) is not None:
            raise SlotExistsError(
                f"replication slot {slot!r} already exists: resume it with read_changes(), or "
                "drop it to take a new snapshot"
            )
        refs = ensure_publication(admin, publication, tables)
        repl = _replication_connect(conninfo, slot)
        created = False
        try:
            # Before the slot: any later command on this connection would end the export.
            identity = _identify(repl, f"slot {slot!r}")
            lsn, snapshot_name = _create_slot_exporting_snapshot(repl, slot)
            created = True
            with psycopg.connect(conninfo) as conn:
                _import_snapshot(conn, snapshot_name)
                yield Snapshot(
                    conn, slot, publication, lsn, snapshot_name, refs, conninfo, identity
                )
                conn.rollback()  # read-only: nothing to commit
        except BaseException:
            repl.finish()
            if created:
                drop_slot(admin, slot)
            raise
        finally:
            repl.finish()
