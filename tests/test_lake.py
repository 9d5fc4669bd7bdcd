"""The raw lake: layout, typing shared with the raw tables, DuckDB readability, idempotent re-delivery,
crash safety, on a local directory and on S3 (moto on loopback)."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from stripe_platform.config import get_settings, load_settings
from stripe_platform.lake.writer import LakeWriter
from stripe_platform.warehouse.raw import Column, RawStream, prepare

TRANSACTION = RawStream(
    namespace="raw_postgres",
    name="transaction",
    columns=(
        Column("id", "integer"),
        Column("amount", "decimal"),
        Column("fee", "number"),
        Column("currency", "string"),
        Column("captured", "boolean"),
        Column("created_at", "timestamp_tz"),
        Column("settled_on", "date"),
        Column("details", "json"),
    ),
    primary_key=("id",),
    mode="append_dedup",
    cdc="postgres",
)
# 23:30 UTC on March 5th, given in another zone: the partition follows the UTC date.
EXTRACTED = dt.datetime(2024, 3, 6, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
PARTITION = "extracted_date=2024-03-05"


def batch(n: int, start: int = 1) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table(
        {
            "id": ids,
            "amount": [f"{i}.25" for i in ids],
            "fee": [i / 10 for i in ids],
            "currency": ["EUR"] * n,
            "captured": [i % 2 == 0 for i in ids],
            "created_at": [dt.datetime(2024, 3, 5, 12, 0, i % 60, tzinfo=dt.UTC) for i in ids],
            "settled_on": [dt.date(2024, 3, 6)] * n,
            "details": [{"card": "visa", "n": i} for i in ids],
            "_ab_cdc_lsn": [1000 + i for i in ids],
        }
    )


def write(lake: LakeWriter, n: int = 3, *, sync_id: str = "sync-1", part: int = 0, **kw):
    return lake.write(
        "postgres",
        TRANSACTION,
        batch(n),
        sync_id=sync_id,
        generation_id=1,
        part=part,
        extracted_at=kw.pop("extracted_at", EXTRACTED),
        **kw,
    )


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def lake(tmp_path: Path) -> LakeWriter:
    return LakeWriter(tmp_path / "lake")


def fail_midway(
    monkeypatch: pytest.MonkeyPatch, probe: Callable[[], object] | None = None
) -> list[object]:
    """Make the parquet writer emit half the rows, then fail as a full disk or a kill would."""
    original = pq.ParquetWriter.write_table
    probed: list[object] = []

    def half_then_fail(self, table, *args, **kwargs):
        original(self, table.slice(0, table.num_rows // 2), *args, **kwargs)
        if probe is not None:
            probed.append(probe())
        raise OSError("No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", half_then_fail)
    return probed


# Local directory ---------------------------------------------------------------------------------


def test_layout_partitions_by_utc_extraction_date(lake: LakeWriter, tmp_path: Path):
    written = write(lake, 3, sync_id="sync-1", part=0)
    stream_dir = tmp_path / "lake" / "raw" / "postgres" / "transaction"
    assert written.path == str(stream_dir / PARTITION / "sync-1-0.parquet")
    assert (written.rows, written.extracted_date) == (3, dt.date(2024, 3, 5))
    assert written.bytes == os.path.getsize(written.path) > 0
    write(lake, 2, sync_id="sync-1", part=1)
    write(
        lake, 1, sync_id="sync-2", part=0, extracted_at=dt.datetime(2024, 3, 6, 0, 0, tzinfo=dt.UTC)
    )
    assert names_in(stream_dir) == [PARTITION, "extracted_date=2024-03-06"]
    # Only final names: no temporary file survives a successful write.
    assert names_in(stream_dir / PARTITION) == ["sync-1-0.parquet", "sync-1-1.parquet"]
    assert [
        (f.extracted_date.isoformat(), f.sync_id, f.part)
        for f in lake.list_files("postgres", TRANSACTION)
    ] == [
        ("2024-03-05", "sync-1", 0),
        ("2024-03-05", "sync-1", 1),
        ("2024-03-06", "sync-2", 0),
    ]
    assert lake.list_files("postgres", "never_synced") == []


def test_duckdb_reads_the_lake_with_the_raw_table_columns(lake: LakeWriter):
    write(lake, 3, part=0)
    write(lake, 4, part=1, extracted_at=dt.datetime(2024, 3, 7, 8, tzinfo=dt.UTC))
    glob = lake.duckdb_glob("postgres", TRANSACTION)
    assert glob.endswith("/raw/postgres/transaction/extracted_date=*/*.parquet")
    con = duckdb.connect()
    source = f"read_parquet('{glob}', hive_partitioning = true)"
    types = dict(
        con.execute(
            f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {source})"
        ).fetchall()
    )
    assert types == {
        "id": "BIGINT",
        "amount": "DECIMAL(38,9)",
        "fee": "DOUBLE",
        "currency": "VARCHAR",
        "captured": "BOOLEAN",
        "created_at": "TIMESTAMP WITH TIME ZONE",
        "settled_on": "DATE",
        "details": "VARCHAR",
        "_airbyte_raw_id": "VARCHAR",
        "_airbyte_extracted_at": "TIMESTAMP WITH TIME ZONE",
        "_airbyte_meta": "VARCHAR",
        "_airbyte_generation_id": "BIGINT",
        "_ab_cdc_lsn": "BIGINT",
        "_ab_cdc_updated_at": "TIMESTAMP WITH TIME ZONE",
        "_ab_cdc_deleted_at": "TIMESTAMP WITH TIME ZONE",
        "extracted_date": "DATE",
    }
    con.execute("SET TimeZone = 'UTC'")
    by_day = con.execute(
        f"SELECT extracted_date, count(*), count(DISTINCT _airbyte_raw_id), min(_airbyte_extracted_at) "
        f"FROM {source} GROUP BY ALL ORDER BY 1"
    ).fetchall()
    assert [(d, n, distinct) for d, n, distinct, _ in by_day] == [
        (dt.date(2024, 3, 5), 3, 3),
        (dt.date(2024, 3, 7), 4, 4),
    ]
    assert by_day[0][3] == EXTRACTED
    row = con.execute(
        f"SELECT id, amount::VARCHAR, captured, created_at, details, _airbyte_meta, _ab_cdc_lsn "
        f"FROM {source} WHERE id = 2 AND extracted_date = DATE '2024-03-05'"
    ).fetchone()
    assert row[:4] == (2, "2.250000000", True, dt.datetime(2024, 3, 5, 12, 0, 2, tzinfo=dt.UTC))
    assert json.loads(row[4]) == {"card": "visa", "n": 2}
    assert json.loads(row[5]) == {"sync_id": "sync-1", "changes": []}
    assert row[6] == 1002


def test_files_are_the_raw_tables_shape_in_portable_parquet(lake: LakeWriter):
    written = write(lake, 5)
    expected, _ = prepare(
        TRANSACTION, batch(5), sync_id="sync-1", generation_id=1, extracted_at=EXTRACTED
    )
    assert pq.read_schema(written.path).remove_metadata() == expected.schema
    meta = pq.ParquetFile(written.path).metadata
    column = meta.row_group(0).column(meta.schema.names.index("created_at"))
    assert column.compression == "SNAPPY"
    logical = str(meta.schema.column(meta.schema.names.index("created_at")).logical_type)
    assert "isAdjustedToUTC=true" in logical
    assert "timeUnit=microseconds" in logical


def test_values_that_do_not_fit_are_nulled_and_reported(lake: LakeWriter):
    bad = batch(2).set_column(0, "id", pa.array(["7", "not a number"]))
    written = lake.write(
        "postgres", TRANSACTION, bad, sync_id="s", generation_id=1, part=0, extracted_at=EXTRACTED
    )
    assert written.nulled == {"id": 1}
    ids = pq.read_table(written.path, columns=["id", "_airbyte_meta"]).to_pylist()
    assert [r["id"] for r in ids] == [7, None]
    assert json.loads(ids[1]["_airbyte_meta"])["changes"][0]["field"] == "id"


def test_redelivered_part_replaces_its_own_file(lake: LakeWriter):
    first = write(lake, 5, sync_id="sync-9", part=3)
    again = write(lake, 2, sync_id="sync-9", part=3)
    assert again.path == first.path
    assert [f.path for f in lake.list_files("postgres", TRANSACTION)] == [first.path]
    assert pq.read_metadata(first.path).num_rows == 2
    assert names_in(Path(first.path).parent) == ["sync-9-3.parquet"]


def test_a_crash_midway_never_leaves_a_file_under_the_final_name(
    lake: LakeWriter, monkeypatch: pytest.MonkeyPatch
):
    kept = write(lake, 4, part=0)
    directory = Path(kept.path).parent
    # What is on disk at the moment of failure: a partly written hidden temporary file.
    probed = fail_midway(
        monkeypatch,
        lambda: sorted((p.name[0], p.suffix) for p in directory.iterdir() if p.stat().st_size),
    )
    with pytest.raises(OSError, match="No space left"):
        write(lake, 10, part=1)
    with pytest.raises(OSError, match="No space left"):
        write(lake, 10, part=0)  # a retry of a part that already landed
    assert probed == [[(".", ".tmp"), ("s", ".parquet")]] * 2
    assert names_in(directory) == ["sync-1-0.parquet"]  # no part 1, no temporary file
    assert pq.read_metadata(kept.path).num_rows == 4  # the previous delivery is intact
    monkeypatch.undo()
    assert write(lake, 10, part=1).rows == 10


def test_temporary_files_from_a_killed_process_are_ignored_then_swept(lake: LakeWriter):
    written = write(lake, 1)
    orphan = Path(written.path).parent / ".sync-1-1.parquet.0123abcd.tmp"
    orphan.write_bytes(b"PAR1 half a file")
    assert len(lake.list_files("postgres", TRANSACTION)) == 1
    glob = lake.duckdb_glob("postgres", TRANSACTION)
    count = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone()
    assert count == (1,)
    assert lake.sweep_temporary("postgres", TRANSACTION) == 0  # too recent: may still be in flight
    old = (dt.datetime.now() - dt.timedelta(hours=2)).timestamp()
    os.utime(orphan, (old, old))
    assert lake.sweep_temporary("postgres", TRANSACTION) == 1
    assert not orphan.exists()
    assert Path(written.path).exists()


@pytest.mark.parametrize(
    ("source", "sync_id", "part", "extracted_at", "message"),
    [
        ("post/gres", "s", 0, EXTRACTED, "source"),
        ("postgres", "../s", 0, EXTRACTED, "sync id"),
        ("postgres", "_hidden", 0, EXTRACTED, "sync id"),
        ("postgres", "s", -1, EXTRACTED, "part"),
        ("postgres", "s", 0, dt.datetime(2024, 3, 5), "timezone"),
    ],
)
def test_unsafe_names_are_refused(lake, source, sync_id, part, extracted_at, message):
    with pytest.raises(ValueError, match=message):
        lake.write(
            source,
            TRANSACTION,
            batch(1),
            sync_id=sync_id,
            generation_id=1,
            part=part,
            extracted_at=extracted_at,
        )


def test_default_root_is_the_platform_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(tmp_path))
    monkeypatch.delenv("STRIPE_PLATFORM_LAKE_URI", raising=False)
    get_settings.cache_clear()
    try:
        assert LakeWriter().base == str(tmp_path.resolve() / "lake")
    finally:
        get_settings.cache_clear()
    assert LakeWriter.from_settings(load_settings(home=tmp_path)).base == str(
        tmp_path.resolve() / "lake"
    )


# S3 (moto server on loopback) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class S3:
    endpoint: str
    client: object
    bucket: str
    filesystem: pafs.S3FileSystem

    def keys(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket)
        return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    filesystem = pafs.S3FileSystem(
        endpoint_override=moto_endpoint.removeprefix("http://"), scheme="http", region="us-east-1"
    )
    return S3(moto_endpoint, client, bucket, filesystem)


def test_s3_layout_and_read_back(s3: S3):
    lake = LakeWriter(f"s3://{s3.bucket}/exploration", s3.filesystem)
    first = write(lake, 3, part=0)
    write(lake, 4, part=1)
    prefix = f"exploration/raw/postgres/transaction/{PARTITION}"
    assert first.path == f"s3://{s3.bucket}/{prefix}/sync-1-0.parquet"
    # Exactly the data files: no directory markers, no temporary keys.
    assert s3.keys() == [f"{prefix}/sync-1-0.parquet", f"{prefix}/sync-1-1.parquet"]
    body = s3.client.get_object(Bucket=s3.bucket, Key=f"{prefix}/sync-1-0.parquet")["Body"].read()
    assert len(body) == first.bytes
    table = pq.read_table(pa.BufferReader(body))
    expected, _ = prepare(
        TRANSACTION, batch(3), sync_id="sync-1", generation_id=1, extracted_at=EXTRACTED
    )
    assert table.schema.remove_metadata() == expected.schema
    assert table.column("id").to_pylist() == [1, 2, 3]
    # pyarrow straight from the bucket, with the partition column from the directory name.
    dataset = ds.dataset(
        f"{s3.bucket}/exploration/raw/postgres/transaction",
        filesystem=s3.filesystem,
        format="parquet",
        partitioning="hive",
    )
    assert dataset.to_table(columns=["extracted_date"]).num_rows == 7
    assert [f.path for f in lake.list_files("postgres", TRANSACTION)] == [
        f"s3://{s3.bucket}/{prefix}/sync-1-0.parquet",
        f"s3://{s3.bucket}/{prefix}/sync-1-1.parquet",
    ]
    assert lake.duckdb_glob("postgres", TRANSACTION) == (
        f"s3://{s3.bucket}/exploration/raw/postgres/transaction/extracted_date=*/*.parquet"
    )


def test_s3_redelivery_replaces_and_a_crash_publishes_nothing(
    s3: S3, monkeypatch: pytest.MonkeyPatch
):
    lake = LakeWriter(f"s3://{s3.bucket}/exploration", s3.filesystem)
    write(lake, 5, part=0)
    write(lake, 2, part=0)
    (key,) = s3.keys()
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    assert pq.read_metadata(pa.BufferReader(body)).num_rows == 2
    fail_midway(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write(lake, 10, part=1)
    with pytest.raises(OSError, match="No space left"):
        write(lake, 10, part=0)
    assert s3.keys() == [key]
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    assert pq.read_metadata(pa.BufferReader(body)).num_rows == 2
    assert not s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


def test_s3_from_settings_uses_the_configured_endpoint(s3: S3, tmp_path: Path):
    settings = load_settings(
        home=tmp_path, lake_uri=f"s3://{s3.bucket}/lake", s3_endpoint_url=s3.endpoint
    )
    written = write(LakeWriter.from_settings(settings), 1)
    assert (
        written.path
        == f"s3://{s3.bucket}/lake/raw/postgres/transaction/{PARTITION}/sync-1-0.parquet"
    )
    assert s3.keys() == [f"lake/raw/postgres/transaction/{PARTITION}/sync-1-0.parquet"]
