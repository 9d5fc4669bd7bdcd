"""Encryption at rest of the raw layer (security/subjects_layer.py) end to end: a real PostgreSQL
and document store seeded, the real sync engine into a real lake directory and a real DuckDB
warehouse, the real envelope and subject keys (local keyring, keys in the test database).

What must hold: no catalog-PROTECTED value leaves the sources in a form the sources' own keys
undo (neither the plain text seeded nor the bytes the stores hold: pgcrypto's ciphertext, the
documents' field ciphertext), in the lake's bytes or the warehouse's raw rows; the subject's key
gives the source bytes back; shredding a customer's key makes their values unreadable in every
file and row (old generations included) while others still decrypt, and a later sync creates no
key for them again; with ``encrypt_at_rest`` off values land as before; a destination synced
before encryption is refused with the remedy, not silently mixed."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

import boto3
import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from stripe_platform.config import load_settings
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import Engine, SyncError
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.lake.encryption import LakeEncryptionError, apply_bucket_encryption
from stripe_platform.lake.target import LakeRaw
from stripe_platform.lake.writer import LakeWriter
from stripe_platform.oltp import db
from stripe_platform.rawlayer import Column, RawStream
from stripe_platform.security.envelope import Envelope, SubjectKeys
from stripe_platform.security.keys import KeyShredded, TamperedCiphertext
from stripe_platform.security.subjects_layer import decrypt_column
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec
from stripe_platform.warehouse.duckdb import DuckDBRaw

END = dt.date(2026, 11, 1)
LAKE = ("postgres-to-s3", "mongodb-to-s3")
WAREHOUSE = ("postgres-to-snowflake", "mongodb-to-snowflake")
# (source, lake/raw stream, column, subject column): what the catalog protects in the streams.
CUSTOMER_FIELDS = [
    ("postgres", "customer", "email", "id"),
    ("postgres", "customer", "fullname", "id"),
    ("postgres", "customer", "phone", "id"),
    ("postgres", "address", "line1", "customerid"),
    ("mongodb", "Customer", "email", "oltp_id"),
]


@pytest.fixture
def platform(settings, database, docdb, tmp_path, seed_templates):
    s = settings.model_copy(update={"pg_database": database, "mongodb_database": docdb.name})
    data = build(make_spec(scale=0.003, seed=4, end=END, max_documents=300))
    seed_templates.seed(s, data, docdb)
    catalog = load_catalog()
    yield s, data, docdb, catalog, tmp_path
    with db.connect(s, autocommit=True) as conn:
        for c in catalog.connections:
            connection = catalog.resolve(c.name)
            if connection.source.kind == "postgres":
                cdc.drop_slot(conn, connection.slot(conn.info.dbname))


def sync(s, catalog, lake_root: Path, warehouse: Path) -> None:
    """Every connection: the lake uncompressed (so its bytes can be searched), the warehouse."""
    for name in LAKE:
        c = catalog.resolve(name)
        lake = LakeWriter(lake_root, compression="none", fsync=False)
        Engine(s, c, LakeRaw(lake, c.connection.namespace)).sync()
    conn = duckdb.connect(str(warehouse))
    try:
        for name in WAREHOUSE:
            Engine(s, catalog.resolve(name), DuckDBRaw(conn)).sync()
    finally:
        conn.close()


def source_values(s, docdb) -> tuple[set[bytes], dict[tuple[str, str], dict[int, bytes]]]:
    """What the sources hold, read here: (every needle that must not reach the raw layer, and
    per (stream, column) the stored bytes by subject id)."""
    stored: dict[tuple[str, str], dict[int, bytes]] = {}
    needles: set[bytes] = set()
    with db.connect(s) as conn:
        for table, column, subject in [
            ("customer", "email", "id"),
            ("customer", "fullname", "id"),
            ("customer", "phone", "id"),
            ("address", "line1", "customerid"),
        ]:
            rows = conn.execute(f"SELECT {subject}, {column} FROM {table}").fetchall()
            stored[(table, column)] = {k: bytes(v) for k, v in rows if v is not None}
            needles |= set(stored[(table, column)].values())
    docs = {}
    for doc in docdb["Customer"].find({}, {"oltp_id": 1, "email": 1}):
        value = doc.get("email")
        docs[doc["oltp_id"]] = value if isinstance(value, bytes) else str(value).encode()
    stored[("Customer", "email")] = docs
    needles |= set(docs.values())
    return needles, stored


def plain_needles(data) -> set[bytes]:
    """The personal values seeded, in clear (the dataset the seed wrote, not the code under test)."""
    customers, addresses = data.entities.customers, data.entities.addresses
    values = set()
    for table, column in [
        (customers, "email"),
        (customers, "fullname"),
        (customers, "phone"),
        (addresses, "line1"),
    ]:
        values |= {v.encode() for v in table.column(column).to_pylist() if v}
    return values


def lake_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


def warehouse_cells(path: Path) -> list[bytes]:
    """Every value of every raw table, as bytes."""
    conn = duckdb.connect(str(path), read_only=True)
    try:
        cells = []
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema <> 'information_schema'"
        ).fetchall()
        for schema, table in tables:
            for row in conn.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall():
                for value in row:
                    if isinstance(value, bytes | bytearray):
                        cells.append(bytes(value))
                    elif value is not None:
                        cells.append(str(value).encode())
        return cells
    finally:
        conn.close()


def found_in(needles: set[bytes], haystacks: list[bytes]) -> set[bytes]:
    """The needles inside one of the haystacks. A needle in none of them is in none of their
    join either: one search of the join rules most needles out at once (thousands of needles
    times 100,000 cells, one by one, took half a minute); the few left are looked for one
    haystack at a time, so a match across two joined haystacks counts for nothing."""
    joined = b"\0".join(haystacks)
    return {n for n in needles if n in joined and any(n in h for h in haystacks)}


def found(needles: set[bytes], lake_root: Path, warehouse: Path) -> tuple[set, set]:
    """The needles found in the lake's file bytes, and in the warehouse's values."""
    in_lake = found_in(needles, [f.read_bytes() for f in lake_files(lake_root)])
    in_warehouse = found_in(needles, warehouse_cells(warehouse))
    return in_lake, in_warehouse


def lake_rows(root: Path, source: str, stream: str, history: bool = True) -> list[dict]:
    rows = []
    for path in lake_files(root):
        parts = path.relative_to(root).parts
        if parts[1:3] == (source, stream) and (history or parts[0] == "raw"):
            rows += pq.read_table(path).to_pylist()
    return rows


def test_no_protected_value_in_clear_and_keys_give_the_source_bytes_back(platform):
    s, data, docdb, catalog, tmp = platform
    sync(s, catalog, tmp / "lake", tmp / "warehouse.duckdb")
    needles, stored = source_values(s, docdb)
    plain = plain_needles(data)
    assert len(plain) > 100 and len(needles) > 100  # the search has something to find
    in_lake, in_warehouse = found(needles | plain, tmp / "lake", tmp / "warehouse.duckdb")
    assert in_lake == set() and in_warehouse == set()

    # The subject's key gives back exactly what the source holds, from the lake and the warehouse.
    envelope = Envelope(s)
    conn = duckdb.connect(str(tmp / "warehouse.duckdb"), read_only=True)
    checked = 0
    for source, stream, column, subject in CUSTOMER_FIELDS:
        expected = stored[(stream, column)]
        rows = lake_rows(tmp / "lake", source, stream.lower())
        for row in rows:
            if row[column] is None:
                continue
            [clear] = decrypt_column(envelope, source, stream, column, [row[column]])
            assert clear == expected[row[subject]]
            checked += 1
        table = f"{source}_{stream.lower()}"
        for key, value in conn.execute(
            f'SELECT "{subject}", "{column}" FROM raw."{table}"'
        ).fetchall():
            if value is not None:
                assert decrypt_column(envelope, source, stream, column, [value]) == [expected[key]]
                checked += 1
        # Bound to its field: another column's name does not decrypt it.
        value = next(r[column] for r in rows if r[column] is not None)
        with pytest.raises(TamperedCiphertext):
            decrypt_column(envelope, source, stream, "username", [value])
    conn.close()
    assert checked > 500


def test_shredding_a_customer_makes_their_values_unreadable_everywhere(platform):
    s, _, _, catalog, tmp = platform
    lake, warehouse = tmp / "lake", tmp / "warehouse.duckdb"
    sync(s, catalog, lake, warehouse)
    # A second generation of the reference tables and an update of X's rows: old generations and
    # history stay in the lake's superseded/ prefix.
    x, y = 3, 4
    with db.connect(s, autocommit=True) as conn:
        conn.execute("UPDATE Customer SET CountryCode = CountryCode WHERE ID IN (%s, %s)", (x, y))
    sync(s, catalog, lake, warehouse)

    assert SubjectKeys(Envelope(s)).shred(x, reason="test: erasure request") is True
    envelope = Envelope(s)  # a new process's view: nothing cached
    unreadable = readable = 0
    conn = duckdb.connect(str(warehouse), read_only=True)
    for source, stream, column, subject in CUSTOMER_FIELDS:
        values = [(r[subject], r[column]) for r in lake_rows(lake, source, stream.lower())]
        values += conn.execute(
            f'SELECT "{subject}", "{column}" FROM raw."{source}_{stream.lower()}"'
        ).fetchall()
        for subject_id, value in values:
            if value is None or subject_id not in (x, y):
                continue
            if subject_id == x:
                with pytest.raises(KeyShredded):
                    decrypt_column(envelope, source, stream, column, [value])
                unreadable += 1
            else:
                assert decrypt_column(envelope, source, stream, column, [value])[0]
                readable += 1
    conn.close()
    # X had rows in every customer stream, in both generations of the lake's customer files.
    assert unreadable >= 2 * len(CUSTOMER_FIELDS) and readable >= len(CUSTOMER_FIELDS)

    # A change of X's after the shredding: no key is created again, the values land as NULL,
    # and the row says why.
    with db.connect(s, autocommit=True) as conn:
        conn.execute("UPDATE Customer SET CountryCode = CountryCode WHERE ID = %s", (x,))
    sync(s, catalog, lake, warehouse)
    assert SubjectKeys(Envelope(s)).is_shredded(x)
    conn = duckdb.connect(str(warehouse), read_only=True)
    email, meta = conn.execute(
        "SELECT email, _airbyte_meta FROM raw.postgres_customer WHERE id = ?", [x]
    ).fetchone()
    conn.close()
    assert email is None
    changes = json.loads(meta)["changes"]
    assert {"field": "email", "change": "NULLED", "reason": "SUBJECT_KEY_SHREDDED"} in changes
    newest = max(
        (r for r in lake_rows(lake, "postgres", "customer", history=False) if r["id"] == x),
        key=lambda r: r["_ab_cdc_lsn"],
    )
    assert newest["email"] is None and newest["fullname"] is None


def test_encryption_off_lands_values_as_before(platform):
    s, _, docdb, catalog, tmp = platform
    off = s.model_copy(update={"encrypt_at_rest": False})
    sync(off, catalog, tmp / "lake", tmp / "warehouse.duckdb")
    needles, stored = source_values(off, docdb)
    in_lake, in_warehouse = found(needles, tmp / "lake", tmp / "warehouse.duckdb")
    # The stores' own bytes (pgcrypto's ciphertext) land unchanged: the search finds them.
    assert set(stored[("customer", "email")].values()) <= in_lake
    assert set(stored[("customer", "email")].values()) <= in_warehouse


def test_a_destination_synced_before_encryption_is_refused_with_the_remedy(platform):
    s, _, _, catalog, tmp = platform
    warehouse = tmp / "warehouse.duckdb"
    conn = duckdb.connect(str(warehouse))
    Engine(
        s.model_copy(update={"encrypt_at_rest": False}),
        catalog.resolve("postgres-to-snowflake"),
        DuckDBRaw(conn),
    ).sync()
    with pytest.raises(SyncError, match="encrypted at rest now.*customer: email, fullname, phone"):
        Engine(s, catalog.resolve("postgres-to-snowflake"), DuckDBRaw(conn)).sync()
    # Nothing was written by the refused sync: the rows are those of the first.
    assert (
        conn.execute(
            "SELECT count(*) FROM airbyte_internal.stripe_platform_sync_state WHERE stream LIKE 'encryption:%'"
        ).fetchone()[0]
        == 0
    )
    conn.close()


def test_the_prod_lake_bucket_defaults_to_sse_kms_under_the_lake_key(
    kms_endpoint, monkeypatch, tmp_path
):
    """The configuration and the labels S3 gives objects (moto encrypts nothing: see
    lake/encryption.py for what this does not prove)."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    region = "us-east-1"
    s3 = boto3.client("s3", endpoint_url=kms_endpoint, region_name=region)
    kms = boto3.client("kms", endpoint_url=kms_endpoint, region_name=region)
    bucket, prefix = f"lake-{uuid.uuid4().hex[:12]}", f"alias/h5-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    settings = load_settings(
        home=tmp_path, lake_uri=f"s3://{bucket}/exploration", kms_key_alias_prefix=prefix
    )
    with pytest.raises(LakeEncryptionError, match=f"{prefix}/lake does not exist"):
        apply_bucket_encryption(settings, s3, kms)
    with pytest.raises(LakeEncryptionError, match="not on S3"):
        apply_bucket_encryption(load_settings(home=tmp_path), s3, kms)

    key = kms.create_key(Description="lake KEK")["KeyMetadata"]
    kms.create_alias(AliasName=f"{prefix}/lake", TargetKeyId=key["KeyId"])
    apply_bucket_encryption(settings, s3, kms)
    apply_bucket_encryption(settings, s3, kms)  # idempotent
    [rule] = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms",
        "KMSMasterKeyID": key["Arn"],
    }
    assert rule["BucketKeyEnabled"] is True
    # A lake file written as the sync writes it is stored under the lake's key.
    filesystem = pafs.S3FileSystem(
        endpoint_override=kms_endpoint.removeprefix("http://"), scheme="http", region=region
    )
    lake = LakeWriter(f"s3://{bucket}/exploration", filesystem)
    stream = RawStream("postgres", "merchant", (Column("id", "integer"),))
    written = lake.write(
        "postgres", stream, pa.table({"id": [1, 2]}), sync_id="s", generation_id=1, part=0
    )
    head = s3.head_object(Bucket=bucket, Key=written.path.removeprefix(f"s3://{bucket}/"))
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == key["Arn"]
