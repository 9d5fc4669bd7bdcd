"""The raw-layer contract (tests/test_raw_layer.py) on Snowflake, through fakesnow's wire server.

The connector talks HTTP to fakesnow on 127.0.0.1 exactly as it would to Snowflake. fakesnow answers
an unhandled error with HTTP 500, which the connector retries until ``network_timeout``: the
timeouts below are short and every test runs under pytest-timeout. Known fakesnow gap: a NULL
TIMESTAMP_TZ/NTZ is returned as 1970-01-01 over the wire, so tests test timestamps for NULL in SQL.
"""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest
import snowflake.connector
from snowflake.connector import SnowflakeConnection
from snowflake.connector.errors import ProgrammingError

from stripe_platform.rawlayer import Column, RawStream, SchemaChangeError
from stripe_platform.warehouse.snowflake import WIDEN_SUFFIX, SnowflakeRaw

pytestmark = [
    pytest.mark.timeout(60),
    # fakesnow's own server code, not ours.
    pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning"),
]

MERCHANT = RawStream(
    namespace="raw_postgres",
    name="merchant",
    columns=(Column("id", "integer"), Column("name", "string"), Column("rating", "number")),
    primary_key=("id",),
    mode="append_dedup",
    cdc="postgres",
)
_databases = itertools.count()


@pytest.fixture
def sf(snowflake_server: dict[str, Any]) -> Iterator[SnowflakeConnection]:
    """A session on a database of its own (the server's in-memory store is shared)."""
    conn = snowflake.connector.connect(
        **{
            **snowflake_server,
            "database": f"RAW_TEST_{next(_databases)}",
            "login_timeout": 10,
            "network_timeout": 10,
            "socket_timeout": 10,
        }
    )
    yield conn
    conn.close()


@pytest.fixture
def raw(sf: SnowflakeConnection) -> SnowflakeRaw:
    return SnowflakeRaw(sf)


def rows(raw: SnowflakeRaw, sql: str) -> list[tuple[Any, ...]]:
    with raw.conn.cursor() as cur:
        return [tuple(r) for r in cur.execute(sql).fetchall()]


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
    # Unquoted names: Snowflake folds them to the upper-case identifiers the writer created.
    assert rows(raw, "SELECT id, name, _ab_cdc_lsn FROM raw_postgres.merchant ORDER BY id") == [
        (1, "a2", 12),
        (2, "b", 11),
    ]
    assert raw.state(MERCHANT) == {"lsn": 12}
    meta = json.loads(
        rows(raw, "SELECT _airbyte_meta FROM raw_postgres.merchant WHERE id = 2")[0][0]
    )
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
    assert rows(
        raw, "SELECT id, name, _ab_cdc_deleted_at IS NOT NULL FROM raw_postgres.merchant"
    ) == [(1, None, True)]
    assert rows(raw, "SELECT _ab_cdc_deleted_at FROM raw_postgres.merchant") == [
        (dt.datetime(2026, 11, 1, tzinfo=dt.UTC),)
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
    assert json.loads(got[1][2])["changes"] == [
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


def test_failed_write_leaves_neither_data_nor_state(raw, monkeypatch):
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[1]),
        sync_id="s1",
        generation_id=1,
        state={"lsn": 1},
    )

    # Snowflake enforces no unique index, so fail the statement after the data instead: the
    # batch's rows are already in the table (this session sees them) when the state write fails.
    def failing_state(stream: RawStream, state: dict[str, Any]) -> None:
        assert rows(raw, "SELECT count(*) FROM raw_postgres.merchant") == [(3,)]
        rows(raw, "UPDATE airbyte_internal.no_such_table SET state = NULL")

    monkeypatch.setattr(raw, "_update_state", failing_state)
    with pytest.raises(ProgrammingError, match="NO_SUCH_TABLE"):
        raw.write(
            MERCHANT,
            batch(id=[2, 3], name=["b", "c"], rating=[1.0, 2.0], _ab_cdc_lsn=[2, 3]),
            sync_id="s2",
            generation_id=1,
            state={"lsn": 3},
        )
    monkeypatch.undo()
    assert rows(raw, "SELECT count(*) FROM raw_postgres.merchant") == [(1,)]
    assert raw.state(MERCHANT) == {"lsn": 1}
    # The staging table went with the failed batch.
    assert rows(
        raw,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'AIRBYTE_INTERNAL'",
    ) == [("STRIPE_PLATFORM_SYNC_STATE",)]


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


