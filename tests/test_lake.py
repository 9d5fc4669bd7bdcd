"""The raw lake: layout, typing shared with the raw tables, DuckDB readability, idempotent re-delivery,
crash safety, generations superseded after a complete snapshot, file modes, on a local directory and
on S3 (moto on loopback)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import stat
import threading
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
from pymongo.database import Database

from stripe_platform.config import Settings, get_settings, load_settings
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import Engine, open_writer
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.lake.target import LakeRaw
from stripe_platform.lake.writer import GENERATION_KEY, LakeWriter
from stripe_platform.oltp import db
from stripe_platform.rawlayer import Column, RawStream, prepare
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec

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


# Generations: a snapshot's rows and the changes after it carry the snapshot's generation id.
G1, G2, G3 = 1_000, 2_000, 3_000


@pytest.fixture
def today() -> str:
    """The partition LakeRaw writes now (it stamps the current time), taken when the test starts:
    a module constant would be taken at collection, and a run crossing midnight UTC broke on it."""
    return f"extracted_date={dt.datetime.now(dt.UTC).date().isoformat()}"


# What a reader does to see the stream's current rows (docs/ingestion.md): the latest version of
# each key by generation then LSN, without the keys whose latest version is a deletion.
LIVE_ROWS = """
    SELECT id, amount::VARCHAR FROM {source}
    QUALIFY row_number() OVER (PARTITION BY id
                               ORDER BY _airbyte_generation_id DESC, _ab_cdc_lsn DESC NULLS LAST,
                                        _airbyte_extracted_at DESC) = 1
        AND _ab_cdc_deleted_at IS NULL
    ORDER BY id"""


def versions(ids: list[int], lsn: int, amount: str = "1.00", *, deleted: bool = False) -> pa.Table:
    """Rows of TRANSACTION as the engine hands them over: a snapshot's or a change batch's."""
    n = len(ids)
    when = dt.datetime(2024, 3, 5, 12, tzinfo=dt.UTC)
    return pa.table(
        {
            "id": ids,
            "amount": [amount] * n,
            "currency": ["EUR"] * n,
            "_ab_cdc_lsn": [lsn] * n,
            "_ab_cdc_updated_at": [when] * n,
            "_ab_cdc_deleted_at": pa.array(
                [when if deleted else None] * n, pa.timestamp("us", "UTC")
            ),
        }
    )


def live_rows(lake: LakeWriter) -> list[tuple[int, str]]:
    """The stream's current rows through the documented DuckDB glob read."""
    glob = lake.duckdb_glob("postgres", TRANSACTION)
    source = f"read_parquet('{glob}', hive_partitioning = true, union_by_name = true)"
    return duckdb.connect().execute(LIVE_ROWS.format(source=source)).fetchall()


def lose_the_slot_and_resnapshot(raw: LakeRaw) -> int:
    """The issue's history: a snapshot and its changes; the slot lost while ids 2 and 4 are deleted
    at the source (no change rows for them); a re-snapshot that dies after one batch; a complete
    re-snapshot, then a change after it. Returns what the re-snapshot's finish moved."""
    t = TRANSACTION
    raw.write(t, versions([1, 2, 3], 100), sync_id="sync-a", generation_id=G1, state=None)
    raw.write(t, versions([4, 5, 6], 100), sync_id="sync-a", generation_id=G1, state=None)
    assert raw.finish_overwrite(t, G1, None) == 0  # nothing older than the first snapshot
    raw.write(t, versions([3], 200, "3.50"), sync_id="sync-b", generation_id=G1, state=None)
    raw.write(t, versions([6], 201, deleted=True), sync_id="sync-b", generation_id=G1, state=None)
    # Slot lost; ids 2 and 4 deleted at the source. A re-snapshot dies after its first batch:
    raw.write(t, versions([1, 2], 300), sync_id="sync-c", generation_id=G2, state=None)
    # The complete re-snapshot (id 7 inserted meanwhile), then a change after it.
    raw.write(t, versions([3], 400, "3.50"), sync_id="sync-d", generation_id=G3, state=None)
    raw.write(t, versions([1, 5, 7], 400), sync_id="sync-d", generation_id=G3, state=None)
    moved = raw.finish_overwrite(t, G3, {"generation": G3})
    raw.write(t, versions([5], 500, "5.75"), sync_id="sync-e", generation_id=G3, state=None)
    return moved


