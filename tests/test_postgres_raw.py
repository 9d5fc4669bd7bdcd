"""The raw-layer contract (tests/test_raw_layer.py) on PostgreSQL, the compose profile's warehouse.

Runs against the session's real PostgreSQL cluster, in the fresh database of the ``database``
fixture, with the tables in a ``raw_postgres`` schema.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Iterator
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from stripe_platform.config import Settings
from stripe_platform.oltp.db import conninfo
from stripe_platform.rawlayer import STATE_TABLE, Column, RawStream, SchemaChangeError
from stripe_platform.warehouse.postgres import PostgresRaw

pytestmark = pytest.mark.timeout(60)

MERCHANT = RawStream(
    namespace="raw_postgres",
    name="merchant",
    columns=(Column("id", "integer"), Column("name", "string"), Column("rating", "number")),
    primary_key=("id",),
    mode="append_dedup",
    cdc="postgres",
)


@pytest.fixture
def warehouse(settings: Settings, database: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's database; the raw layer needs no PII key."""
    with psycopg.connect(
        conninfo(settings, database=database, with_key=False), autocommit=True
    ) as connection:
        yield connection


@pytest.fixture
def raw(warehouse: psycopg.Connection[Any]) -> PostgresRaw:
    return PostgresRaw(warehouse)


def rows(raw: PostgresRaw, sql: str) -> list[tuple[Any, ...]]:
    return raw.conn.execute(sql).fetchall()  # type: ignore[arg-type]


def batch(**columns: Any) -> pa.Table:
    return pa.table(columns)


def test_dedup_keeps_the_latest_version_by_lsn_and_state_follows(raw):
    raw.write(
        MERCHANT,
        batch(
            id=[1, 2, 1], name=["a", "b", "a2"], rating=[4.0, 3.0, 4.5], _ab_cdc_lsn=[10, 11, 12]
        ),
        sync_id="s1",
        generation_id=1,
        state={"lsn": 12},
    )
    # A re-delivered older change must not overwrite the newer row.
    raw.write(
        MERCHANT,
        batch(id=[1], name=["stale"], rating=[1.0], _ab_cdc_lsn=[10]),
        sync_id="s2",
        generation_id=1,
        state={"lsn": 12},
    )
    assert rows(raw, "SELECT id, name, _ab_cdc_lsn FROM raw_postgres.merchant ORDER BY id") == [
        (1, "a2", 12),
        (2, "b", 11),
    ]
    assert raw.state(MERCHANT) == {"lsn": 12}
    meta = rows(raw, "SELECT _airbyte_meta FROM raw_postgres.merchant WHERE id = 2")[0][0]
    assert meta == {"sync_id": "s1", "changes": []}


def test_deletes_are_kept_as_tombstones(raw):
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[10]),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    raw.write(
        MERCHANT,
        batch(
            id=[1],
            _ab_cdc_lsn=[20],
            _ab_cdc_deleted_at=pa.array(["2026-11-01T00:00:00+00:00"]).cast(
                pa.timestamp("us", tz="UTC")
            ),
        ),
        sync_id="s2",
        generation_id=1,
        state=None,
    )
    assert rows(raw, "SELECT id, name, _ab_cdc_deleted_at FROM raw_postgres.merchant") == [
        (1, None, dt.datetime(2026, 11, 1, tzinfo=dt.UTC))
    ]


def test_value_that_does_not_fit_is_nulled_and_recorded(raw):
    result = raw.write(
        MERCHANT,
        batch(id=[1, 2], name=["a", "b"], rating=["4.5", "excellent"], _ab_cdc_lsn=[1, 2]),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    assert result.nulled == {"rating": 1}
    got = rows(raw, "SELECT id, rating, _airbyte_meta FROM raw_postgres.merchant ORDER BY id")
    assert got[0][1] == 4.5 and got[1][1] is None
    assert got[1][2]["changes"] == [
        {"field": "rating", "change": "NULLED", "reason": "DESTINATION_TYPECAST_ERROR"}
    ]


def test_new_nullable_column_is_added_and_filled_from_then_on(raw):
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[1]),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    grown = RawStream(
        **{**MERCHANT.__dict__, "columns": (*MERCHANT.columns, Column("website", "string"))}
    )
    result = raw.write(
        grown,
        batch(id=[2], name=["b"], rating=[3.0], website=["b.example"], _ab_cdc_lsn=[2]),
        sync_id="s2",
        generation_id=1,
        state=None,
    )
    assert result.added_columns == ["website"]
    assert rows(raw, "SELECT id, website FROM raw_postgres.merchant ORDER BY id") == [
        (1, None),
        (2, "b.example"),
    ]


