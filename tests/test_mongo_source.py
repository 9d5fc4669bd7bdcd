"""Reading document collections: typed columns from the specs, cursor increments, malformed data,
cursors that cannot order a document (missing, null, another type, dated in the future)."""

import datetime as dt
import json
import os
import subprocess
import sys

import duckdb
import psycopg
import pytest
from bson import ObjectId, json_util
from pymongo.errors import AutoReconnect, WriteError

from stripe_platform.docstore import client as docstore
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import Engine
from stripe_platform.ingestion.engine.mongo_source import (
    collection_columns,
    read_by_cursor,
    read_change_stream,
    supports_change_streams,
)
from stripe_platform.oltp import db
from stripe_platform.rawlayer import RawStream
from stripe_platform.warehouse.duckdb import DuckDBRaw
from stripe_platform.warehouse.postgres import PostgresRaw


def at(minute: int) -> dt.datetime:
    return dt.datetime(2026, 11, 1, 12, minute, tzinfo=dt.UTC)


def merchant_stream() -> RawStream:
    return RawStream(
        "raw",
        "mongodb_merchant",
        collection_columns("Merchant"),
        ("_id",),
        "lastUpdated",
        "append_dedup",
        "mongodb",
    )


def test_columns_come_from_the_collection_spec():
    kinds = {c.name: c.type for c in collection_columns("Transaction")}
    assert kinds["_id"] == "string" and kinds["transaction_id"] == "integer"
    assert kinds["amount"] == "number" and kinds["timestamp"] == "timestamp_tz"
    assert kinds["isFraud"] == "integer" and kinds["_extra"] == "json"
    assert {c.name: c.type for c in collection_columns("Merchant")}["rating"] == "json"


def test_full_then_incremental_by_cursor_into_the_raw_layer(docdb, tmp_path):
    docdb.Merchant.insert_many(
        [
            {
                "name": "Amazon",
                "industry": "Retail",
                "rating": {"average": 4.7},
                "lastUpdated": at(1),
            },
            {
                "name": "Fnac",
                "industry": "Retail",
                "rating": {"average": 4.1},
                "lastUpdated": at(2),
            },
        ]
    )
    stream = merchant_stream()
    raw = DuckDBRaw(duckdb.connect(str(tmp_path / "w.duckdb")))
    columns = stream.columns
    for batch in read_by_cursor(docdb, "Merchant", "lastUpdated", columns, None, batch_size=1):
        raw.write(stream, batch.table, sync_id="s1", generation_id=1, state=batch.state)
    assert raw.conn.execute("SELECT count(*) FROM raw.mongodb_merchant").fetchone() == (2,)

    docdb.Merchant.update_one(
        {"name": "Fnac"}, {"$set": {"rating": {"average": 3.9}, "lastUpdated": at(5)}}
    )
    docdb.Merchant.insert_one(
        {"name": "Steam", "industry": "Gaming", "rating": {"average": 4.5}, "lastUpdated": at(6)}
    )
    seen = []
    for batch in read_by_cursor(
        docdb, "Merchant", "lastUpdated", columns, raw.state(stream), batch_size=10
    ):
        seen += batch.table.column("name").to_pylist()
        raw.write(stream, batch.table, sync_id="s2", generation_id=1, state=batch.state)
    assert "Amazon" not in seen and {"Fnac", "Steam"} <= set(seen)
    got = dict(
        raw.conn.execute("SELECT name, rating->>'average' FROM raw.mongodb_merchant").fetchall()
    )
    assert got == {"Amazon": "4.7", "Fnac": "3.9", "Steam": "4.5"}