AFTER_RESNAPSHOT = [(1, "1.000000000"), (3, "3.500000000"), (5, "5.750000000"), (7, "1.000000000")]


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


def test_a_lake_sync_sweeps_old_temporaries_of_its_own_source_only(tmp_path: Path):
    """Temporaries of killed writes hold rows (personal data): the first write of a stream in a
    sync deletes those of that stream older than an hour; a recent one may be a write under way,
    and another source's prefix may belong to another connection sharing the lake."""
    lake = LakeWriter(tmp_path / "lake")
    two_hours_ago = (dt.datetime.now() - dt.timedelta(hours=2)).timestamp()
    planted = {}
    for source, age in (("postgres", "old"), ("postgres", "new"), ("mongodb", "old")):
        directory = Path(lake.stream_dir(source, TRANSACTION)) / "extracted_date=2024-03-05"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f".s-0.parquet.{age}.tmp"
        path.write_bytes(b"PAR1 half a file")
        if age == "old":
            os.utime(path, (two_hours_ago, two_hours_ago))
        planted[source, age] = path
    raw = LakeRaw(lake, "postgres")
    raw.write(TRANSACTION, batch(2), sync_id="s1", generation_id=1, state=None)
    assert not planted["postgres", "old"].exists()
    assert planted["postgres", "new"].exists() and planted["mongodb", "old"].exists()
    # Only at a stream's first write of the sync: later writes list nothing again.
    os.utime(planted["postgres", "new"], (two_hours_ago, two_hours_ago))
    raw.write(TRANSACTION, batch(2, 3), sync_id="s1", generation_id=1, state=None)
    assert planted["postgres", "new"].exists()
    LakeRaw(lake, "postgres").write(
        TRANSACTION, batch(1), sync_id="s2", generation_id=1, state=None
    )
    assert not planted["postgres", "new"].exists() and planted["mongodb", "old"].exists()
    assert len(lake.list_files("postgres", TRANSACTION)) == 3


def test_a_lake_that_cannot_be_written_or_read_names_its_variable_and_path(tmp_path: Path):
    """Raised by the lake writer where its filesystem refuses: a one-line error of the platform
    (no traceback on the command line) that is still an OSError."""
    from stripe_platform.errors import PlatformError
    from stripe_platform.lake.writer import LakeUnreachable

    root = tmp_path / "lake"
    root.mkdir()
    (root / "raw").write_text("a file where the lake's directory belongs")
    raw = LakeRaw(LakeWriter(root), "postgres")
    with pytest.raises(LakeUnreachable) as written:
        raw.write(TRANSACTION, batch(1), sync_id="s1", generation_id=1, state=None)
    message = str(written.value)
    assert message.startswith(f"STRIPE_PLATFORM_LAKE_URI: the lake {root} cannot be written (")
    assert f"{root}/raw/postgres/transaction/extracted_date=" in message
    assert "accepted forms: a local directory, or s3://bucket/prefix" in message
    assert isinstance(written.value, PlatformError) and isinstance(written.value, OSError)
    state = root / "_stripe_platform" / "state" / "postgres.transaction.json"
    state.mkdir(parents=True)  # a directory where the state file belongs
    with pytest.raises(LakeUnreachable, match=f"cannot be read \\({state}: "):
        raw.state(TRANSACTION)


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

    def data_keys(self) -> list[str]:
        """The keys outside the sync state's prefix."""
        return [k for k in self.keys() if "/_stripe_platform/" not in k]


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


# Generations -------------------------------------------------------------------------------------