def test_incompatible_changes_stop_only_that_stream(raw):
    other = RawStream(
        namespace="raw_postgres", name="currency", columns=(Column("code", "string"),)
    )
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[1]),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    narrowed = RawStream(
        **{
            **MERCHANT.__dict__,
            "columns": (
                Column("id", "integer"),
                Column("name", "string"),
                Column("rating", "integer"),
            ),
        }
    )
    with pytest.raises(
        SchemaChangeError,
        match=r"raw_postgres.merchant: column rating changed type number -> integer",
    ):
        raw.write(
            narrowed,
            batch(id=[2], name=["b"], rating=[3], _ab_cdc_lsn=[2]),
            sync_id="s2",
            generation_id=1,
            state=None,
        )
    no_key = RawStream(**{**MERCHANT.__dict__, "primary_key": ()})
    with pytest.raises(SchemaChangeError, match="primary key changed"):
        raw.write(
            no_key,
            batch(id=[2], name=["b"], rating=[3.0]),
            sync_id="s3",
            generation_id=1,
            state=None,
        )
    assert rows(raw, "SELECT count(*) FROM raw_postgres.merchant") == [(1,)]
    raw.write(other, batch(code=["EUR"]), sync_id="s4", generation_id=1, state=None)
    assert rows(raw, "SELECT code FROM raw_postgres.currency") == [("EUR",)]


def test_failed_write_leaves_neither_data_nor_state(raw):
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[1]),
        sync_id="s1",
        generation_id=1,
        state={"lsn": 1},
    )
    raw.conn.execute("CREATE UNIQUE INDEX merchant_name ON raw_postgres.merchant (name)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        raw.write(
            MERCHANT,
            batch(id=[2, 3], name=["a", "a"], rating=[1.0, 2.0], _ab_cdc_lsn=[2, 3]),
            sync_id="s2",
            generation_id=1,
            state={"lsn": 3},
        )
    assert rows(raw, "SELECT count(*) FROM raw_postgres.merchant") == [(1,)]
    assert raw.state(MERCHANT) == {"lsn": 1}
    assert rows(raw, "SELECT count(*) FROM pg_class WHERE relpersistence = 't'") == [(0,)]


def test_full_refresh_replaces_the_previous_generation(raw):
    ref = RawStream(
        namespace="raw_postgres",
        name="currency",
        columns=(Column("code", "string"),),
        mode="overwrite",
    )
    raw.write(ref, batch(code=["EUR", "USD"]), sync_id="s1", generation_id=1, state=None)
    raw.finish_overwrite(ref, 1, None)
    raw.write(ref, batch(code=["EUR", "GBP"]), sync_id="s2", generation_id=2, state=None)
    assert raw.finish_overwrite(ref, 2, {"done": True}) == 2
    assert sorted(rows(raw, "SELECT code FROM raw_postgres.currency")) == [("EUR",), ("GBP",)]
    assert raw.state(ref) == {"done": True}


