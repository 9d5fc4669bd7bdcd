"""The Destinations V2 raw layer in DuckDB: typing, dedup, tombstones, drift, state atomicity."""

import json

import duckdb
import pyarrow as pa
import pytest

from stripe_platform import rawlayer
from stripe_platform.rawlayer import Column, RawStream, SchemaChangeError
from stripe_platform.warehouse.duckdb import DuckDBRaw

MERCHANT = RawStream(
    namespace="raw_postgres",
    name="merchant",
    columns=(Column("id", "integer"), Column("name", "string"), Column("rating", "number")),
    primary_key=("id",),
    mode="append_dedup",
    cdc="postgres",
)


@pytest.fixture
def raw(tmp_path):
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    yield DuckDBRaw(conn)
    conn.close()


def rows(raw, sql):
    return raw.conn.execute(sql).fetchall()


def batch(**columns):
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
    with pytest.raises(duckdb.ConstraintException):
        raw.conn.execute("CREATE UNIQUE INDEX merchant_name ON raw_postgres.merchant (name)")
        raw.write(
            MERCHANT,
            batch(id=[2, 3], name=["a", "a"], rating=[1.0, 2.0], _ab_cdc_lsn=[2, 3]),
            sync_id="s2",
            generation_id=1,
            state={"lsn": 3},
        )
    assert rows(raw, "SELECT count(*) FROM raw_postgres.merchant") == [(1,)]
    assert raw.state(MERCHANT) == {"lsn": 1}


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


def test_metadata_columns_are_built_in_bulk(raw, monkeypatch):
    """Raw ids are distinct version-4 UUID text (also across int32-offset chunks), and only the
    rows whose value did not fit carry changes in their _airbyte_meta."""
    import uuid

    ids = rawlayer._uuid4_strings(1000).to_pylist()
    assert len(set(ids)) == 1000
    for text in ids:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)
    assert rawlayer._uuid4_strings(0).to_pylist() == []
    monkeypatch.setattr(rawlayer, "_MAX_STRING_BYTES", 36 * 3)  # 3 ids per chunk
    chunked = rawlayer._uuid4_strings(7)
    assert isinstance(chunked, pa.ChunkedArray) and chunked.num_chunks == 3
    assert all(uuid.UUID(t).version == 4 for t in chunked.to_pylist())
    assert rawlayer._repeat_string("{}", 4).to_pylist() == ["{}"] * 4

    typed, nulled = rawlayer.prepare(
        MERCHANT,
        batch(id=[1, 2, 3], name=["a", "b", "c"], rating=["4.5", "oops", "3"]),
        sync_id="s9",
        generation_id=7,
    )
    assert nulled == {"rating": 1}
    assert typed.column("rating").to_pylist() == [4.5, None, 3.0]
    metas = [json.loads(m) for m in typed.column("_airbyte_meta").to_pylist()]
    assert metas[0] == metas[2] == {"sync_id": "s9", "changes": []}
    assert metas[1]["changes"] == [
        {"field": "rating", "change": "NULLED", "reason": "DESTINATION_TYPECAST_ERROR"}
    ]
    assert typed.column("_airbyte_generation_id").to_pylist() == [7, 7, 7]
    assert len(set(typed.column("_airbyte_extracted_at").to_pylist())) == 1


def test_a_snapshot_into_an_empty_table_appends_then_dedupes(raw):
    """begin_snapshot on an empty table: batches are appended, not merged; finish_overwrite still
    leaves one row per key (the latest), so a source with a repeated key cannot duplicate it."""
    raw.begin_snapshot(MERCHANT, 5)
    for ids, lsn in (([1, 2], 10), ([2, 3], 11)):
        raw.write(
            MERCHANT,
            batch(id=ids, name=[f"n{i}" for i in ids], rating=[1.0] * 2, _ab_cdc_lsn=[lsn] * 2),
            sync_id="s1",
            generation_id=5,
            state=None,
        )
    assert rows(raw, "SELECT count(*) FROM raw_postgres.merchant") == [(4,)]  # appended
    raw.finish_overwrite(MERCHANT, 5, {"lsn": 11})
    assert rows(raw, "SELECT id, _ab_cdc_lsn FROM raw_postgres.merchant ORDER BY id") == [
        (1, 10),
        (2, 11),
        (3, 11),
    ]
    # Later writes of the same generation (the change stream) merge again.
    raw.write(
        MERCHANT,
        batch(id=[3], name=["n3b"], rating=[2.0], _ab_cdc_lsn=[12]),
        sync_id="s2",
        generation_id=5,
        state=None,
    )
    assert rows(raw, "SELECT count(*), max(name) FROM raw_postgres.merchant WHERE id = 3") == [
        (1, "n3b")
    ]
    # A new snapshot over a table that has rows merges from the start.
    raw.begin_snapshot(MERCHANT, 6)
    raw.write(
        MERCHANT,
        batch(id=[1], name=["n1b"], rating=[1.0], _ab_cdc_lsn=[13]),
        sync_id="s3",
        generation_id=6,
        state=None,
    )
    assert rows(raw, "SELECT count(*) FROM raw_postgres.merchant WHERE id = 1") == [(1,)]
    raw.finish_overwrite(MERCHANT, 6, None)
    assert rows(raw, "SELECT id, name FROM raw_postgres.merchant") == [(1, "n1b")]


def test_compatible_type_changes_widen_the_column_and_keep_the_data(raw):
    v1 = RawStream(
        namespace="raw_postgres",
        name="payment",
        columns=(Column("id", "integer"), Column("amount", "integer"), Column("note", "string")),
    )
    raw.write(
        v1,
        batch(id=[1, 2], amount=[10, 20], note=['{"k": 1}', "[2]"]),
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
    got = rows(raw, "SELECT id, amount, note FROM raw_postgres.payment ORDER BY id")
    assert [(i, a, json.loads(n)) for i, a, n in got] == [
        (1, 10.0, {"k": 1}),
        (2, 20.0, [2]),
        (3, 0.5, ["x"]),  # not truncated to the integer column it would have gone into
    ]
    assert dict(
        rows(
            raw,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'raw_postgres' AND table_name = 'payment' "
            "AND column_name IN ('amount', 'note')",
        )
    ) == {"amount": "DOUBLE", "note": "JSON"}


def test_text_that_is_not_json_survives_a_widening_to_json(raw):
    """As the PostgreSQL and Snowflake writers do: a plain cast to JSON refuses such text."""
    v1 = RawStream(
        namespace="raw_postgres",
        name="note",
        columns=(Column("id", "integer"), Column("note", "string")),
    )
    raw.write(
        v1, batch(id=[1, 2, 3], note=["plain", "", None]), sync_id="s1", generation_id=1, state=None
    )
    v2 = RawStream(
        namespace="raw_postgres",
        name="note",
        columns=(Column("id", "integer"), Column("note", "json")),
    )
    raw.write(v2, batch(id=[4], note=['["x"]']), sync_id="s2", generation_id=1, state=None)
    got = rows(raw, "SELECT id, note FROM raw_postgres.note ORDER BY id")
    assert [(i, None if n is None else json.loads(n)) for i, n in got] == [
        (1, "plain"),
        (2, ""),  # a JSON string, not NULL
        (3, None),
        (4, ["x"]),
    ]
