"""Reading document collections: typed columns from the specs, cursor increments, malformed data."""

import datetime as dt
import json

import duckdb
import pytest

from stripe_platform.ingestion.mongo_source import (
    collection_columns,
    read_by_cursor,
    read_change_stream,
    supports_change_streams,
)
from stripe_platform.warehouse.raw import DuckDBRaw, RawStream


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
