"""The columnar change decoder (issue 24): pgoutput row changes decoded a column at a time
(``RelationChanges.text_columns``, ``pgoutput_kernel``) and typed by Arrow in bulk
(``pgvalues.from_text``) give exactly what the change-by-change decoder gives (``_change_table``),
on real traffic of every column type; the shapes it does not take (an update carrying its old
key or row, an unchanged TOASTed value, a malformed message) go change by change."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import psycopg
import pyarrow as pa
import pytest

from stripe_platform.ingestion.engine.sync import (
    PG_TYPES,
    _change_table,
    _columnar_change_table,
    _toasted_values,
)
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.rawlayer import Column, RawStream

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_names)}"


@pytest.fixture
def sync_conn(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("SET synchronous_commit = on")  # the slot decodes only flushed WAL
    return conn


@pytest.fixture
def slot(sync_conn: psycopg.Connection) -> Iterator[str]:
    name = unique("columnar_slot")
    sync_conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    yield name
    deadline = time.monotonic() + 10
    while True:
        try:
            cdc.drop_slot(sync_conn, name)
            return
        except cdc.SlotInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def raw_stream(conn: psycopg.Connection, table: str) -> RawStream:
    columns = tuple(
        Column(name, PG_TYPES.get(kind, "string"))
        for name, kind in conn.execute(
            "SELECT attname, typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (table,),
        )
    )
    return RawStream("raw", table, columns, ("id",), mode="append_dedup", cdc="postgres")


def both_ways(
    conn: psycopg.Connection, slot: str, pub: str, raw: RawStream
) -> tuple[list[cdc.RelationChanges], pa.Table]:
    """The slot's changes of ``raw``'s table (peeked, not consumed) as the columnar reader's
    groups, and as the table the change-by-change reader's changes make."""
    columnar = cdc.read_changes(conn, slot, pub, max_changes=100_000, columnar=True)
    rows = cdc.read_changes(conn, slot, pub, max_changes=100_000)
    assert columnar.resume_lsn == rows.resume_lsn and columnar.caught_up
    groups = [g for g in columnar.relations if g.relation.name == raw.name]
    changes = [c for c in rows.changes if c.op != "truncate" and c.table == raw.name]
    assert sum(len(g.messages) for g in groups) == len(changes) > 0
    return groups, _change_table(raw, changes, _toasted_values(conn, raw, raw.name, changes))


ROWS = [  # every column type of test_cdc's every_type table, ±infinity and bytea included
    "32767, -2147483648, 9223372036854775807, 12345.678901234, 1.1, 0.1, true, 'tëxt, \"q\"', "
    "'v', 'ab', '10.1.2.3/8', '10.0.0.0/8', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'nm', 'c', "
    "'2026-01-02 03:04:05.123456', '2026-01-02 03:04:05.123456+05', '2026-01-02', "
    """'{"a": [1, 2.50]}', '{"b": null, "a": "é"}', '\\x00ff', '{1,NULL,3}', """
    "'1 day 02:03:04', 42",
    ", ".join(["NULL"] * 24),
    "-32768, 0, -1, -0.000000001, 3.4e38, -1e-300, false, '', '', '', '::1', '::/0', "
    "'00000000-0000-0000-0000-000000000000', '', 'x', 'infinity', '-infinity', 'infinity', "
    """'[]', '{}', '\\x', '{}', '-1 mons', 0""",
    "2, 2, 2, 'NaN', 'Infinity', '-Infinity', false, '日本', 'y', 'y', '2.2.2.2', '2.0.0.0/8', "
    "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'y', 'y', '0900-01-01 00:00:00', "
    "'1999-12-31 23:59:59.999999+00', '0001-01-01', "
    """'{"a": 1e400, "b": -1E400}', '{"a": 1e400}', '\\x02', '{2}', '1', 2""",
]


def test_every_column_type_decodes_the_same_a_column_at_a_time(
    sync_conn: psycopg.Connection, slot: str
) -> None:
    table, pub = unique("columnar_types"), unique("pub")
    sync_conn.execute(
        f"CREATE TABLE {table} (id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, num numeric, "
        "f4 float4, f8 float8, b bool, t text, vc varchar(10), bp char(5), ip inet, net cidr, "
        'u uuid, nm name, ch "char", ts timestamp, tstz timestamptz, d date, j json, jb jsonb, '
        "by bytea, arr int[], iv interval, o oid)"
    )
    cdc.ensure_publication(sync_conn, pub, [table])
    for i, values in enumerate(ROWS):
        sync_conn.execute(f"INSERT INTO {table} VALUES ({i}, {values})")
    sync_conn.execute(f"UPDATE {table} SET t = 'changed', f8 = 2.5 WHERE id IN (0, 2)")
    sync_conn.execute(f"DELETE FROM {table} WHERE id = 3")
    raw = raw_stream(sync_conn, table)
    groups, expected = both_ways(sync_conn, slot, pub, raw)
    assert [g.relation.name for g in groups] == [table]
    (group,) = groups
    assert group.text_columns() is not None  # the plain shape: decoded a column at a time
    got = _columnar_change_table(raw, group)
    assert got is not None
    assert got.schema == expected.schema
    assert got.to_pylist() == expected.to_pylist()
    assert got.equals(expected)
    assert got.column("_ab_cdc_deleted_at").null_count == 6  # 4 inserts, 2 updates, a delete
    assert got.column("t").to_pylist()[-3:-1] == ["changed", "changed"]


