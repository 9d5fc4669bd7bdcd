"""What only the PostgreSQL raw writer (the compose profile's warehouse) does (the contract every
writer keeps is tests/test_raw_layer.py).

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

from raw_streams import MERCHANT, batch
from stripe_platform.config import Settings
from stripe_platform.oltp.db import conninfo
from stripe_platform.rawlayer import STATE_TABLE, Column, RawStream
from stripe_platform.warehouse.postgres import PostgresRaw

pytestmark = pytest.mark.timeout(60)


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