def test_a_resnapshot_supersedes_older_generations_so_source_deletes_stay_deleted(
    tmp_path: Path, today: str
):
    lake = LakeWriter(tmp_path / "lake")
    raw = LakeRaw(lake, "postgres")
    moved = lose_the_slot_and_resnapshot(raw)
    # Ids 2 and 4 were deleted at the source between the snapshots: no reader of raw/ sees them.
    assert live_rows(lake) == AFTER_RESNAPSHOT
    assert moved == 10  # 3 + 3 + 1 + 1 rows of the first generation, 2 of the dead attempt's
    assert [(f.sync_id, f.part) for f in lake.list_files("postgres", TRANSACTION)] == [
        ("sync-d", 5),
        ("sync-d", 6),
        ("sync-e", 7),
    ]
    # The older generations are history, under their own names, readable the same way.
    history = tmp_path / "lake" / "superseded" / "postgres" / "transaction"
    assert sorted(str(p.relative_to(history)) for p in history.rglob("*.parquet")) == [
        f"generation={G1}/{today}/sync-a-0.parquet",
        f"generation={G1}/{today}/sync-a-1.parquet",
        f"generation={G1}/{today}/sync-b-2.parquet",
        f"generation={G1}/{today}/sync-b-3.parquet",
        f"generation={G2}/{today}/sync-c-4.parquet",
    ]
    by_generation = (
        duckdb.connect()
        .execute(
            "SELECT generation, count(*), list(id ORDER BY id) FROM read_parquet(?, "
            "hive_partitioning = true) GROUP BY ALL ORDER BY 1",
            [lake.history_glob("postgres", TRANSACTION)],
        )
        .fetchall()
    )
    assert by_generation == [(G1, 8, [1, 2, 3, 3, 4, 5, 6, 6]), (G2, 2, [1, 2])]
    assert raw.state(TRANSACTION) == {"generation": G3}
    # A finish with nothing older moves nothing.
    assert raw.finish_overwrite(TRANSACTION, G3, None) == 0
    assert live_rows(lake) == AFTER_RESNAPSHOT


def test_s3_resnapshot_leaves_only_the_live_generation_under_the_stream_prefix(s3: S3, today: str):
    lake = LakeWriter(f"s3://{s3.bucket}/exploration", s3.filesystem)
    assert lose_the_slot_and_resnapshot(LakeRaw(lake, "postgres")) == 10
    live = f"exploration/raw/postgres/transaction/{today}"
    old = f"exploration/superseded/postgres/transaction/generation={{}}/{today}"
    assert "exploration/_stripe_platform/state/postgres.transaction.json" in set(s3.keys())
    assert s3.data_keys() == [
        f"{live}/",  # the zero-byte marker pyarrow's S3 delete leaves; no reader takes it for data
        f"{live}/sync-d-5.parquet",
        f"{live}/sync-d-6.parquet",
        f"{live}/sync-e-7.parquet",
        f"{old.format(G1)}/sync-a-0.parquet",
        f"{old.format(G1)}/sync-a-1.parquet",
        f"{old.format(G1)}/sync-b-2.parquet",
        f"{old.format(G1)}/sync-b-3.parquet",
        f"{old.format(G2)}/sync-c-4.parquet",
    ]
    # What an Athena table or a Snowflake external table located at the stream's prefix reads.
    con = duckdb.connect()
    con.register(
        "located",
        ds.dataset(
            f"{s3.bucket}/exploration/raw/postgres/transaction",
            filesystem=s3.filesystem,
            format="parquet",
            partitioning="hive",
        ).to_table(),
    )
    assert con.execute(LIVE_ROWS.format(source="located")).fetchall() == AFTER_RESNAPSHOT


def test_a_resnapshot_of_an_emptied_table_leaves_an_empty_live_generation(tmp_path: Path):
    lake = LakeWriter(tmp_path / "lake")
    raw = LakeRaw(lake, "postgres")
    raw.write(TRANSACTION, versions([1, 2], 100), sync_id="sync-a", generation_id=G1, state=None)
    raw.finish_overwrite(TRANSACTION, G1, None)
    moved = raw.finish_overwrite(TRANSACTION, G2, None)  # every row deleted at the source
    assert live_rows(lake) == []
    assert moved == 2
    assert [f.sync_id for f in lake.list_files("postgres", TRANSACTION)] == [f"empty-{G2}"]
    # ... and that empty file is the live generation: the next finish of G2 keeps it.
    assert raw.finish_overwrite(TRANSACTION, G2, None) == 0
    assert [f.sync_id for f in lake.list_files("postgres", TRANSACTION)] == [f"empty-{G2}"]


