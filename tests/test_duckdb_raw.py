"""What only the DuckDB raw writer does (the contract every writer keeps: tests/test_raw_layer.py)."""

import duckdb
import pytest

from raw_streams import MERCHANT, batch
from stripe_platform.warehouse.duckdb import DuckDBRaw


@pytest.fixture
def raw(tmp_path):
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    yield DuckDBRaw(conn)
    conn.close()


def rows(raw, sql):
    return raw.conn.execute(sql).fetchall()


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