def test_malformed_documents_are_kept_with_their_problems_recorded(docdb, tmp_path):
    docdb.Merchant.insert_many(
        [
            {
                "name": "Good",
                "industry": "Retail",
                "rating": {"average": 4.0},
                "lastUpdated": at(1),
            },
            {
                "oltp_id": "not-a-number",
                "name": 42,
                "industry": ["not", "a", "string"],
                "lastUpdated": at(2),
                "unexpected": True,
            },
        ]
    )
    stream = merchant_stream()
    raw = DuckDBRaw(duckdb.connect(str(tmp_path / "w.duckdb")))
    for batch in read_by_cursor(
        docdb, "Merchant", "lastUpdated", stream.columns, None, batch_size=10
    ):
        raw.write(stream, batch.table, sync_id="s1", generation_id=1, state=batch.state)
    rows = raw.conn.execute(
        "SELECT name, industry, _extra, _airbyte_meta, oltp_id FROM raw.mongodb_merchant "
        "ORDER BY lastUpdated"
    ).fetchall()
    assert rows[0][:2] == ("Good", "Retail")
    name, industry, extra, meta, oltp_id = rows[1]
    assert oltp_id is None
    assert name == "42"  # a number where a string belongs is kept as text, and so is a list
    assert json.loads(industry) == ["not", "a", "string"]
    assert json.loads(extra) == {"unexpected": True}
    assert json.loads(meta)["changes"] == [
        {"field": "oltp_id", "change": "NULLED", "reason": "DESTINATION_TYPECAST_ERROR"}
    ]


def test_change_streams_capture_updates_and_deletes(real_mongodb, tmp_path):
    if not supports_change_streams(real_mongodb):
        pytest.skip("change streams need a replica set")
    stream = merchant_stream()
    state = None
    for batch in read_change_stream(real_mongodb, "Merchant", stream.columns, None, 100, 200):
        state = batch.state
    docs = real_mongodb.Merchant
    docs.insert_one(
        {"name": "A", "industry": "Retail", "rating": {"average": 4}, "lastUpdated": at(1)}
    )
    docs.delete_one({"name": "A"})
    changes = list(read_change_stream(real_mongodb, "Merchant", stream.columns, state, 100, 500))
    deleted = changes[0].table.column("_ab_cdc_deleted_at").to_pylist()
    assert deleted[0] is None and deleted[-1] is not None


# -- cursors that cannot order a document -------------------------------------------------------
DOCS = "mongodb-to-snowflake"


class Reviews:
    """CustomerReview (cursor ``timestamp``) of the test's own document database, synced by the
    engine, as ``stripe-platform sync`` does, into an empty DuckDB raw layer in ``directory``."""

    def __init__(self, settings, docdb, directory, raw=None):
        self.docs = docdb.CustomerReview
        self.settings = settings.model_copy(update={"mongodb_database": docdb.name})
        self.raw = raw or DuckDBRaw(duckdb.connect(str(directory / "engine.duckdb")))
        self.connection = load_catalog().resolve(DOCS)

    def insert(self, message, **fields):
        doc = {
            "transaction_id": 1,
            "customer_id": ObjectId(),
            "merchant_id": ObjectId(),
            "rating": 4,
            "message": message,
        }
        self.docs.insert_one(doc | fields)

    def sync(self):
        """One sync; returns the review stream's report."""
        started = dt.datetime.now(dt.UTC)
        report = Engine(self.settings, self.connection, self.raw).sync()
        saved = json_util.loads(self.raw.load_state("raw.mongodb_customerreview")["cursor"])
        if saved is not None:  # never later than the sync's start
            assert saved.replace(tzinfo=saved.tzinfo or dt.UTC) <= started
        return report.streams["CustomerReview"]

    def rows(self):
        """message -> (timestamp, _extra, _airbyte_meta.changes) in the raw table."""
        found = self.raw.conn.execute(
            "SELECT message, timestamp, _extra, _airbyte_meta FROM raw.mongodb_customerreview"
        ).fetchall()
        return {
            m: (t, json.loads(e) if e else None, json.loads(meta)["changes"])
            for m, t, e, meta in found
        }


@pytest.fixture
def reviews(settings, docdb, tmp_path):
    return Reviews(settings, docdb, tmp_path)