@pytest.mark.parametrize("statistics", [True, False], ids=["statistics", "no-statistics"])
def test_files_without_a_recorded_generation_are_superseded_by_their_rows(
    tmp_path: Path, statistics: bool, today: str
):
    """Files written before generations were recorded in the footer's metadata (or by another
    writer, without statistics): the generation comes from the column itself."""
    lake = LakeWriter(tmp_path / "lake")
    old, _ = prepare(TRANSACTION, versions([1, 2], 100), sync_id="s", generation_id=G1)
    directory = Path(lake.stream_dir("postgres", TRANSACTION)) / today
    directory.mkdir(parents=True)
    pq.write_table(old, directory / "sync-a-0.parquet", write_statistics=statistics)
    assert GENERATION_KEY not in (pq.read_metadata(directory / "sync-a-0.parquet").metadata or {})
    raw = LakeRaw(lake, "postgres")
    raw.write(TRANSACTION, versions([1], 200), sync_id="sync-b", generation_id=G2, state=None)
    moved = raw.finish_overwrite(TRANSACTION, G2, None)
    assert live_rows(lake) == [(1, "1.000000000")]
    assert moved == 2


def test_an_interrupted_supersede_keeps_the_live_generation_and_finishes_next_time(
    tmp_path: Path, today: str
):
    lake = LakeWriter(tmp_path / "lake")
    raw = LakeRaw(lake, "postgres")
    for i in range(3):
        raw.write(TRANSACTION, versions([i], 100), sync_id="sync-a", generation_id=G1, state=None)
    raw.write(
        TRANSACTION, versions([0, 1], 200, "2.00"), sync_id="sync-b", generation_id=G2, state=None
    )
    # The second of the three moves fails: something already sits where its file should go.
    history = Path(lake.history_dir("postgres", TRANSACTION)) / f"generation={G1}" / today
    (history / "sync-a-1.parquet").mkdir(parents=True)
    with pytest.raises(OSError):
        raw.finish_overwrite(TRANSACTION, G2, {"generation": G2})
    assert raw.state(TRANSACTION) is None  # not complete, so the state does not say it is
    assert [(f.sync_id, f.part) for f in lake.list_files("postgres", TRANSACTION)] == [
        ("sync-a", 1),
        ("sync-a", 2),
        ("sync-b", 3),
    ]
    assert names_in(history) == ["sync-a-0.parquet", "sync-a-1.parquet"]  # the obstacle
    # Every row of the live generation is still read (id 2 is stale until the move completes).
    assert live_rows(lake) == [(0, "2.000000000"), (1, "2.000000000"), (2, "1.000000000")]
    (history / "sync-a-1.parquet").rmdir()
    assert raw.finish_overwrite(TRANSACTION, G2, {"generation": G2}) == 2
    assert [(f.sync_id, f.part) for f in lake.list_files("postgres", TRANSACTION)] == [
        ("sync-b", 3)
    ]
    assert names_in(history) == ["sync-a-0.parquet", "sync-a-1.parquet", "sync-a-2.parquet"]
    assert live_rows(lake) == [(0, "2.000000000"), (1, "2.000000000")]
    assert raw.state(TRANSACTION) == {"generation": G2}


@pytest.fixture
def seeded(
    settings: Settings, database: str, docdb: Database, seed_templates
) -> Iterator[Settings]:
    """A small seeded source database and document database, the test's own on the session's
    servers (as test_sync_engine's platform fixture seeds them)."""
    s = settings.model_copy(update={"pg_database": database, "mongodb_database": docdb.name})
    spec = make_spec(scale=0.003, seed=4, end=dt.date(2026, 11, 1), max_documents=300)
    seed_templates.seed(s, build(spec), docdb)
    yield s
    with db.connect(s, autocommit=True) as conn:
        cdc.drop_slot(conn, load_catalog().resolve("postgres-to-s3").slot(conn.info.dbname))


