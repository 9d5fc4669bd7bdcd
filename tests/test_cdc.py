"""PostgreSQL CDC: the pgoutput decoder (hand-made bytes and real traffic), the consistent
snapshot + change stream under concurrent writes, re-delivery until advance, and the errors."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import pq
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from stripe_platform.config import Settings
from stripe_platform.ingestion.postgres import cdc, pgoutput
from stripe_platform.ingestion.postgres.pgoutput import UNCHANGED
from stripe_platform.oltp import db

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_names)}"


@pytest.fixture
def dsn(settings: Settings, database: str) -> str:
    return db.conninfo(settings, database=database)


@pytest.fixture
def sync_conn(conn: psycopg.Connection) -> psycopg.Connection:
    """The test's connection, committing synchronously: the slot decodes only flushed WAL."""
    conn.execute("SET synchronous_commit = on")
    return conn


@pytest.fixture
def slot(conn: psycopg.Connection) -> Iterator[str]:
    """A cluster-unique slot name, dropped afterwards (an unconsumed slot retains WAL)."""
    name = unique("test_slot")
    yield name
    deadline = time.monotonic() + 10
    while True:  # a walsender that just disconnected may hold the slot for a moment
        try:
            cdc.drop_slot(conn, name)
            return
        except cdc.SlotInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def drain(conn: psycopg.Connection, slot: str, pub: str, **kw: Any) -> list[cdc.Change]:
    """Everything committed so far, then advance (as the engine does once its sink commits)."""
    out: list[cdc.Change] = []
    while True:
        batch = cdc.read_changes(conn, slot, pub, **kw)
        out.extend(batch.changes)
        cdc.advance(conn, slot, batch.resume_lsn)
        if batch.caught_up:
            return out


# -- the decoder on hand-made messages ---------------------------------------------------------
def _tuple(*cols: bytes | str | None) -> bytes:
    out = struct.pack("!h", len(cols))
    for col in cols:
        if col is None:
            out += b"n"
        elif col == "u":
            out += b"u"
        else:
            assert isinstance(col, bytes)
            out += b"t" + struct.pack("!i", len(col)) + col
    return out


def _relation(oid: int = 7) -> bytes:
    cols = [(1, b"id", 23), (0, b"name", 25), (0, b"amount", 1700)]
    body = b"".join(bytes([f]) + n + b"\x00" + struct.pack("!Ii", t, -1) for f, n, t in cols)
    return b"R" + struct.pack("!I", oid) + b"\x00items\x00d" + struct.pack("!h", 3) + body


def test_decoder_handles_every_message_kind() -> None:
    d = pgoutput.Decoder()
    ts = 86_400_000_000 + 5  # one day and 5 us after 2000-01-01
    begin = d.decode(b"B" + struct.pack("!QqI", 0x1_0000_00FF, ts, 42))
    assert begin == pgoutput.Begin(0x1_0000_00FF, dt.datetime(2000, 1, 2, 0, 0, 0, 5, dt.UTC), 42)
    assert begin.commit_time.tzinfo is dt.UTC
    commit = d.decode(b"C\x00" + struct.pack("!QQq", 10, 20, ts))
    assert commit == pgoutput.Commit(0, 10, 20, begin.commit_time)
    assert d.decode(b"O" + struct.pack("!Q", 99) + b"upstream\x00") == pgoutput.Origin(
        99, "upstream"
    )
    assert d.decode(b"Y" + struct.pack("!I", 5000) + b"public\x00mood\x00") == pgoutput.Type(
        5000, "public", "mood"
    )
    rel = d.decode(_relation())
    assert isinstance(rel, pgoutput.Relation)
    assert (rel.namespace, rel.name, rel.key_columns) == ("pg_catalog", "items", ("id",))
    assert d.relations[7] is rel

    ins = d.decode(b"I" + struct.pack("!I", 7) + b"N" + _tuple(b"1", "é".encode(), None))
    assert ins == pgoutput.Insert(7, ("1", "é", None))
    assert d.row(7, ins.new, convert=True) == {"id": 1, "name": "é", "amount": None}

    full = b"U" + struct.pack("!I", 7) + b"O" + _tuple(b"1", b"a", b"2.50")
    full += b"N" + _tuple(b"2", "u", b"3")
    upd = d.decode(full)
    assert upd == pgoutput.Update(7, ("2", UNCHANGED, "3"), ("1", "a", "2.50"), "O")
    fast = d.decode_change(full)
    assert isinstance(fast, pgoutput.RowChange)
    assert fast.row == {"id": 2, "name": UNCHANGED, "amount": Decimal(3)}
    assert fast.old == {"id": 1, "name": "a", "amount": Decimal("2.50")}
    plain = d.decode(b"U" + struct.pack("!I", 7) + b"N" + _tuple(b"3", b"b", None))
    assert plain == pgoutput.Update(7, ("3", "b", None), None, None)

    delete = b"D" + struct.pack("!I", 7) + b"K" + _tuple(b"3", None, None)
    assert d.decode(delete) == pgoutput.Delete(7, ("3", None, None), "K")
    assert d.decode_change(delete) == pgoutput.RowChange("delete", rel, {"id": 3}, None)

    trunc = d.decode(b"T" + struct.pack("!iB", 2, 3) + struct.pack("!II", 7, 8))
    assert trunc == pgoutput.Truncate((7, 8), cascade=True, restart_identity=True)
    msg = d.decode(b"M\x01" + struct.pack("!Q", 5) + b"app\x00" + struct.pack("!i", 2) + b"hi")
    assert msg == pgoutput.LogicalMessage(True, 5, "app", b"hi")

    with pytest.raises(pgoutput.DecodeError, match="unsupported"):
        d.decode(b"Z123")
    with pytest.raises(pgoutput.DecodeError, match="truncated"):
        d.decode(b"B\x00\x01")
    with pytest.raises(pgoutput.DecodeError, match="Relation message"):
        d.decode_change(b"I" + struct.pack("!I", 8) + b"N" + _tuple(b"1"))