def recent(seconds_ago: float = 0) -> dt.datetime:
    """A cursor as a writer stamps it now, at the precision MongoDB keeps (milliseconds)."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds_ago)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


NO_CURSOR = {"field": "timestamp", "change": "NULLED", "reason": "SOURCE_RETRIEVAL_ERROR"}
WRONG_TYPE = {"field": "timestamp", "change": "NULLED", "reason": "SOURCE_SERIALIZATION_ERROR"}
BAD_CURSORS = {  # issue -> (the document's cursor fields, what _airbyte_meta.changes says)
    "string": ({"timestamp": "2026-11-01T12:00:00Z"}, WRONG_TYPE),
    "missing": ({}, NO_CURSOR),
    "null": ({"timestamp": None}, NO_CURSOR),
}


@pytest.mark.parametrize("issue", list(BAD_CURSORS))
def test_documents_without_a_usable_cursor_arrive_once_per_version(reviews, issue):
    fields, change = BAD_CURSORS[issue]
    reviews.insert("first", timestamp=recent(3600))
    assert reviews.sync().rows == 1
    # Written after a sync has saved a cursor: a date query alone never matches them.
    reviews.insert("bad", **fields)
    reviews.insert("later", timestamp=recent(60))
    second = reviews.sync()
    rows = reviews.rows()
    assert set(rows) == {"first", "bad", "later"}
    assert second.rows == 2  # "first" is not delivered again: unchanged since the last sync
    assert second.cursor_issues == {issue: 1}
    assert any("without a usable timestamp" in w for w in second.warnings)
    assert rows["bad"][1:] == (
        {"timestamp": "2026-11-01T12:00:00Z"} if issue == "string" else None,
        [change],
    )
    assert rows["bad"][0] is None  # a string is not a date: set aside in _extra
    assert rows["later"][2] == [] and rows["first"][2] == []
    # Read again by every sync, delivered again only when it changes.
    third = reviews.sync()
    assert third.rows == 0
    assert (third.cursor_issues, third.warnings) == ({}, [])
    reviews.docs.update_one({"message": "bad"}, {"$set": {"rating": 1}})
    assert reviews.sync().rows == 1
    assert reviews.raw.conn.execute(
        "SELECT rating FROM raw.mongodb_customerreview WHERE message = 'bad'"
    ).fetchone() == (1,)
    # Mended with a date older than the saved cursor: delivered once more, clean.
    mended = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    reviews.docs.update_one({"message": "bad"}, {"$set": {"timestamp": mended}})
    fifth = reviews.sync()
    assert fifth.rows == 1
    assert fifth.cursor_issues == {}
    assert reviews.rows()["bad"] == (mended, None, [])
    assert reviews.sync().rows == 0


@pytest.mark.parametrize("issue", list(BAD_CURSORS))
def test_a_synced_document_whose_cursor_goes_bad_is_updated(reviews, issue):
    fields, change = BAD_CURSORS[issue]
    reviews.insert("review", timestamp=recent(3600))
    reviews.sync()
    update = {"$set": {"rating": 2, **fields}} if fields else {"$set": {"rating": 2}}
    if issue == "missing":
        update["$unset"] = {"timestamp": ""}
    reviews.docs.update_one({"message": "review"}, update)
    report = reviews.sync()
    assert report.rows == 1
    assert report.cursor_issues == {issue: 1}
    # The latest read wins in the destination, whatever the cursor field says.
    assert reviews.raw.conn.execute(
        "SELECT rating, _airbyte_meta->'changes' FROM raw.mongodb_customerreview"
    ).fetchall() == [(2, json.dumps([change], separators=(",", ":")))]


def test_non_finite_numbers_land_in_postgresql_raw_as_json(docdb, tmp_path, settings, database):
    """JSON has no NaN or Infinity: PostgreSQL's jsonb refuses Python's tokens for them, so a
    document holding one beyond its schema, or as a cursor of the wrong type (set aside in
    _extra), would fail that stream on every sync. They land in relaxed Extended JSON, as values
    inside objects always have."""
    if docstore.server_kind(docdb) == "ferretdb":
        pytest.skip(
            "FerretDB v1 stores no NaN or Infinity (test_ferretdb_stores_no_non_finite_number): "
            "set MONGODB_URI to a real MongoDB"
        )
    with psycopg.connect(
        db.conninfo(settings, database=database, with_key=False), autocommit=True
    ) as conn:
        reviews = Reviews(settings, docdb, tmp_path, PostgresRaw(conn))
        reviews.insert(
            "odd",
            timestamp=float("nan"),
            surprise=float("inf"),
            inside={"x": float("-inf")},
        )
        reviews.insert("fine", timestamp=recent(3600))
        first = reviews.sync()
        assert (first.rows, first.cursor_issues) == (2, {"double": 1})
        reviews.insert("later", timestamp=recent(60))
        reviews.docs.update_one({"message": "odd"}, {"$set": {"rating": 1}})
        assert reviews.sync().rows == 2  # later syncs go on
        found = conn.execute(
            "SELECT message, rating, _extra, _airbyte_meta->'changes' "
            "FROM raw.mongodb_customerreview ORDER BY message"
        ).fetchall()
    assert found == [
        ("fine", 4, None, []),
        ("later", 4, None, []),
        (
            "odd",
            1,
            {
                "timestamp": {"$numberDouble": "NaN"},
                "surprise": {"$numberDouble": "Infinity"},
                "inside": {"x": {"$numberDouble": "-Infinity"}},
            },
            [WRONG_TYPE],
        ),
    ]


def test_ferretdb_stores_no_non_finite_number(docdb):
    """Why the test above skips on FerretDB: such a document cannot exist there. Infinity is
    refused with a write error; NaN makes the server close the connection (the next command
    reconnects)."""
    if docstore.server_kind(docdb) != "ferretdb":
        pytest.skip("pins FerretDB v1's behaviour; MONGODB_URI names a MongoDB server")
    for value in (float("inf"), float("-inf"), {"x": float("inf")}):
        with pytest.raises(WriteError, match="infinity values are not allowed"):
            docdb.CustomerReview.insert_one({"message": "odd", "surprise": value})
    with pytest.raises(AutoReconnect, match="connection closed"):
        docdb.CustomerReview.insert_one({"message": "odd", "timestamp": float("nan")})
    assert docdb.CustomerReview.count_documents({}) == 0


def test_a_cursor_in_the_future_holds_no_later_document_back(reviews):
    reviews.insert("old", timestamp=recent(7200))
    reviews.insert("far future", timestamp=dt.datetime(9999, 12, 31, tzinfo=dt.UTC))
    first = reviews.sync()
    assert first.rows == 2
    assert first.cursor_issues == {"future": 1}
    assert any("9999-12-31" in w and "after the sync's start" in w for w in first.warnings)
    assert reviews.rows()["far future"][0] == dt.datetime(9999, 12, 31, tzinfo=dt.UTC)
    for n in range(3):
        # A writer's clock a little behind ours, then one on time.
        reviews.insert(f"late {n}", timestamp=recent(20))
        reviews.insert(f"on time {n}", timestamp=recent())
        later = reviews.sync()
        assert later.rows == 2
        assert (later.cursor_issues, later.warnings) == ({}, [])
    assert set(reviews.rows()) == {"old", "far future"} | {
        f"{kind} {n}" for kind in ("late", "on time") for n in range(3)
    }
    # The far-future document still arrives when it changes, and its fix wins.
    fixed = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    reviews.docs.update_one({"message": "far future"}, {"$set": {"timestamp": fixed}})
    assert reviews.sync().rows == 1
    assert reviews.rows()["far future"][0] == fixed


def test_a_cursor_saved_in_the_future_by_an_earlier_version_is_read_again(reviews):
    reviews.insert("review", timestamp=recent(3600))
    reviews.sync()
    # What the earlier reader saved after a document dated 9999-12-31.
    future = {"mode": "cursor", "cursor": json_util.dumps(dt.datetime(9999, 12, 31))}
    reviews.raw.save_state("raw.mongodb_customerreview", future)
    reviews.insert("hidden", timestamp=recent(60))
    report = reviews.sync()
    assert report.rows == 2 and any("read again" in w for w in report.warnings)
    assert set(reviews.rows()) == {"review", "hidden"}


@pytest.mark.parametrize("crash_after", [0, 1, 2])
def test_a_sync_that_dies_between_batches_loses_and_repeats_nothing(
    reviews, monkeypatch, crash_after
):
    """Batches of two: the first holds documents without a usable cursor, the next ones dated
    documents; the sync dies after ``crash_after`` batches were committed."""
    reviews.insert("missing")
    reviews.insert("string", timestamp="2026-11-01")
    reviews.insert("a", timestamp=recent(7200))
    reviews.insert("b", timestamp=recent(3600))
    reviews.insert("future", timestamp=dt.datetime(9999, 12, 31, tzinfo=dt.UTC))
    monkeypatch.setattr("stripe_platform.ingestion.engine.sync.BATCH_ROWS", 2)
    written = []
    write = reviews.raw.write

    def dying_write(stream, batch, **kwargs):
        if stream.name == "mongodb_customerreview" and len(written) == crash_after:
            raise RuntimeError("killed")
        result = write(stream, batch, **kwargs)
        if stream.name == "mongodb_customerreview":
            written.append(batch.column("message").to_pylist())
        return result

    monkeypatch.setattr(reviews.raw, "write", dying_write)
    with pytest.raises(RuntimeError, match="killed"):
        reviews.sync()
    monkeypatch.setattr(reviews.raw, "write", write)
    resumed = reviews.sync()
    delivered = [m for batch in written for m in batch]
    assert resumed.rows == 5 - len(delivered)  # only what the dead sync did not commit
    assert set(reviews.rows()) == {"missing", "string", "a", "b", "future"}
    assert reviews.sync().rows == 0


def test_the_lake_receives_them_too(reviews, tmp_path):
    from stripe_platform.ingestion.engine import open_writer

    lake = tmp_path / "lake"
    s = reviews.settings.model_copy(update={"lake_uri": str(lake)})
    connection = load_catalog().resolve("mongodb-to-s3")

    def sync():
        report = Engine(s, connection, open_writer(s, connection)).sync()
        return report.streams["CustomerReview"]

    reviews.insert("first", timestamp=recent(3600))
    reviews.insert("far future", timestamp=dt.datetime(9999, 12, 31, tzinfo=dt.UTC))
    assert sync().rows == 2
    reviews.insert("no cursor")
    reviews.insert("string", timestamp="yesterday")
    reviews.insert("later", timestamp=recent())
    second = sync()
    assert second.rows == 3
    assert second.cursor_issues == {"missing": 1, "string": 1}
    assert sync().rows == 0
    files = str(lake / "raw" / "mongodb" / "customerreview" / "*" / "*.parquet")
    found = duckdb.sql(
        "SELECT message, _airbyte_meta::JSON->'changes'->0->>'reason' FROM "
        f"read_parquet('{files}') ORDER BY _ab_cdc_cursor"
    ).fetchall()
    assert found == [
        ("first", None),
        ("far future", None),
        ("no cursor", "SOURCE_RETRIEVAL_ERROR"),
        ("string", "SOURCE_SERIALIZATION_ERROR"),
        ("later", None),
    ]


def test_sync_prints_cursor_warnings(reviews, tmp_path):
    reviews.insert("far future", timestamp=dt.datetime(9999, 12, 31, tzinfo=dt.UTC))
    reviews.insert("no cursor")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_PLATFORM_")}
    # The session's home (its running servers), the test's own documents and warehouse file.
    env |= {
        "STRIPE_PLATFORM_HOME": str(reviews.settings.home_dir),
        "STRIPE_PLATFORM_MONGODB_DATABASE": reviews.settings.mongodb_database,
        "STRIPE_PLATFORM_WAREHOUSE_PATH": str(tmp_path / "cli.duckdb"),
    }

    def sync(*options):
        run = [sys.executable, "-m", "stripe_platform.cli", "sync", DOCS, *options]
        done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    text = sync()
    assert "9999-12-31" in text.stderr and "without a usable timestamp (missing 1)" in text.stderr
    reviews.docs.update_one({"message": "no cursor"}, {"$set": {"rating": 5}})
    review = json.loads(sync("--json").stdout)["streams"]["CustomerReview"]
    assert (review["rows"], review["cursor_issues"]) == (1, {"missing": 1})
    assert any("missing 1" in w for w in review["warnings"])
