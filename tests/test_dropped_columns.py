"""A column dropped at the source: kept in the destination, NULL in rows written after the drop,
reported once (``dropped_columns``), by every raw writer alike (docs/ingestion.md, "Schema drift").

End to end on a real source table (the session's PostgreSQL, the demo sample) into DuckDB raw and
PostgreSQL raw, through a sync and through ``follow``; every writer directly in the contract suite
(tests/test_raw_layer.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest
from psycopg import sql

from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import Engine
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.oltp import db
from stripe_platform.warehouse.duckdb import DuckDBRaw
from stripe_platform.warehouse.postgres import PostgresRaw

pytestmark = pytest.mark.timeout(300)

PG = "postgres-to-snowflake"
MCC = "merchantcategorycode"
# The demo sample's merchants (brief_examples.MERCHANTS): id -> MerchantCategoryCode.
SAMPLE_MCC = {3: "5399", 4: "5462", 5: "4511", 6: "5816", 7: "5942", 8: "5912"}


@pytest.fixture
def source(settings, database, loaded) -> Iterator[Any]:
    """Settings whose OLTP database holds the demo sample; its slots are dropped afterwards."""
    s = settings.model_copy(update={"pg_database": database})
    yield s
    with db.connect(s, autocommit=True) as conn:
        for (name,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
        ).fetchall():
            cdc.drop_slot(conn, name)


@pytest.fixture
def postgres_warehouse(settings, database) -> Iterator[psycopg.Connection]:
    """A database of its own for PostgreSQL raw (the compose profile's warehouse)."""
    name = f"{database}_warehouse"
    with db.connect(settings, database="postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn = psycopg.connect(db.conninfo(settings, database=name, with_key=False), autocommit=True)
    yield conn
    conn.close()
    with db.connect(settings, database="postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=["duckdb", "postgres"])
def writer(request, tmp_path: Path) -> Iterator[Any]:
    if request.param == "duckdb":
        conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
        yield DuckDBRaw(conn)
        conn.close()
    else:
        yield PostgresRaw(request.getfixturevalue("postgres_warehouse"))


def merchants(writer: Any) -> dict[int, tuple[Any, ...]]:
    """id -> (merchantcategorycode, rating) as the raw layer holds it."""
    rows = writer.conn.execute(
        f"SELECT id, {MCC}, rating::double precision FROM raw.postgres_merchant"
    ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_a_dropped_source_column_is_kept_nulled_from_then_on_and_reported_once(source, writer):
    pg = load_catalog().resolve(PG)
    first = Engine(source, pg, writer).sync()
    assert {k: v[0] for k, v in merchants(writer).items()} == SAMPLE_MCC

    with db.connect(source, autocommit=True) as conn:
        conn.execute("ALTER TABLE Merchant DROP COLUMN MerchantCategoryCode")
        conn.execute("UPDATE Merchant SET Rating = 1.0 WHERE ID = 4")
        conn.execute(
            "INSERT INTO Merchant (ID, Name, IndustryID, MerchantSizeID, Rating) "
            "VALUES (99, 'Newcomer', 1, 1, 2.0)"
        )
    second = Engine(source, pg, writer).sync()
    held = merchants(writer)
    assert held[4] == (None, 1.0)  # the new version of an updated row: NULL, not the old value
    assert held[99] == (None, 2.0)  # a new row
    assert held[3] == ("5399", 4.7)  # a row untouched since keeps what it had
    assert first.streams["merchant"].dropped_columns == []
    assert second.streams["merchant"].dropped_columns == [MCC]
    assert second.as_dict()["streams"]["merchant"]["dropped_columns"] == [MCC]

    with db.connect(source, autocommit=True) as conn:
        conn.execute("UPDATE Merchant SET Rating = 1.5 WHERE ID = 5")
    third = Engine(source, pg, writer).sync()
    assert third.streams["merchant"].rows == 1
    assert third.streams["merchant"].dropped_columns == []  # reported once
    assert merchants(writer)[5] == (None, 1.5)


def test_a_column_dropped_while_following_is_reported(source, tmp_path):
    """``follow`` keeps the stream's columns between reads: a drop is noticed from the change
    rows that no longer carry the column."""
    pg = load_catalog().resolve(PG)
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    writer = DuckDBRaw(conn)
    Engine(source, pg, writer).sync()
    polling, merchant_written, stop = threading.Event(), threading.Event(), threading.Event()

    class Observed(Engine):
        """Says when follow reads the slot with the columns it read before the drop."""

        synced = False

        def sync(self) -> Any:
            report = super().sync()
            self.synced = True
            return report

        def _drain_changes(self, *args: Any, **kwargs: Any) -> Any:
            if self.synced:
                polling.set()
            return super()._drain_changes(*args, **kwargs)

    def progress(stream: str, rows: int) -> None:
        if polling.is_set() and stream == "merchant" and rows:
            merchant_written.set()

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["report"] = Observed(source, pg, writer, progress).follow(stop, 0.05)
        except BaseException as exc:  # handed to the test's thread
            outcome["error"] = exc
            polling.set()
            merchant_written.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert polling.wait(120), "follow never read the slot"
        with db.connect(source, autocommit=True) as source_conn:
            source_conn.execute("ALTER TABLE Merchant DROP COLUMN MerchantCategoryCode")
            source_conn.execute("UPDATE Merchant SET Rating = 1.0 WHERE ID = 4")
        assert merchant_written.wait(120), "the change was never written"
    finally:
        stop.set()
        thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["report"].streams["merchant"].dropped_columns == [MCC]
    assert merchants(writer)[4] == (None, 1.0)
    assert merchants(writer)[3] == ("5399", 4.7)
    conn.close()