def test_lsn_and_value_conversions() -> None:
    assert pgoutput.format_lsn(0x16_B374_D848) == "16/B374D848"
    assert pgoutput.parse_lsn("16/B374D848") == 0x16_B374_D848
    assert pgoutput.parse_lsn(pgoutput.format_lsn(0)) == 0
    with pytest.raises(ValueError):
        pgoutput.parse_lsn("nope")
    cv = pgoutput.convert_value
    assert cv(20, "9223372036854775807") == 2**63 - 1
    assert cv(21, "-3") == -3 and cv(23, "7") == 7
    assert cv(1700, "12345678901234567890.0123456789") == Decimal("12345678901234567890.0123456789")
    assert cv(1700, "NaN").is_nan()
    assert cv(701, "-Infinity") == float("-inf") and cv(700, "1.5") == 1.5
    assert cv(16, "t") is True and cv(16, "f") is False
    assert cv(25, "x") == "x" and cv(1043, "y") == "y" and cv(1042, "ab ") == "ab "
    assert cv(1184, "2025-09-08 22:49:21.808+00") == dt.datetime(
        2025, 9, 8, 22, 49, 21, 808000, dt.UTC
    )
    paris = cv(1184, "2025-09-09 00:49:21+02")
    assert paris == dt.datetime(2025, 9, 8, 22, 49, 21, tzinfo=dt.UTC) and paris.tzinfo == dt.UTC
    assert cv(1184, "infinity") == dt.datetime.max.replace(tzinfo=dt.UTC)
    assert cv(1114, "2025-01-02 03:04:05") == dt.datetime(2025, 1, 2, 3, 4, 5)
    assert cv(1082, "2024-02-29") == dt.date(2024, 2, 29)
    assert cv(17, "\\x00ff10") == b"\x00\xff\x10"
    assert cv(869, "10.0.0.1/8") == "10.0.0.1/8"
    assert cv(3802, '{"a": [1, 2.5, null]}') == '{"a": [1, 2.5, null]}'  # the server's text
    assert cv(114, '{"a": 1e400}') == '{"a": 1e400}'  # not re-written as Infinity
    assert cv(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").hex.startswith("a0eebc99")
    assert cv(600, "(1,2)") == "(1,2)"  # point: not converted
    assert cv(23, None) is None and cv(23, UNCHANGED) is UNCHANGED


# -- real traffic ----------------------------------------------------------------------------------
PROBE_DDL = """
CREATE TYPE cdc_mood AS ENUM ('calm', 'angry');
CREATE TABLE cdc_probe (
    id integer PRIMARY KEY, label text, amount numeric(20, 4), at timestamptz, blob bytea,
    mood cdc_mood, doc jsonb, ratio float8, ok boolean, born date, ip inet, big text
);
ALTER TABLE cdc_probe ALTER COLUMN big SET STORAGE EXTERNAL;  -- out of line, uncompressed
CREATE TABLE cdc_full (id integer, v text);
ALTER TABLE cdc_full REPLICA IDENTITY FULL;
"""


def test_every_message_type_from_real_traffic(
    loaded: psycopg.Connection, dsn: str, slot: str
) -> None:
    conn = loaded
    conn.execute("SET synchronous_commit = on")
    conn.execute(PROBE_DDL)
    pub = unique("pub")
    refs = cdc.ensure_publication(conn, pub, ["cdc_probe", "public.cdc_full", "Transaction"])
    assert [r.qualified for r in refs] == [
        "public.cdc_probe",
        "public.cdc_full",
        "public.transaction",
    ]
    assert refs[2].partitioned
    cdc.ensure_slot(conn, slot)
    origin = unique("origin")
    conn.execute("SELECT pg_replication_origin_create(%s)", (origin,))
    try:
        with psycopg.connect(dsn, autocommit=True) as replayer:
            replayer.execute("SET synchronous_commit = on")
            replayer.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
            with replayer.transaction():
                replayer.execute("SELECT pg_replication_origin_xact_setup('0/ABCDEF', now())")
                replayer.execute("INSERT INTO cdc_full VALUES (100, 'from elsewhere')")
            replayer.execute("SELECT pg_replication_origin_session_reset()")
    finally:
        conn.execute("SELECT pg_replication_origin_drop(%s)", (origin,))

    big = "x" * 5000
    at = dt.datetime(2025, 9, 8, 22, 49, 21, 808000, dt.UTC)
    with conn.transaction():
        conn.execute(
            "INSERT INTO cdc_probe VALUES (1, 'héllo', 12345.6789, %s, %s, 'angry', %s, 0.25, "
            "true, '2024-02-29', '192.168.1.7', %s)",
            (at, b"\x00\xffbin\\", json.dumps({"k": [1, "v"]}), big),
        )
        conn.execute("INSERT INTO cdc_probe (id) VALUES (2)")
    conn.execute("UPDATE cdc_probe SET label = 'changed' WHERE id = 1")  # big: unchanged TOAST
    conn.execute("UPDATE cdc_probe SET id = 3 WHERE id = 2")  # key change: old key sent
    conn.execute("UPDATE cdc_full SET v = 'new' WHERE id = 100")  # FULL: old row sent
    conn.execute("DELETE FROM cdc_full WHERE id = 100")
    conn.execute("DELETE FROM cdc_probe WHERE id = 1")
    tx_time = dt.datetime.combine(dt.date.today().replace(day=1), dt.time(12), dt.UTC)
    conn.execute(
        "INSERT INTO Transaction (TransactionStatusID, MerchantID, Amount, CurrencyID, "
        "PaymentMethodID, CustomerID, IPAddress, DateTime) VALUES (1, 3, 42.10, 1, 1, 12, "
        "'10.1.2.3', %s)",
        (tx_time,),
    )
    partition = conn.execute(
        "SELECT tableoid::regclass::text FROM Transaction WHERE Amount = 42.10 AND DateTime = %s",
        (tx_time,),
    ).fetchone()[0]
    assert partition != "transaction"  # the row lives in a partition...
    conn.execute("TRUNCATE cdc_probe")

    # Every protocol message kind shows up in the raw stream.
    rows = conn.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', "
        "'1', 'publication_names', %s)",
        (slot, pub),
    ).fetchall()
    decoder = pgoutput.Decoder()
    messages = [decoder.decode(r[0]) for r in rows]
    kinds = {type(m).__name__ for m in messages}
    assert kinds == {
        "Begin",
        "Commit",
        "Origin",
        "Relation",
        "Type",
        "Insert",
        "Update",
        "Delete",
        "Truncate",
    }
    assert any(isinstance(m, pgoutput.Type) and m.name == "cdc_mood" for m in messages)
    origin_msg = next(m for m in messages if isinstance(m, pgoutput.Origin))
    assert (origin_msg.name, origin_msg.commit_lsn) == (origin, 0xABCDEF)
    assert {m.old_kind for m in messages if isinstance(m, pgoutput.Update)} == {None, "K", "O"}
    assert {m.old_kind for m in messages if isinstance(m, pgoutput.Delete)} == {"K", "O"}

    changes = cdc.read_changes(conn, slot, pub).changes
    summary = [(c.op, c.table) for c in changes]
    assert summary == [
        ("insert", "cdc_full"),
        ("insert", "cdc_probe"),
        ("insert", "cdc_probe"),
        ("update", "cdc_probe"),
        ("update", "cdc_probe"),
        ("update", "cdc_full"),
        ("delete", "cdc_full"),
        ("delete", "cdc_probe"),
        ("insert", "transaction"),  # ...but is reported under the partitioned root
        ("truncate", "cdc_probe"),
    ]
    _full_ins, ins1, ins2, upd_toast, upd_key, upd_full, del_full, del_key, tx, trunc = changes
    assert ins1.row == {
        "id": 1,
        "label": "héllo",
        "amount": Decimal("12345.6789"),
        "at": at,
        "blob": b"\x00\xffbin\\",
        "mood": "angry",
        "doc": '{"k": [1, "v"]}',  # jsonb: the server's text
        "ratio": 0.25,
        "ok": True,
        "born": dt.date(2024, 2, 29),
        "ip": "192.168.1.7",
        "big": big,
    }
    assert ins1.row["at"].tzinfo == dt.UTC
    assert ins2.row == {"id": 2} | dict.fromkeys(list(ins1.row)[1:])  # NULLs are None
    assert ins1.commit_lsn == ins2.commit_lsn and ins1.lsn < ins2.lsn
    assert upd_toast.row["label"] == "changed" and upd_toast.row["big"] is UNCHANGED
    assert upd_toast.old is None and upd_toast.key == ("id",)
    assert upd_key.row["id"] == 3 and upd_key.old == {"id": 2}
    assert upd_full.old == {"id": 100, "v": "from elsewhere"} and upd_full.row["v"] == "new"
    assert del_full.row == {"id": 100, "v": "new"}
    assert del_key.row == {"id": 1}
    assert (tx.schema, tx.key) == ("public", ("id", "datetime"))
    assert tx.row["amount"] == Decimal("42.10") and tx.row["datetime"] == tx_time
    assert tx.row["ipaddress"] == "10.1.2.3"
    assert trunc.row == {} and trunc.schema == "public"
    commit_lsns = [c.commit_lsn for c in changes]
    assert commit_lsns == sorted(commit_lsns)
    now = dt.datetime.now(dt.UTC)
    assert all(now - dt.timedelta(minutes=1) < c.commit_time <= now for c in changes)
    text_row = cdc.read_changes(conn, slot, pub, convert=False).changes[1].row
    assert text_row["amount"] == "12345.6789" and text_row["blob"] == "\\x00ff62696e5c"


