"""The embedded sync engine end to end: real PostgreSQL (snapshot + pgoutput CDC), the document
stand-in, and the DuckDB raw layer."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from decimal import Decimal

import duckdb
import pytest
from psycopg import sql

from stripe_platform.ingestion.catalog import UnknownConnectionError, load_catalog
from stripe_platform.ingestion.engine import Engine, SyncError
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.oltp import db
from stripe_platform.oltp.migrate import migrate
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec
from stripe_platform.warehouse.duckdb import DuckDBRaw

PG = "postgres-to-snowflake"
END = dt.date(2026, 11, 1)


@pytest.fixture
def platform(settings, database, docdb, tmp_path, seed_templates):
    """A seeded database, its document database (both the test's own, on the session's servers)
    and an empty DuckDB warehouse."""
    s = settings.model_copy(update={"pg_database": database, "mongodb_database": docdb.name})
    seed_templates.seed(s, build(make_spec(scale=0.003, seed=4, end=END, max_documents=300)), docdb)
    catalog = load_catalog()
    warehouse = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    yield s, docdb, catalog, DuckDBRaw(warehouse)
    with db.connect(s, autocommit=True) as conn:
        for c in catalog.connections:
            connection = catalog.resolve(c.name)
            if connection.source.kind == "postgres":
                cdc.drop_slot(conn, connection.slot(conn.info.dbname))
    warehouse.close()


def live_rows(writer, table, columns="id"):
    return writer.conn.execute(
        f"SELECT {columns} FROM raw.{table} WHERE _ab_cdc_deleted_at IS NULL ORDER BY 1"
    ).fetchall()


def source_rows(s, query):
    with db.connect(s) as conn:
        return conn.execute(query).fetchall()


def test_initial_sync_then_changes_land_deduplicated(platform):
    s, _, catalog, raw = platform
    report = Engine(s, catalog.resolve(PG), raw).sync()
    assert report.phase == "snapshot"
    for table in ("transaction", "customer", "merchant", "device", "transactionstatechanges"):
        assert (
            len(live_rows(raw, f"postgres_{table}"))
            == source_rows(s, f"SELECT count(*) FROM {table}")[0][0]
        ), table
    columns = {
        r[0]
        for r in raw.conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'postgres_customer'"
        ).fetchall()
    }
    assert "password" not in columns and {"_ab_cdc_lsn", "_airbyte_meta", "email"} <= columns
    assert "pan" not in {
        r[0]
        for r in raw.conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'postgres_paymentinstrument'"
        ).fetchall()
    }
    currencies = raw.conn.execute("SELECT count(*) FROM raw.postgres_currency").fetchone()
    assert currencies == (8,)  # a full-refresh stream

    with db.connect(s, autocommit=True) as conn:
        conn.execute(
            "SELECT change_transaction_status(1, 2::smallint, 'refund', 'test')"
            if conn.execute("SELECT TransactionStatusID FROM Transaction WHERE ID = 1").fetchone()[
                0
            ]
            == 1
            else "SELECT 1"
        )
        conn.execute("UPDATE Merchant SET Rating = 1.5 WHERE ID = 1")
        unused = conn.execute(
            "SELECT d.ID FROM Device d WHERE NOT EXISTS "
            "(SELECT FROM Transaction t WHERE t.DeviceID = d.ID) LIMIT 1"
        ).fetchone()[0]
        conn.execute("DELETE FROM Device WHERE ID = %s", (unused,))
    again = Engine(s, catalog.resolve(PG), raw).sync()
    assert again.phase == "incremental" and again.rows >= 3
    assert (
        raw.conn.execute("SELECT rating FROM raw.postgres_merchant WHERE id = 1").fetchone()[0]
        == 1.5
    )
    tomb = raw.conn.execute(
        "SELECT _ab_cdc_deleted_at FROM raw.postgres_device WHERE id = ?", [unused]
    ).fetchone()
    assert tomb[0] is not None  # the delete arrived as a tombstone
    dupes = raw.conn.execute(
        "SELECT count(*) - count(DISTINCT (id, datetime)) FROM raw.postgres_transaction"
    )
    assert dupes.fetchone() == (0,)


def test_snapshot_and_stream_equal_the_source_under_concurrent_writes(platform):
    s, _, catalog, raw = platform
    env = {
        **os.environ,
        "STRIPE_PLATFORM_HOME": str(s.home_dir),
        "STRIPE_PLATFORM_PG_DATABASE": s.pg_database,
        "STRIPE_PLATFORM_MONGODB_DATABASE": s.mongodb_database,
    }
    # Another process inserts, updates and deletes while the snapshot and the stream run.
    writer = subprocess.Popen(
        [sys.executable, "-m", "stripe_platform.cli", "seed", "--tps", "40", "--duration", "6"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    syncs = 0
    while True:  # sync while the writer writes (at least once, even on a slow machine)
        Engine(s, catalog.resolve(PG), raw).sync()
        syncs += 1
        if writer.poll() is not None:
            break
    assert writer.returncode == 0, (
        f"the writer failed: {writer.stderr.read() if writer.stderr else ''}"
    )
    Engine(s, catalog.resolve(PG), raw).sync()
    expected = source_rows(
        s, "SELECT ID, TransactionStatusID, Amount::float8 FROM Transaction ORDER BY 1"
    )
    got = live_rows(raw, "postgres_transaction", "id, transactionstatusid, amount::double")
    assert got == expected
    assert live_rows(raw, "postgres_device") == source_rows(s, "SELECT ID FROM Device ORDER BY 1")
    assert (
        len(live_rows(raw, "postgres_transactionstatechanges"))
        == source_rows(s, "SELECT count(*) FROM TransactionStateChanges")[0][0]
    )


def test_a_crash_mid_sync_redelivers_without_loss_or_duplicates(platform, monkeypatch):
    """A sync that dies while writing change rows, once one stream's changes are durable and
    before the next stream's are, has moved neither its state nor the slot: the next sync
    re-delivers every change, and the merge makes the re-delivered ones harmless."""
    s, _, catalog, raw = platform
    Engine(s, catalog.resolve(PG), raw).sync()
    with db.connect(s, autocommit=True) as conn:
        conn.execute("UPDATE Merchant SET Rating = 2.5")
        conn.execute("UPDATE Customer SET PreferredDevice = 'Desktop'")
        customers = conn.execute("SELECT count(*) FROM Customer").fetchone()[0]
        slot = catalog.resolve(PG).slot(conn.info.dbname)
        position = cdc.slot_info(conn, slot).confirmed_flush_lsn
    state = raw.load_state(f"connection:{PG}")
    real_write, written = raw.write, []

    def crashing(stream, batch, **kwargs):
        if "_ab_cdc_deleted_at" in batch.column_names:  # change rows, not a full refresh's
            if stream.name == "postgres_customer":
                raise KeyboardInterrupt  # the process dies before this batch is written
            written.append(stream.name)
        return real_write(stream, batch, **kwargs)

    monkeypatch.setattr(raw, "write", crashing)
    with pytest.raises(KeyboardInterrupt):
        Engine(s, catalog.resolve(PG), raw).sync()
    assert written == ["postgres_merchant"]  # the crash hit between two streams' changes
    assert raw.load_state(f"connection:{PG}") == state
    with db.connect(s, autocommit=True) as conn:
        assert cdc.slot_info(conn, slot).confirmed_flush_lsn == position
    monkeypatch.setattr(raw, "write", real_write)
    again = Engine(s, catalog.resolve(PG), raw).sync()
    assert again.phase == "incremental"
    assert again.streams["customer"].rows == customers  # re-delivered, not lost
    assert {r[0] for r in live_rows(raw, "postgres_merchant", "rating")} == {2.5}
    assert {r[0] for r in live_rows(raw, "postgres_customer", "preferreddevice")} == {"Desktop"}
    for table in ("merchant", "customer"):
        assert raw.conn.execute(
            f"SELECT count(*) - count(DISTINCT id) FROM raw.postgres_{table}"
        ).fetchone() == (0,)


def test_schema_drift_new_column_and_incompatible_change(platform):
    s, _, catalog, raw = platform
    Engine(s, catalog.resolve(PG), raw).sync()
    with db.connect(s, autocommit=True) as conn:
        conn.execute("ALTER TABLE Merchant ADD COLUMN Website text")
        conn.execute("UPDATE Merchant SET Website = 'https://m1.example' WHERE ID = 1")
    report = Engine(s, catalog.resolve(PG), raw).sync()
    assert "website" in report.streams["merchant"].added_columns
    assert raw.conn.execute(
        "SELECT website FROM raw.postgres_merchant WHERE id = 1"
    ).fetchone() == ("https://m1.example",)
    before = raw.conn.execute("SELECT count(*) FROM raw.postgres_merchant").fetchone()
    with db.connect(s, autocommit=True) as conn:
        conn.execute("ALTER TABLE Merchant ALTER COLUMN Rating TYPE integer USING round(Rating)")
        conn.execute("UPDATE Merchant SET Rating = 3 WHERE ID = 2")
    with pytest.raises(
        SyncError, match=r"raw.postgres_merchant: column rating changed type decimal -> integer"
    ):
        Engine(s, catalog.resolve(PG), raw).sync()
    # The stopped stream kept its rows, and other connections go on.
    assert raw.conn.execute("SELECT count(*) FROM raw.postgres_merchant").fetchone() == before
    assert Engine(s, catalog.resolve("mongodb-to-snowflake"), raw).sync().rows > 0


def test_documents_sync_full_then_incremental(platform):
    s, docs, catalog, raw = platform
    first = Engine(s, catalog.resolve("mongodb-to-snowflake"), raw).sync()
    assert first.streams["Customer"].rows == docs.Customer.count_documents({})
    assert raw.conn.execute("SELECT count(*) FROM raw.mongodb_transaction").fetchone()[0] == 300
    docs.Merchant.update_one(
        {}, {"$set": {"lastUpdated": dt.datetime.now(dt.UTC), "name": "Renamed"}}
    )
    second = Engine(s, catalog.resolve("mongodb-to-snowflake"), raw).sync()
    assert second.streams["Merchant"].rows >= 1 and second.streams["Customer"].rows <= 1
    assert raw.conn.execute(
        "SELECT count(*) FROM raw.mongodb_merchant WHERE name = 'Renamed'"
    ).fetchone() == (1,)


def test_unchanged_large_values_are_kept_on_update(platform):
    s, _, catalog, raw = platform
    big = os.urandom(6000).hex()  # incompressible: stored out of line (TOAST)
    with db.connect(s, autocommit=True) as conn:
        conn.execute("UPDATE Merchant SET Name = %s WHERE ID = 1", (big,))
    Engine(s, catalog.resolve(PG), raw).sync()
    with db.connect(s, autocommit=True) as conn:
        conn.execute("UPDATE Merchant SET Rating = 0.5 WHERE ID = 1")  # Name is not resent
    Engine(s, catalog.resolve(PG), raw).sync()
    name, rating = raw.conn.execute(
        "SELECT name, rating FROM raw.postgres_merchant WHERE id = 1"
    ).fetchone()
    assert (name, rating) == (big, 0.5)


def test_unknown_connection_is_a_clear_error(platform):
    _, _, catalog, _ = platform
    with pytest.raises(
        UnknownConnectionError, match="unknown connection 'nope'; known: postgres-to-snowflake"
    ):
        catalog.resolve("nope")


def test_lake_sync_writes_partitioned_parquet_readable_by_duckdb(platform, tmp_path):
    from stripe_platform.ingestion.engine import open_writer

    s, _, catalog, _ = platform
    lake = s.model_copy(update={"lake_uri": str(tmp_path / "lake")})
    s3 = catalog.resolve("postgres-to-s3")
    report = Engine(lake, s3, open_writer(lake, s3)).sync()
    assert report.rows > 0
    files = sorted(
        (tmp_path / "lake" / "raw" / "postgres" / "transaction").glob("extracted_date=*/*.parquet")
    )
    assert files and all(f.name.startswith(report.sync_id) for f in files)
    glob = str(
        tmp_path / "lake" / "raw" / "postgres" / "transaction" / "extracted_date=*" / "*.parquet"
    )
    count, dates, lsn = (
        duckdb.connect()
        .execute(
            f"SELECT count(*), count(DISTINCT extracted_date), min(_ab_cdc_lsn) "
            f"FROM read_parquet('{glob}', hive_partitioning = true)"
        )
        .fetchone()
    )
    assert count == source_rows(s, "SELECT count(*) FROM Transaction")[0][0]
    assert dates == 1 and lsn > 0
    # Changes append history; the state sits beside the data.
    with db.connect(s, autocommit=True) as conn:
        conn.execute("UPDATE Merchant SET Rating = 4.2 WHERE ID = 1")
    again = Engine(lake, s3, open_writer(lake, s3)).sync()
    assert again.streams["merchant"].rows == 1
    assert (tmp_path / "lake" / "_stripe_platform" / "state").is_dir()


def test_lake_snapshot_writes_files_side_by_side_and_a_failed_write_fails_the_sync(
    platform, tmp_path, monkeypatch
):
    """The lake takes snapshot batches two at a time: every batch gets a file of its own (no two
    writes share a part number), and a write that fails fails the sync, which then starts over."""
    from stripe_platform.ingestion.engine import open_writer
    from stripe_platform.ingestion.engine import sync as engine_module
    from stripe_platform.lake.writer import LakeWriter

    s, _, catalog, _ = platform
    lake = s.model_copy(update={"lake_uri": str(tmp_path / "lake")})
    s3 = catalog.resolve("postgres-to-s3")
    monkeypatch.setattr(engine_module, "SNAPSHOT_BATCH_ROWS", 200)  # many files per stream
    real_write, calls = LakeWriter.write, []

    def failing_write(self, source, stream, *args, **kwargs):
        if stream.name == "transaction":  # a snapshot stream's 5th batch, written two at a time
            calls.append(kwargs["part"])
            if len(calls) == 5:
                raise OSError("disk full")
        return real_write(self, source, stream, *args, **kwargs)

    monkeypatch.setattr(LakeWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        Engine(lake, s3, open_writer(lake, s3)).sync()
    monkeypatch.setattr(LakeWriter, "write", real_write)
    report = Engine(lake, s3, open_writer(lake, s3)).sync()
    assert report.phase == "snapshot"  # the failed one left its state "in progress"
    assert "did not finish" in report.snapshot_reason
    stream_dir = tmp_path / "lake" / "raw" / "postgres" / "transaction"
    files = list(stream_dir.glob(f"extracted_date=*/{report.sync_id}-*.parquet"))
    source_count = source_rows(s, "SELECT count(*) FROM Transaction")[0][0]
    parts = sorted(int(f.stem.rsplit("-", 1)[1]) for f in files)
    assert len(files) > 4 and parts == list(range(len(files)))
    assert report.streams["transaction"].rows == source_count
    count, distinct = (
        duckdb.connect()
        .execute(
            "SELECT count(*), count(DISTINCT (id, datetime)) FROM read_parquet(?)",
            [[str(f) for f in files]],
        )
        .fetchone()
    )
    assert count == distinct == source_count


def test_follow_streams_changes_until_stopped(platform):
    """engine.follow: a first sync, then one long-lived loop that lands each change (and a column
    added meanwhile) without being run again; stopping it leaves the state at what landed."""
    import threading

    from stripe_platform.ingestion.engine import follow

    s, _, catalog, raw = platform
    stop = threading.Event()
    out: dict = {}

    def run():
        try:
            out["report"] = follow(s, catalog.resolve(PG), stop, 0.05, writer=raw)
        except BaseException as exc:  # re-raised by the test below
            out["error"] = exc

    reader = raw.conn.cursor()  # DuckDB: one connection per thread

    def wait_for(query, expected, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and "error" not in out:
            try:
                if reader.execute(query).fetchall() == expected:
                    return
            except duckdb.Error:  # the table or column is not there yet
                pass
            time.sleep(0.1)
        assert "error" not in out, out["error"]
        assert reader.execute(query).fetchall() == expected

    thread = threading.Thread(target=run)
    thread.start()
    try:
        n = source_rows(s, "SELECT count(*) FROM Merchant")[0][0]
        wait_for(
            "SELECT count(*) FROM raw.postgres_merchant WHERE _ab_cdc_deleted_at IS NULL", [(n,)]
        )
        with db.connect(s, autocommit=True) as conn:
            conn.execute("UPDATE Merchant SET Rating = 4.4")
            conn.execute("ALTER TABLE Merchant ADD COLUMN Slogan text")
            conn.execute("UPDATE Merchant SET Slogan = 'fast'")
        wait_for(
            "SELECT count(*), min(rating), min(slogan), max(slogan) FROM raw.postgres_merchant "
            "WHERE _ab_cdc_deleted_at IS NULL",
            [(n, Decimal("4.4"), "fast", "fast")],
        )
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert "error" not in out, out["error"]
    assert out["report"].streams["merchant"].rows >= 3 * n
    with db.connect(s, autocommit=True) as conn:
        slot = cdc.slot_info(conn, catalog.resolve(PG).slot(conn.info.dbname))
        assert slot is not None and slot.active_pid is None
    assert raw.load_state(f"connection:{PG}")["lsn"] <= slot.confirmed_flush_lsn
    reader.close()


def test_a_failing_snapshot_reader_fails_the_sync_cleanly(platform, monkeypatch):
    """An error in one parallel snapshot reader stops the others, fails the sync, drops the slot;
    the next sync takes a complete snapshot."""
    s, _, catalog, raw = platform
    real = cdc.SnapshotReader.batches

    def failing(self, query):
        for batch in real(self, query):
            if '."transaction_' in query:  # a leaf partition of Transaction
                raise RuntimeError("reader boom")
            yield batch

    monkeypatch.setattr(cdc.SnapshotReader, "batches", failing)
    with pytest.raises(RuntimeError, match="reader boom"):
        Engine(s, catalog.resolve(PG), raw).sync()
    with db.connect(s, autocommit=True) as conn:
        assert cdc.slot_info(conn, catalog.resolve(PG).slot(conn.info.dbname)) is None
    monkeypatch.undo()
    assert Engine(s, catalog.resolve(PG), raw).sync().phase == "snapshot"
    assert live_rows(raw, "postgres_transaction") == source_rows(
        s, "SELECT ID FROM Transaction ORDER BY 1"
    )
    assert raw.conn.execute(
        "SELECT count(*) - count(DISTINCT (id, datetime)) FROM raw.postgres_transaction"
    ).fetchone() == (0,)


def test_two_databases_of_one_cluster_keep_their_own_slots(platform, settings, tmp_path):
    """Slots are cluster-wide: the same connection synced from two databases of one cluster
    must not share (and drop) one slot. A slot of the earlier naming (without the database)
    that the state still names is dropped, not left holding WAL."""
    s, _, catalog, raw = platform
    pg = catalog.resolve(PG)
    other = s.model_copy(update={"pg_database": f"{s.pg_database}_b"})
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other.pg_database)))
    other_raw = DuckDBRaw(duckdb.connect(str(tmp_path / "other.duckdb")))
    try:
        with db.connect(other, autocommit=True) as conn:
            migrate(conn)
        assert Engine(s, pg, raw).sync().phase == "snapshot"
        assert Engine(other, pg, other_raw).sync().phase == "snapshot"
        # Each database's next sync reads its own slot: no new snapshot, nothing dropped.
        assert Engine(s, pg, raw).sync().phase == "incremental"
        assert Engine(other, pg, other_raw).sync().phase == "incremental"
        names = {d: pg.slot(d) for d in (s.pg_database, other.pg_database)}
        assert len(set(names.values())) == 2
        with db.connect(s, autocommit=True) as conn:
            for database, name in names.items():
                assert cdc.slot_info(conn, name).database == database

            # A state written before slots carried the database name.
            old = "stripe_platform_postgres_to_snowflake"
            cdc.ensure_slot(conn, old)
            state = raw.load_state(f"connection:{PG}")
            raw.save_state(f"connection:{PG}", {**state, "slot": old})
            Engine(s, pg, raw).sync()
            assert cdc.slot_info(conn, old) is None
            assert cdc.slot_info(conn, names[s.pg_database]) is not None
    finally:
        other_raw.conn.close()
        with db.connect(other, autocommit=True) as conn:
            cdc.drop_slot(conn, pg.slot(other.pg_database))
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(other.pg_database))
            )


def test_a_clock_stepped_back_still_gives_a_newer_generation(platform, monkeypatch):
    """Generation ids come from the wall clock; after it steps back (NTP, a restored VM) a new
    snapshot and a full refresh must still supersede the generation they replace."""
    s, _, catalog, raw = platform
    assert Engine(s, catalog.resolve(PG), raw).sync().phase == "snapshot"

    def generations(table):
        return raw.conn.execute(
            f"SELECT DISTINCT _airbyte_generation_id FROM raw.{table}"
        ).fetchall()

    [(snapshot,)] = generations("postgres_merchant")
    [(refresh,)] = generations("postgres_currency")
    day_ns = 86_400 * 10**9
    real_time_ns = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() - day_ns)
    with db.connect(s, autocommit=True) as conn:
        rating = conn.execute("SELECT Rating FROM Merchant WHERE ID = 1").fetchone()[0]
        rating = Decimal("2.5") if rating != Decimal("2.5") else Decimal("3.5")
        conn.execute("UPDATE Merchant SET Rating = %s WHERE ID = 1", (rating,))
        unused = conn.execute(
            "SELECT d.ID FROM Device d WHERE NOT EXISTS "
            "(SELECT FROM Transaction t WHERE t.DeviceID = d.ID) LIMIT 1"
        ).fetchone()[0]
        conn.execute("DELETE FROM Device WHERE ID = %s", (unused,))
        cdc.drop_slot(conn, catalog.resolve(PG).slot(conn.info.dbname))  # forces a new snapshot
    assert Engine(s, catalog.resolve(PG), raw).sync().phase == "snapshot"
    assert generations("postgres_merchant") == [(snapshot + 1,)]
    assert generations("postgres_device") == [(snapshot + 1,)]
    assert generations("postgres_currency") == [(refresh + 1,)]
    assert raw.conn.execute("SELECT rating FROM raw.postgres_merchant WHERE id = 1").fetchone() == (
        rating,
    )
    # The deleted device went with the older generation (the new snapshot does not have it).
    assert raw.conn.execute(
        "SELECT count(*) FROM raw.postgres_device WHERE id = ?", [unused]
    ).fetchone() == (0,)
    assert raw.conn.execute("SELECT count(*) FROM raw.postgres_currency").fetchone() == (8,)
