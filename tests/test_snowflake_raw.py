"""What only the Snowflake raw writer does, through fakesnow's wire server (the contract every
writer keeps is tests/test_raw_layer.py).

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

from raw_streams import MERCHANT, batch
from stripe_platform.rawlayer import Column, RawStream
from stripe_platform.warehouse.snowflake import WIDEN_SUFFIX, SnowflakeRaw

pytestmark = [
    pytest.mark.timeout(60),
    # fakesnow's own server code, not ours.
    pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning"),
]

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