# -- snapshot + stream -----------------------------------------------------------------------------
class Writer(threading.Thread):
    """Small random transactions against Transaction (all partitions, moves between them) and
    Merchant, until stopped; the last commit is synchronous so all of it is flushed."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.ops: dict[str, int] = {"insert": 0, "update": 0, "delete": 0, "move": 0}
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(7)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as w:
                while not self.stop.is_set():
                    self._transaction(w, rng)
                w.execute("SET synchronous_commit = on")
                self._transaction(w, rng)
        except BaseException as exc:
            self.error = exc

    def _transaction(self, w: psycopg.Connection, rng: random.Random) -> None:
        pick = "(SELECT ID FROM Transaction ORDER BY random() LIMIT 1)"
        with w.transaction():
            for _ in range(rng.randint(1, 4)):
                op = rng.choice(["insert", "insert", "update", "delete", "move", "merchant"])
                if op == "insert":
                    when = dt.datetime.now(dt.UTC) - dt.timedelta(days=rng.randint(-400, 700))
                    w.execute(
                        "INSERT INTO Transaction (TransactionStatusID, MerchantID, Amount, "
                        "CurrencyID, PaymentMethodID, CustomerID, IPAddress, DateTime) "
                        "VALUES (1, %s, %s, 1, 1, 12, %s, %s)",
                        (rng.randint(3, 8), Decimal(rng.randint(1, 99999)) / 100, "10.0.0.9", when),
                    )
                elif op == "update":
                    w.execute(f"UPDATE Transaction SET Amount = Amount + 1 WHERE ID = {pick}")
                elif op == "delete":
                    w.execute(f"DELETE FROM Transaction WHERE ID = {pick}")
                elif op == "move":  # to another partition: a delete + insert under the root
                    w.execute(
                        f"UPDATE Transaction SET DateTime = DateTime - interval '45 days' "
                        f"WHERE ID = {pick}"
                    )
                else:
                    w.execute(
                        "UPDATE Merchant SET Rating = %s WHERE ID = %s",
                        (Decimal(rng.randint(0, 50)) / 10, rng.randint(3, 8)),
                    )
                self.ops["update" if op == "merchant" else op] += 1


def _key(change: cdc.Change, row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in change.key)


def test_snapshot_then_changes_equal_source_under_concurrent_writes(
    loaded: psycopg.Connection, dsn: str, slot: str
) -> None:
    conn = loaded
    pub = unique("pub")
    tables = ["transaction", "merchant"]
    keys = {"transaction": ("id", "datetime"), "merchant": ("id",)}
    before = set(conn.execute("SELECT ID, DateTime FROM Transaction").fetchall())
    writer = Writer(dsn)
    writer.start()
    try:
        time.sleep(0.3)
        state: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {t: {} for t in tables}
        with cdc.consistent_snapshot(dsn, slot, pub, tables) as snap:
            assert snap.slot == slot and snap.lsn > 0
            time.sleep(0.3)  # the writer keeps committing after the snapshot point...
            for table in tables:
                for row in snap.rows(table, batch_size=50):  # ...and while we read
                    state[table][tuple(row[k] for k in keys[table])] = row
            with snap.attach() as reader:  # bulk readers see exactly the same rows
                arrow_keys = {
                    (r["id"], r["datetime"])
                    for ref, _ in snap.leaves("transaction")
                    for batch in reader.batches(snap.arrow_query(ref, ["id", "datetime"]))
                    for r in batch.to_pylist()
                }
            assert arrow_keys == set(state["transaction"])
            with snap.copy("transaction") as copy:
                assert sum(len(chunk) for chunk in copy) > 0
        time.sleep(0.3)
    finally:
        writer.stop.set()
        writer.join(timeout=20)
    assert writer.error is None, writer.error
    assert all(writer.ops.values()), writer.ops
    target = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
    assert set(state["transaction"]) != before  # the snapshot saw some of the writes

    seen = {"insert": 0, "update": 0, "delete": 0}
    deadline = time.monotonic() + 20
    while True:
        batch = cdc.read_changes(conn, slot, pub, max_changes=200)
        for change in batch.changes:
            assert change.commit_lsn >= snap.lsn
            rows = state[change.table]
            key = _key(change, change.row)
            seen[change.op] += 1
            if change.op == "insert":
                assert key not in rows, f"duplicate: {change}"  # already in the snapshot
                rows[key] = change.row
            elif change.op == "update":
                old_key = key if change.old is None else _key(change, change.old)
                assert old_key in rows, f"missed: {change}"
                merged = rows.pop(old_key)
                merged.update({k: v for k, v in change.row.items() if v is not UNCHANGED})
                rows[key] = merged
            else:
                assert change.op == "delete"
                assert rows.pop(key, None) is not None, f"missed: {change}"
        cdc.advance(conn, slot, batch.resume_lsn)
        if batch.caught_up and batch.resume_lsn >= pgoutput.parse_lsn(target):
            break
        assert time.monotonic() < deadline, "the slot never caught up"
    assert all(seen.values()), seen

    with psycopg.connect(dsn) as check:
        cdc.use_cdc_types(check)
        check.execute("SET TIME ZONE 'UTC'")
        for table in tables:
            with check.cursor(row_factory=dict_row) as cur:
                source = {
                    tuple(r[k] for k in keys[table]): r
                    for r in cur.execute(f"SELECT * FROM {table}")
                }
            assert state[table] == source, table
            for key, row in source.items():  # same Python types both ways, not just equal
                assert {k: type(v) for k, v in state[table][key].items()} == {
                    k: type(v) for k, v in row.items()
                }


def test_snapshot_slot_is_dropped_when_the_block_fails(
    sync_conn: psycopg.Connection, dsn: str, slot: str
) -> None:
    sync_conn.execute("CREATE TABLE snap_t (id int PRIMARY KEY)")
    with (
        pytest.raises(RuntimeError, match="boom"),
        cdc.consistent_snapshot(dsn, slot, "snap_pub", ["snap_t"]),
    ):
        assert cdc.slot_info(sync_conn, slot) is not None
        raise RuntimeError("boom")
    assert cdc.slot_info(sync_conn, slot) is None
    with cdc.consistent_snapshot(dsn, slot, "snap_pub", ["snap_t"]) as snap:
        assert list(snap.rows("snap_t")) == []
    with (
        pytest.raises(cdc.SlotExistsError, match=slot),
        cdc.consistent_snapshot(dsn, slot, "snap_pub", ["snap_t"]),
    ):
        pass
    assert cdc.slot_info(sync_conn, slot) is not None  # an existing slot is never dropped


# -- delivery semantics ----------------------------------------------------------------------------
@pytest.fixture
def items(sync_conn: psycopg.Connection, slot: str) -> str:
    sync_conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    cdc.ensure_publication(sync_conn, "items_pub", ["items"])
    cdc.ensure_slot(sync_conn, slot)
    return "items_pub"


def test_redelivery_until_advanced(sync_conn: psycopg.Connection, slot: str, items: str) -> None:
    conn = sync_conn
    for i in range(3):
        conn.execute("INSERT INTO items VALUES (%s, 'v')", (i,))
    first = cdc.read_changes(conn, slot, items)
    assert [c.row["id"] for c in first.changes] == [0, 1, 2]
    assert first.transactions == 3 and first.caught_up
    again = cdc.read_changes(conn, slot, items)  # a crash before the sink committed
    assert again == first
    position = cdc.advance(conn, slot, first.resume_lsn)
    assert position == first.resume_lsn
    assert cdc.read_changes(conn, slot, items).changes == []
    assert cdc.advance(conn, slot, first.resume_lsn - 1) == position  # idempotent, no error
    conn.execute("UPDATE items SET v = 'w' WHERE id = 1")
    later = cdc.read_changes(conn, slot, items)
    assert [(c.op, c.row) for c in later.changes] == [("update", {"id": 1, "v": "w"})]
    assert cdc.slot_info(conn, slot).confirmed_flush_lsn == position  # peeking moved nothing


def test_batches_never_split_a_transaction(
    sync_conn: psycopg.Connection, slot: str, items: str
) -> None:
    conn = sync_conn
    conn.execute("INSERT INTO items SELECT g, 'a' FROM generate_series(1, 30) g")
    conn.execute("INSERT INTO items SELECT g, 'b' FROM generate_series(31, 60) g")
    first = cdc.read_changes(conn, slot, items, max_changes=5)
    assert (len(first.changes), first.transactions, first.caught_up) == (30, 1, False)
    assert {c.row["v"] for c in first.changes} == {"a"}
    bounded = cdc.read_changes(conn, slot, items, upto_lsn=first.resume_lsn)
    assert (bounded.changes, bounded.resume_lsn, bounded.caught_up) == (
        first.changes,
        first.resume_lsn,
        True,
    )
    cdc.advance(conn, slot, first.resume_lsn)
    second = cdc.read_changes(conn, slot, items, max_changes=5)
    assert (len(second.changes), second.transactions) == (30, 1)
    cdc.advance(conn, slot, second.resume_lsn)
    assert drain(conn, slot, items) == []


# -- setup and errors ------------------------------------------------------------------------------
def test_ensure_publication_is_idempotent_and_repairs(sync_conn: psycopg.Connection) -> None:
    conn = sync_conn
    conn.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    conn.execute("CREATE PUBLICATION p FOR TABLE a WITH (publish = 'insert')")
    for _ in range(2):
        cdc.ensure_publication(conn, "p", ["a", ("public", "b"), "transaction"])
        row = conn.execute(
            "SELECT pubviaroot, pubinsert AND pubupdate AND pubdelete AND pubtruncate, "
            "(SELECT array_agg(tablename::text ORDER BY tablename) FROM pg_publication_tables "
            " WHERE pubname = 'p') FROM pg_publication WHERE pubname = 'p'"
        ).fetchone()
        assert row == (True, True, ["a", "b", "transaction"])


def test_clear_errors(sync_conn: psycopg.Connection, dsn: str, slot: str, items: str) -> None:
    conn = sync_conn
    with pytest.raises(cdc.SlotNotFoundError, match="'no_such_slot' does not exist"):
        cdc.read_changes(conn, "no_such_slot", items)
    with pytest.raises(cdc.SlotNotFoundError, match="no_such_slot"):
        cdc.advance(conn, "no_such_slot", 1)
    with pytest.raises(cdc.PublicationNotFoundError, match="'no_such_pub'"):
        cdc.read_changes(conn, slot, "no_such_pub")
    with pytest.raises(ValueError, match="invalid replication slot name"):
        cdc.read_changes(conn, "Bad Name", items)
    conn.execute("CREATE TABLE keyless (v text)")
    with pytest.raises(cdc.ReplicaIdentityError, match="keyless"):
        cdc.ensure_publication(conn, "p2", ["keyless"])
    with pytest.raises(cdc.TableNotFoundError, match="missing_table"):
        cdc.ensure_publication(conn, "p2", ["missing_table"])

    # Slot in use: a walsender streaming from it holds it.
    stream = pq.PGconn.connect(make_conninfo(dsn, replication="database").encode())
    try:
        result = stream.exec_(
            f"START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1', "
            f"publication_names '{items}')".encode()
        )
        assert result.status == pq.ExecStatus.COPY_BOTH
        with pytest.raises(cdc.SlotInUseError, match=slot):
            cdc.read_changes(conn, slot, items)
    finally:
        stream.finish()


class _FakeConn:
    """Just enough of a connection for check_wal_level."""

    def execute(self, query: str) -> Any:
        return self

    def fetchone(self) -> tuple[str]:
        return ("replica",)


def test_wal_level_error_names_the_slot() -> None:
    with pytest.raises(cdc.WalLevelError, match=r"'stripe_slot'.*wal_level = logical"):
        cdc.check_wal_level(_FakeConn(), "stripe_slot")  # type: ignore[arg-type]


def test_snapshot_leaves_and_attached_arrow_readers(
    sync_conn: psycopg.Connection, dsn: str, slot: str
) -> None:
    """A partitioned table read leaf by leaf as Arrow record batches, from a second connection
    in the same snapshot (quoted newlines, NULL vs '', large values)."""
    sync_conn.execute(
        "CREATE TABLE parts (id int, part int, v text, PRIMARY KEY (id, part)) "
        "PARTITION BY LIST (part)"
    )
    for name, value in (("parts_a", 1), ("parts_b", 2), ("parts_c", 3)):
        sync_conn.execute(f"CREATE TABLE {name} PARTITION OF parts FOR VALUES IN ({value})")
    values = ["plain", 'a "quoted"\nmulti-line, value', None, "", "x" * 5000]
    rows = [(i, 1 + i % 2, values[i % len(values)]) for i in range(300)]
    with sync_conn.cursor() as cur:
        cur.executemany("INSERT INTO parts VALUES (%s, %s, %s)", rows)
    names = ["id", "part", "v"]
    got: list[tuple[Any, ...]] = []
    with cdc.consistent_snapshot(dsn, slot, unique("pub"), ["parts"]) as snap:
        sync_conn.execute("INSERT INTO parts VALUES (10000, 1, 'after the snapshot')")
        leaves = snap.leaves("parts")
        assert {ref.qualified for ref, _ in leaves} == {
            "public.parts_a",
            "public.parts_b",
            "public.parts_c",
        }
        assert [size for _, size in leaves] == sorted((s for _, s in leaves), reverse=True)
        assert snap.leaves("parts_a") == [(snap.table("parts_a"), 0)]  # a plain table: itself
        with snap.attach() as other:
            (settings,) = other.batches(
                "SELECT current_setting('transaction_isolation') AS iso, "
                "current_setting('transaction_read_only') AS ro, "
                "current_setting('TimeZone') AS tz"
            )
            assert settings.to_pylist() == [{"iso": "repeatable read", "ro": "on", "tz": "UTC"}]
            for ref, _ in leaves:
                for batch in other.batches(snap.arrow_query(ref, names)):
                    assert batch.schema.names == names
                    got += [(r["id"], r["part"], r["v"]) for r in batch.to_pylist()]
            with pytest.raises(psycopg.errors.UndefinedColumn, match="nope"):
                list(other.batches(snap.arrow_query("parts_a", ["nope"])))
            assert other.closed  # a failed read leaves no half-read connection behind
    assert sorted(got) == sorted(rows)


def test_every_column_type_lands_the_same_from_snapshot_and_changes(
    sync_conn: psycopg.Connection, dsn: str, slot: str
) -> None:
    """Rows of every column type, inserted once before the slot's snapshot and again (new ids)
    after it: typed for the destination, the snapshot's Arrow read and the change stream give
    identical values and types (±infinity included; json as the server's text)."""
    import pyarrow as pa

    from stripe_platform.ingestion.engine.sync import PG_TYPES, _change_table, _SnapshotReader
    from stripe_platform.rawlayer import Column, RawStream, prepare

    sync_conn.execute(
        "CREATE TABLE every_type (id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, num numeric, "
        "f4 float4, f8 float8, b bool, t text, vc varchar(10), bp char(5), ip inet, net cidr, "
        'u uuid, nm name, ch "char", ts timestamp, tstz timestamptz, d date, j json, jb jsonb, '
        "by bytea, arr int[], iv interval, o oid)"
    )
    rows = [
        "32767, -2147483648, 9223372036854775807, 12345.678901234, 1.1, 0.1, true, 'tëxt, \"q\"', "
        "'v', 'ab', '10.1.2.3/8', '10.0.0.0/8', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'nm', 'c', "
        "'2026-01-02 03:04:05.123456', '2026-01-02 03:04:05.123456+05', '2026-01-02', "
        """'{"a": [1, 2.50]}', '{"b": null, "a": "é"}', '\\x00ff', '{1,NULL,3}', """
        "'1 day 02:03:04', 42",
        ", ".join(["NULL"] * 24),
        "-32768, 0, -1, -0.000000001, 3.4e38, -1e-300, false, '', '', '', '::1', '::/0', "
        "'00000000-0000-0000-0000-000000000000', '', 'x', 'infinity', '-infinity', 'infinity', "
        """'[]', '{}', '\\x', '{}', '-1 mons', 0""",
        "1, 1, 1, 1, 1, 1, true, 'x', 'x', 'x', '1.1.1.1', '1.0.0.0/8', "
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'x', 'x', '-infinity', 'infinity', '-infinity', "
        """'1', '"s"', '\\x01', '{1}', '0', 1""",
        # json past a double's range: Python would re-write it as the non-JSON token Infinity
        "2, 2, 2, 2, 2, 2, false, 'y', 'y', 'y', '2.2.2.2', '2.0.0.0/8', "
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'y', 'y', '2026-01-01', '2026-01-01 00:00:00+00', "
        """'2026-01-01', '{"a": 1e400, "b": -1E400}', '{"a": 1e400}', '\\x02', '{2}', '1', 2""",
    ]
    for i, values in enumerate(rows):
        sync_conn.execute(f"INSERT INTO every_type VALUES ({i}, {values})")
    columns = tuple(
        Column(name, PG_TYPES.get(kind, "string"))
        for name, kind in sync_conn.execute(
            "SELECT attname, typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE attrelid = 'every_type'::regclass AND attnum > 0 ORDER BY attnum"
        )
    )
    raw = RawStream("raw", "every_type", columns, ("id",), mode="append_dedup", cdc="postgres")
    pub = unique("pub")
    with (
        cdc.consistent_snapshot(dsn, slot, pub, ["every_type"]) as snap,
        _SnapshotReader(snap, 2) as reader,
    ):
        snapshot = pa.concat_tables(reader.tables("every_type", columns))
    for i, values in enumerate(rows):
        sync_conn.execute(f"INSERT INTO every_type VALUES ({100 + i}, {values})")
    changes = drain(sync_conn, slot, pub)
    assert len(changes) == len(rows)

    def typed(table: pa.Table) -> tuple[pa.Schema, list[dict[str, Any]]]:
        out, nulled = prepare(raw, table, sync_id="s", generation_id=0)
        assert nulled == {}
        out = out.select([c.name for c in columns]).sort_by("id")
        return out.schema, [{**r, "id": r["id"] % 100} for r in out.to_pylist()]

    snapshot_schema, snapshot_rows = typed(snapshot)
    change_schema, change_rows = typed(_change_table(raw, changes, {}))
    assert snapshot_schema == change_schema
    assert snapshot_rows == change_rows  # json included: the server's text both ways
    assert (snapshot_rows[0]["j"], snapshot_rows[0]["jb"]) == (
        '{"a": [1, 2.50]}',
        '{"a": "é", "b": null}',
    )
    assert (snapshot_rows[4]["j"], snapshot_rows[4]["jb"]) == (
        '{"a": 1e400, "b": -1E400}',
        '{"a": 1' + "0" * 400 + "}",
    )
    assert snapshot_rows[2]["ts"] == dt.datetime.max  # infinity, as change rows have it
    assert snapshot_rows[2]["tstz"] == dt.datetime.min.replace(tzinfo=dt.UTC)
    assert (snapshot_rows[2]["d"], snapshot_rows[3]["d"]) == (dt.date.max, dt.date.min)
    assert snapshot_rows[2]["ip"] == "::1" and snapshot_rows[0]["ip"] == "10.1.2.3/8"


def test_inet_read_in_binary_form_gets_the_servers_text(dsn: str) -> None:
    """Snapshot readers format inet themselves (the server's own formatting is costly): the text
    must be inet_out's, including IPv6 zero runs, embedded IPv4 and masks."""
    import ipaddress

    from stripe_platform.ingestion.postgres import pgcopy

    rng = random.Random(7)
    values = [
        "1.2.3.4", "0.0.0.0/32", "255.255.255.255/0", "10.1.2.3/8", "::", "::1", "1::",
        "::ffff:1.2.3.4", "::1.2.3.4", "::0.0.0.1", "::ffff:0:0", "1:0:0:1:0:0:0:1",
        "1:0:0:0:1:0:0:1", "0:0:1::", "::ffff:1.2.3.4/100", "2001:db8::/32", "fe80::1/64",
        "::0:ffff:1.2.3.4", "::2:3:4", "::ffff:ffff:1.2.3.4",
    ]  # fmt: skip
    for _ in range(500):
        if rng.random() < 0.3:
            values.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        else:
            groups = [rng.choice([0, 0, 0, 1, 0xFFFF, rng.getrandbits(16)]) for _ in range(8)]
            address = ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups))
            mask = f"/{rng.randint(0, 128)}" if rng.random() < 0.3 else ""
            values.append(f"{address}{mask}")
    rows = ", ".join(f"('{v}'::inet)" for v in values)
    query = (
        f"SELECT v, abbrev(v) AS text, inet_send(v) AS wire FROM (VALUES {rows}, (NULL)) AS t (v)"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        (batch,) = pgcopy.read_arrow(conn, query)
    assert batch.column("v").to_pylist() == batch.column("text").to_pylist()
    # the formatting alone, on a slice of the binary values (an Arrow array with an offset)
    wire, text = batch.column("wire").slice(3, 40), batch.column("text").slice(3, 40)
    assert pgcopy._inet_text(wire) == text


def test_copy_reader_batches_errors_and_types_it_does_not_read(dsn: str) -> None:
    """The compiled COPY reader: rows split across batches keep their order, NULLs and values
    larger than its buffer; a server error in the middle of the COPY is psycopg's own error; a
    type it does not decode is refused up front, by name."""
    import pyarrow as pa

    from stripe_platform.ingestion.postgres import pgcopy

    query = (
        "SELECT i, CASE WHEN i % 3 = 0 THEN NULL ELSE i::int2 END AS small, "
        "CASE WHEN i % 5 = 0 THEN NULL ELSE repeat(chr(65 + i % 26), i % 7) END AS t, "
        "i % 2 = 0 AS even, CASE WHEN i % 4 = 0 THEN i END AS after_bool, "
        "i / 4.0::float8 AS f, date '2026-01-01' + i AS d, "
        "CASE WHEN i = 700 THEN repeat('x', 3000000) END AS big "
        "FROM generate_series(-1000, 1000) AS i"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        batches = list(pgcopy.read_arrow(conn, query, rows_per_batch=300))
        expected = conn.execute(query).fetchall()
        assert [b.num_rows for b in batches] == [300] * 6 + [201]
        got = [tuple(row.values()) for b in batches for row in b.to_pylist()]
        assert got == [tuple(row) for row in expected]
        # wide values end a batch early: the 3 MB one closes its own
        by_bytes = list(pgcopy.read_arrow(conn, query, bytes_per_batch=1 << 20))
        assert [b.num_rows for b in by_bytes] == [1701, 300]
        assert pa.Table.from_batches(by_bytes).equals(pa.Table.from_batches(batches))
        numerics = [
            "0", "0.00", "-0.5", "1", "10000", "9999.9999", "-12345.678901234", "0.000000001",
            "1e30", "-1e-30", "123456789012345678901234567890.123456789", "0.1000", "'NaN'",
            "'Infinity'", "'-Infinity'", "1.5::numeric(10, 4)", "100::numeric(5, 0)", "NULL",
        ]  # fmt: skip
        rng = random.Random(11)
        for _ in range(500):  # random digits around the point, scales and signs
            whole = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 25))) or "0"
            fraction = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 25)))
            numerics.append(f"{rng.choice(['', '-'])}{whole}.{fraction}e{rng.randint(-12, 12)}")
        values = ", ".join(f"({v}::numeric)" if "::" not in v else f"({v})" for v in numerics)
        (numeric,) = pgcopy.read_arrow(
            conn, f"SELECT v, v::text AS t FROM (VALUES {values}) AS x (v)"
        )
        assert numeric.column("v").to_pylist() == numeric.column("t").to_pylist()  # numeric_out's
        assert numeric.column("v").null_count == 1 and numeric.num_rows == len(numerics)
        with pytest.raises(psycopg.errors.DivisionByZero):
            list(
                pgcopy.read_arrow(conn, "SELECT 1 / (i - 150000) FROM generate_series(1, 200000) i")
            )
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(pgcopy.CopyReadError, match=r"u \(type oid 2950\)"):
            list(pgcopy.read_arrow(conn, "SELECT 1 AS i, gen_random_uuid() AS u"))
        assert conn.execute("SELECT 1").fetchone() == (1,)  # refused before any COPY started
    with psycopg.connect(dsn, autocommit=True) as conn:
        # PostgreSQL's last timestamp is past Arrow's last microsecond: it reads as Arrow's last
        # (outside years 1-9999, so writers null and record it; tests/test_values.py), not fatal.
        late = "SELECT 1 AS i, '294276-12-31 23:59:59'::timestamp AS late"
        (batch,) = pgcopy.read_arrow(conn, late)
        assert batch.column("late").cast(pa.int64()).to_pylist() == [2**63 - 1]
    with (
        psycopg.connect(dsn, autocommit=True, client_encoding="LATIN1") as conn,
        pytest.raises(pgcopy.CopyReadError, match="client_encoding=UTF8"),
    ):
        list(pgcopy.read_arrow(conn, "SELECT 'é' AS t"))