def test_every_type_round_trips_through_copy(raw):
    stream = RawStream(
        namespace="raw_mongodb",
        name="everything",
        columns=(
            Column("i", "integer"),
            Column("f", "number"),
            Column("d", "decimal"),
            Column("s", "string"),
            Column("b", "boolean"),
            Column("tz", "timestamp_tz"),
            Column("ntz", "timestamp"),
            Column("day", "date"),
            Column("doc", "json"),
            Column("raw", "binary"),
        ),
        primary_key=("i",),
        mode="append_dedup",
        cdc="mongodb",
    )
    raw.write(
        stream,
        batch(
            i=[1, 2],
            f=[1.25, float("inf")],
            d=["12.345678901", None],
            s=['é, "quoted"\nline', ""],
            b=[True, None],
            tz=pa.array([dt.datetime(2026, 3, 1, 12, 30, 0, 123456, tzinfo=dt.UTC), None]),
            ntz=pa.array([dt.datetime(2026, 3, 1, 8, 0), None]),
            day=pa.array([dt.date(2026, 2, 28), None]),
            doc=[{"a": [1, 2], "b": None}, None],
            raw=[b"\x00\xff", None],
            _ab_cdc_cursor=[7, 8],
        ),
        sync_id="s1",
        generation_id=3,
        state={"resume_token": "abc"},
    )
    got = rows(
        raw,
        "SELECT i, f, d, s, b, tz, ntz, day, doc, raw, _ab_cdc_cursor, _airbyte_generation_id "
        "FROM raw_mongodb.everything ORDER BY i",
    )
    assert got[0] == (
        1,
        1.25,
        decimal.Decimal("12.345678901"),
        'é, "quoted"\nline',
        True,
        dt.datetime(2026, 3, 1, 12, 30, 0, 123456, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 1, 8, 0),
        dt.date(2026, 2, 28),
        {"a": [1, 2], "b": None},
        b"\x00\xff",
        7,
        3,
    )
    # The empty string stays distinct from NULL through CSV.
    assert got[1] == (2, float("inf"), None, "", None, None, None, None, None, None, 8, 3)


def test_compatible_type_changes_widen_the_column_and_keep_the_data(raw):
    v1 = RawStream(
        namespace="raw_postgres",
        name="payment",
        columns=(Column("id", "integer"), Column("amount", "integer"), Column("note", "string")),
    )
    raw.write(
        v1,
        batch(id=[1, 2], amount=[10, 20], note=['{"k": 1}', "plain"]),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    v2 = RawStream(
        namespace="raw_postgres",
        name="payment",
        columns=(Column("id", "integer"), Column("amount", "number"), Column("note", "json")),
    )
    raw.write(
        v2, batch(id=[3], amount=[0.5], note=['["x"]']), sync_id="s2", generation_id=1, state=None
    )
    assert dict(
        rows(
            raw,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'raw_postgres' AND table_name = 'payment' "
            "AND column_name IN ('amount', 'note')",
        )
    ) == {"amount": "double precision", "note": "jsonb"}
    assert rows(raw, "SELECT id, amount, note FROM raw_postgres.payment ORDER BY id") == [
        (1, 10.0, {"k": 1}),
        (2, 20.0, "plain"),  # not JSON text: kept as a JSON string, not lost
        (3, 0.5, ["x"]),
    ]


def test_writes_commit_on_a_connection_without_autocommit(settings, database, raw):
    with psycopg.connect(conninfo(settings, database=database, with_key=False)) as manual:
        writer = PostgresRaw(manual)
        writer.write(
            MERCHANT,
            batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[1]),
            sync_id="s1",
            generation_id=1,
            state={"lsn": 1},
        )
        assert manual.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    # Seen from another session: the batch and its state are durable.
    assert rows(raw, "SELECT id FROM raw_postgres.merchant") == [(1,)]
    assert rows(raw, f"SELECT state FROM {STATE_TABLE}") == [({"lsn": 1},)]


def test_state_under_any_key_is_upserted_on_its_own(raw):
    assert raw.load_state("connection:oltp") is None
    raw.save_state("connection:oltp", {"slot": "s", "lsn": 10})
    raw.save_state("connection:oltp", {"slot": "s", "lsn": 42})
    assert raw.load_state("connection:oltp") == {"slot": "s", "lsn": 42}
    raw.write(MERCHANT, batch(id=[1], _ab_cdc_lsn=[1]), sync_id="s1", generation_id=1, state=None)
    raw.save_state(MERCHANT.key, {"lsn": 1})
    assert raw.state(MERCHANT) == {"lsn": 1}
    # An empty batch still moves the state (a CDC read that found nothing for this stream).
    empty = batch(id=pa.array([], pa.int64()))
    assert raw.write(MERCHANT, empty, sync_id="s2", generation_id=1, state={"lsn": 9}).rows == 0
    assert raw.state(MERCHANT) == {"lsn": 9}
    assert rows(raw, "SELECT count(*) FROM raw_postgres.merchant") == [(1,)]
    # The recorded primary key survives: a changed key is still refused.
    with pytest.raises(SchemaChangeError, match="primary key changed"):
        raw.ensure(RawStream(**{**MERCHANT.__dict__, "primary_key": ("name",)}))