def test_identifiers_follow_airbyte_upper_case_and_the_session_is_left_alone(raw):
    before = rows(raw, "SELECT CURRENT_DATABASE(), CURRENT_SCHEMA()")
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[1]),
        sync_id="s1",
        generation_id=1,
        state={"lsn": 1},
    )
    assert rows(raw, "SELECT CURRENT_DATABASE(), CURRENT_SCHEMA()") == before
    columns = rows(
        raw,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'RAW_POSTGRES' AND table_name = 'MERCHANT' ORDER BY ordinal_position",
    )
    assert columns == [
        ("ID", "NUMBER"),
        ("NAME", "TEXT"),
        ("RATING", "FLOAT"),
        ("_AIRBYTE_RAW_ID", "TEXT"),
        ("_AIRBYTE_EXTRACTED_AT", "TIMESTAMP_TZ"),
        ("_AIRBYTE_META", "VARIANT"),
        ("_AIRBYTE_GENERATION_ID", "NUMBER"),
        ("_AB_CDC_LSN", "NUMBER"),
        ("_AB_CDC_UPDATED_AT", "TIMESTAMP_TZ"),
        ("_AB_CDC_DELETED_AT", "TIMESTAMP_TZ"),
    ]
    assert rows(raw, "SELECT stream FROM airbyte_internal.stripe_platform_sync_state") == [
        ("raw_postgres.merchant",)
    ]
    assert rows(raw, f"LIST @{raw.stage}") == []  # PURGE removed the staged file


def test_every_type_round_trips_through_the_staged_parquet(raw):
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
            i=[1],
            f=[1.25],
            d=["12.345678901"],
            s=['é, "quoted"\nline'],
            b=[True],
            tz=pa.array([dt.datetime(2026, 3, 1, 12, 30, 0, 123456, tzinfo=dt.UTC)]),
            ntz=pa.array([dt.datetime(2026, 3, 1, 8, 0)]),
            day=pa.array([dt.date(2026, 2, 28)]),
            doc=[{"a": [1, 2], "b": None}],
            raw=[b"\x00\xff"],
            _ab_cdc_cursor=[7],
        ),
        sync_id="s1",
        generation_id=3,
        state={"resume_token": "abc"},
    )
    got = rows(
        raw,
        "SELECT i, f, d, s, b, tz, ntz, day, doc, raw, _ab_cdc_cursor, _airbyte_generation_id "
        "FROM raw_mongodb.everything",
    )[0]
    assert got[:5] == (1, 1.25, decimal.Decimal("12.345678901"), 'é, "quoted"\nline', True)
    assert got[5] == dt.datetime(2026, 3, 1, 12, 30, 0, 123456, tzinfo=dt.UTC)
    assert got[6:8] == (dt.datetime(2026, 3, 1, 8, 0), dt.date(2026, 2, 28))
    assert json.loads(got[8]) == {"a": [1, 2], "b": None}
    assert bytes(got[9]) == b"\x00\xff"
    assert got[10:] == (7, 3)
    assert raw.state(stream) == {"resume_token": "abc"}


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
    kinds = dict(
        rows(
            raw,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'RAW_POSTGRES' AND table_name = 'PAYMENT'",
        )
    )
    assert (kinds["AMOUNT"], kinds["NOTE"]) == ("FLOAT", "VARIANT")
    got = rows(raw, "SELECT id, amount, note FROM raw_postgres.payment ORDER BY id")
    assert [(i, a, json.loads(n)) for i, a, n in got] == [
        (1, 10.0, {"k": 1}),
        (2, 20.0, "plain"),  # not JSON text: kept as a JSON string, not lost
        (3, 0.5, ["x"]),
    ]


def test_a_widening_cut_short_by_a_crash_is_finished(raw):
    v1 = RawStream(namespace="raw_postgres", name="fee", columns=(Column("amount", "integer"),))
    raw.write(v1, batch(amount=[5]), sync_id="s1", generation_id=1, state=None)
    # The crash came after the old column was dropped and before the copy was renamed.
    table = raw.table(v1)
    rows(raw, f'ALTER TABLE {table} ADD COLUMN "AMOUNT{WIDEN_SUFFIX}" FLOAT')
    rows(raw, f'UPDATE {table} SET "AMOUNT{WIDEN_SUFFIX}" = CAST("AMOUNT" AS FLOAT)')
    rows(raw, f'ALTER TABLE {table} DROP COLUMN "AMOUNT"')
    v2 = RawStream(namespace="raw_postgres", name="fee", columns=(Column("amount", "number"),))
    result = raw.write(v2, batch(amount=[1.5]), sync_id="s2", generation_id=1, state=None)
    assert result.added_columns == []
    assert sorted(rows(raw, "SELECT amount FROM raw_postgres.fee")) == [(1.5,), (5.0,)]


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