def test_the_engine_after_a_lost_slot_shows_no_row_deleted_in_between(
    seeded: Settings, tmp_path: Path
):
    """The issue's reproduction through the engine and a real PostgreSQL: rows deleted while the
    slot is gone (so no change rows ever say so) are not read back from the lake once the new
    snapshot is complete; a full-refresh stream shows one read of its table, not two."""
    s = seeded.model_copy(update={"lake_uri": str(tmp_path / "lake")})
    connection = load_catalog().resolve("postgres-to-s3")
    lake = LakeWriter(tmp_path / "lake")

    def sync() -> str:
        return Engine(s, connection, open_writer(s, connection)).sync().phase

    def source(query: str) -> list[tuple]:
        with db.connect(s) as conn:
            return conn.execute(query).fetchall()

    def lake_rows(query: str, stream: str) -> list[tuple]:
        read = f"read_parquet('{lake.duckdb_glob('postgres', stream)}', union_by_name = true)"
        return duckdb.connect().execute(query.format(stream=read)).fetchall()

    assert sync() == "snapshot"
    with db.connect(s, autocommit=True) as conn:
        deleted = conn.execute(
            "DELETE FROM Transaction WHERE ID IN (SELECT ID FROM Transaction ORDER BY ID LIMIT 5) "
            "RETURNING ID"
        ).fetchall()
        # As a DBA, max_slot_wal_keep_size or a failover would.
        cdc.drop_slot(conn, connection.slot(conn.info.dbname))
    assert len(deleted) == 5
    assert sync() == "snapshot"
    live = lake_rows(
        "SELECT id FROM {stream} QUALIFY row_number() OVER (PARTITION BY id, datetime "
        "ORDER BY _airbyte_generation_id DESC, _ab_cdc_lsn DESC NULLS LAST, "
        "_airbyte_extracted_at DESC) = 1 "
        "AND _ab_cdc_deleted_at IS NULL ORDER BY id",
        "transaction",
    )
    assert live == source("SELECT ID FROM Transaction ORDER BY ID")
    assert not set(deleted) & set(live)
    assert lake_rows("SELECT count(*) FROM {stream}", "currency") == source(
        "SELECT count(*) FROM Currency"
    )
    # The first snapshot is history, with the deleted rows in it.
    history = duckdb.connect().execute(
        "SELECT count(DISTINCT generation), count(*) FILTER (id IN (SELECT unnest(?))) "
        "FROM read_parquet(?, hive_partitioning = true)",
        [[i for (i,) in deleted], lake.history_glob("postgres", "transaction")],
    )
    assert history.fetchone() == (1, 5)


class OneCallFailing:
    """The lake's S3 filesystem with the second call of one method failing (a dropped connection);
    everything else goes to the real one."""

    def __init__(self, filesystem: pafs.FileSystem, method: str) -> None:
        self.filesystem, self.method = filesystem, method
        self.calls, self.lock = itertools.count(1), threading.Lock()

    def __getattr__(self, name: str):
        real = getattr(self.filesystem, name)
        if name != self.method:
            return real

        def failing(*args):
            with self.lock:
                call = next(self.calls)
            if call == 2:
                raise OSError("Connection reset by peer")
            return real(*args)

        return failing