def test_shapes_it_does_not_take_go_change_by_change(
    sync_conn: psycopg.Connection, slot: str
) -> None:
    """An update of the primary key (its old key sent), REPLICA IDENTITY FULL (old rows), an
    update leaving a TOASTed value unchanged: no columnar decoding, the same table change by
    change. A partitioned table published through its root is one group, not one a partition."""
    pub = unique("pub")
    keyed, full, toast, parted = (unique(p) for p in ("keyed", "full", "toast", "parted"))
    sync_conn.execute(f"CREATE TABLE {keyed} (id int PRIMARY KEY, v text)")
    sync_conn.execute(f"CREATE TABLE {full} (id int PRIMARY KEY, v text)")
    sync_conn.execute(f"ALTER TABLE {full} REPLICA IDENTITY FULL")
    sync_conn.execute(f"CREATE TABLE {toast} (id int PRIMARY KEY, big text, n int)")
    sync_conn.execute(f"ALTER TABLE {toast} ALTER big SET STORAGE EXTERNAL")
    sync_conn.execute(
        f"CREATE TABLE {parted} (id int, v text, PRIMARY KEY (id)) PARTITION BY RANGE (id)"
    )
    for k in range(3):
        sync_conn.execute(
            f"CREATE TABLE {parted}_{k} PARTITION OF {parted} "
            f"FOR VALUES FROM ({k * 10}) TO ({k * 10 + 10})"
        )
    sync_conn.execute(
        f"CREATE PUBLICATION {pub} FOR TABLE {keyed}, {full}, {toast}, {parted} "
        "WITH (publish_via_partition_root = true)"
    )
    sync_conn.execute(f"INSERT INTO {keyed} VALUES (1, 'a'), (2, 'b')")
    sync_conn.execute(f"UPDATE {keyed} SET id = 3 WHERE id = 1")
    sync_conn.execute(f"INSERT INTO {full} VALUES (1, 'a')")
    sync_conn.execute(f"UPDATE {full} SET v = 'b'")
    sync_conn.execute(f"INSERT INTO {toast} VALUES (1, repeat('x', 100000), 1)")
    sync_conn.execute(f"UPDATE {toast} SET n = 2")
    sync_conn.execute(f"INSERT INTO {parted} SELECT g, 'v' || g FROM generate_series(0, 29) g")
    sync_conn.execute(f"UPDATE {parted} SET v = 'w' WHERE id % 10 = 0")
    for table, plain in ((keyed, False), (full, False), (toast, False), (parted, True)):
        raw = raw_stream(sync_conn, table)
        (group,), expected = both_ways(sync_conn, slot, pub, raw)
        assert (group.text_columns() is not None) is plain, table
        got = _columnar_change_table(raw, group)
        if not plain:
            assert got is None, table
            changes = group.changes()
            got = _change_table(raw, changes, _toasted_values(sync_conn, raw, table, changes))
        assert got.to_pylist() == expected.to_pylist(), table
        if table == toast:  # the unchanged value, read back from the source
            assert got.column("big").to_pylist() == ["x" * 100_000] * 2


def test_a_malformed_message_is_left_to_the_change_by_change_decoder() -> None:
    """A message cut short, or with a column count that does not match its relation, is not
    decoded a column at a time (the change-by-change decoder then raises its DecodeError)."""
    from stripe_platform.ingestion.postgres import pgoutput

    relation = pgoutput.Relation(
        7, "public", "t", "d", (pgoutput.Column(1, "id", 23, -1), pgoutput.Column(0, "v", 25, -1))
    )
    good = b"I" + (7).to_bytes(4, "big") + b"N" + (2).to_bytes(2, "big")
    good += b"t" + (1).to_bytes(4, "big") + b"1" + b"n"
    group = cdc.RelationChanges(relation, "utf-8", [good], [1], [(1, pgoutput.PG_EPOCH, 1)])
    ops, texts = group.text_columns()
    assert bytes(ops) == b"I" and texts["id"].to_pylist() == ["1"] and texts["v"].null_count == 1
    for bad in (good[:-3], good[:6] + (3).to_bytes(2, "big") + good[8:], good + b"n"):
        broken = cdc.RelationChanges(relation, "utf-8", [good, bad], [1, 2], group.commits * 2)
        assert broken.text_columns() is None
        if bad == good + b"n":  # a byte past the last value: the change-by-change decoder reads it
            assert [c.row for c in broken.changes()] == [{"id": 1, "v": None}] * 2
            continue
        with pytest.raises(pgoutput.DecodeError):
            broken.changes()