def test_a_snapshot_value_that_does_not_fit_is_nulled_not_fatal(
    sync_conn: psycopg.Connection, dsn: str, slot: str
) -> None:
    """numeric 'NaN' has no decimal: that value is nulled and recorded, the rest lands."""
    from decimal import Decimal

    import pyarrow as pa

    from stripe_platform.ingestion.engine.sync import _SnapshotReader
    from stripe_platform.rawlayer import Column, RawStream, prepare

    sync_conn.execute("CREATE TABLE odd (id int PRIMARY KEY, num numeric)")
    sync_conn.execute("INSERT INTO odd VALUES (1, 1.5), (2, 'NaN')")
    columns = (Column("id", "integer"), Column("num", "decimal"))
    with (
        cdc.consistent_snapshot(dsn, slot, unique("pub"), ["odd"]) as snap,
        _SnapshotReader(snap, 1) as reader,
    ):
        table = pa.concat_tables(reader.tables("odd", columns))
    typed, nulled = prepare(RawStream("raw", "odd", columns), table, sync_id="s", generation_id=0)
    assert nulled == {"num": 1}
    assert sorted(typed.select(["id", "num"]).to_pylist(), key=lambda r: r["id"]) == [
        {"id": 1, "num": Decimal("1.5")},
        {"id": 2, "num": None},
    ]