@pytest.mark.parametrize("failing", ["copy_file", "delete_file"])
def test_s3_a_move_failing_half_way_loses_nothing_and_finishes_next_time(
    s3: S3, failing: str, today: str
):
    lake = LakeWriter(f"s3://{s3.bucket}/lake", s3.filesystem)
    raw = LakeRaw(lake, "postgres")
    for i in range(3):
        raw.write(TRANSACTION, versions([i], 100), sync_id="sync-a", generation_id=G1, state=None)
    raw.write(
        TRANSACTION, versions([0, 1], 200, "2.00"), sync_id="sync-b", generation_id=G2, state=None
    )
    live = f"lake/raw/postgres/transaction/{today}"
    old = f"lake/superseded/postgres/transaction/generation={G1}/{today}"
    lake.filesystem = OneCallFailing(s3.filesystem, failing)
    with pytest.raises(OSError, match="Connection reset"):
        raw.finish_overwrite(TRANSACTION, G2, {"generation": G2})
    keys = set(s3.keys())
    # Each old file is live or history (both, if its delete failed after its copy), never neither.
    names = [f"sync-a-{i}.parquet" for i in range(3)]
    assert all(f"{live}/{n}" in keys or f"{old}/{n}" in keys for n in names)
    assert sum(f"{live}/{n}" in keys for n in names) == 1  # the one whose move failed
    assert sum(f"{old}/{n}" in keys for n in names) == (3 if failing == "delete_file" else 2)
    assert f"{live}/sync-b-3.parquet" in keys
    assert "lake/_stripe_platform/state/postgres.transaction.json" not in keys
    lake.filesystem = s3.filesystem
    assert raw.finish_overwrite(TRANSACTION, G2, {"generation": G2}) == 1
    assert "lake/_stripe_platform/state/postgres.transaction.json" in set(s3.keys())
    assert s3.data_keys() == [
        f"{live}/",  # the zero-byte marker pyarrow's S3 delete leaves
        f"{live}/sync-b-3.parquet",
        *(f"{old}/{n}" for n in names),
    ]
    for i, name in enumerate(names):  # each history copy is the whole file
        body = s3.client.get_object(Bucket=s3.bucket, Key=f"{old}/{name}")["Body"]
        assert pq.read_table(pa.BufferReader(body.read())).column("id").to_pylist() == [i]


# File modes --------------------------------------------------------------------------------------


def modes_under(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The usual umask (022): without the writer's care, files come out 0644 and directories 0755."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_the_local_lake_is_readable_by_its_owner_only(tmp_path: Path, open_umask: None, today: str):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    lake = LakeWriter(home / "lake")
    raw = LakeRaw(lake, "postgres")
    raw.write(TRANSACTION, versions([1], 100), sync_id="sync-a", generation_id=G1, state={"lsn": 1})
    raw.write(TRANSACTION, versions([2], 200), sync_id="sync-b", generation_id=G2, state=None)
    raw.finish_overwrite(TRANSACTION, G2, {"generation": G2})
    modes = modes_under(home / "lake")
    directories = {name for name in modes if (home / "lake" / name).is_dir()}
    files = {name: mode for name, mode in modes.items() if name not in directories}
    assert {name: modes[name] for name in directories} == dict.fromkeys(directories, 0o700)
    assert files == dict.fromkeys(files, 0o600)
    assert {
        ".",
        f"superseded/postgres/transaction/generation={G1}/{today}",
        "_stripe_platform/state",
    } <= directories
    assert {
        f"raw/postgres/transaction/{today}/sync-b-1.parquet",
        f"superseded/postgres/transaction/generation={G1}/{today}/sync-a-0.parquet",
        "_stripe_platform/state/postgres.transaction.json",
    } <= set(files)
    assert stat.S_IMODE(home.stat().st_mode) == 0o755  # above the lake: left as it was
    assert raw.state(TRANSACTION) == {"generation": G2}  # still usable by its owner
    assert live_rows(lake) == [(2, "1.000000000")]


def test_directories_of_an_older_lake_are_tightened_on_the_next_write(
    lake: LakeWriter, tmp_path: Path, open_umask: None
):
    stream_dir = tmp_path / "lake" / "raw" / "postgres" / "transaction"
    stream_dir.mkdir(parents=True, mode=0o755)  # as the writer used to leave them
    for directory in (tmp_path / "lake", tmp_path / "lake" / "raw", stream_dir.parent, stream_dir):
        directory.chmod(0o755)
    written = write(lake, 1)
    assert stat.S_IMODE(os.stat(written.path).st_mode) == 0o600
    assert {
        str(d.relative_to(tmp_path / "lake")): stat.S_IMODE(d.stat().st_mode)
        for d in [tmp_path / "lake", *(tmp_path / "lake").rglob("*")]
        if d.is_dir()
    } == {
        ".": 0o755,  # an existing root keeps its mode: it may be shared on purpose
        "raw": 0o700,
        "raw/postgres": 0o700,
        "raw/postgres/transaction": 0o700,
        f"raw/postgres/transaction/{PARTITION}": 0o700,
    }
