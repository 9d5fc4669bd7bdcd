"""The sealed audit trail (audit/trail.py, sql/oltp/0020): the hash chain recomputed here by hand,
append-only enforced by PostgreSQL, tampering done as an intruder with the database would (the
superuser, triggers bypassed with session_replication_role = replica) and caught by verify naming
the first bad record, retention that keeps verify passing, the lake copy, the CLI, and the audit
bucket's Object Lock configuration against moto's S3."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from stripe_platform.audit import trail
from stripe_platform.config import get_settings
from stripe_platform.oltp import db

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
EVERY = 5  # audit_checkpoint_records in these tests


@pytest.fixture
def s(settings, database, tmp_path):
    return settings.model_copy(
        update={
            "pg_database": database,
            "audit_checkpoint_records": EVERY,
            "lake_uri": str(tmp_path / "lake"),
        }
    )


@pytest.fixture
def sql(s):
    """The test's database as the superuser (what the tests connect as): an intruder's view."""
    with db.connect(s, with_key=False, autocommit=True) as conn:
        assert conn.execute("SELECT usesuper FROM pg_user WHERE usename = current_user").fetchone()[
            0
        ]
        yield conn


def records(n: int, *, start: int = 0, days_ago: float = 0.0) -> list[tuple]:
    return [
        (
            f"postgres:log-{i}",
            NOW - dt.timedelta(days=days_ago) + dt.timedelta(seconds=i),
            "statement",
            {"user": f"u{i % 3}", "message": f"SELECT {i}", "ü": "é"},
        )
        for i in range(start, start + n)
    ]


def by_hand(prev: bytes, stream, seq, at: dt.datetime, kind, source_key, payload: dict) -> bytes:
    """The documented hash, written out independently of trail.py."""
    fields = [
        stream,
        str(seq),
        at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        kind,
        source_key,
        json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
    ]
    data = prev
    for f in fields:
        b = f.encode("utf-8")
        data += struct.pack(">I", len(b)) + b
    return hashlib.sha256(data).digest()


def tamper(conn: psycopg.Connection, *statements: str) -> None:
    """As an intruder with superuser rights: triggers off for this session only."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        for statement in statements:
            conn.execute(statement)


def problem(s, stream="postgres"):
    report = trail.verify(s)
    assert not report.ok
    bad = report.first_bad
    assert bad.stream == stream
    return bad


def test_append_chains_records_idempotently_and_checkpoints(s, sql):
    assert trail.append(s, "postgres", records(12)) == 12
    # Re-collection: the same source keys are skipped, new ones appended (and a duplicate in the
    # same batch counted once).
    again = records(12) + records(2, start=12) + records(1, start=13)
    assert trail.append(s, "postgres", again) == 2
    rows = sql.execute(
        "SELECT seq, at, kind, source_key, payload, prev_hash, hash FROM audit.trail_record "
        "WHERE stream = 'postgres' ORDER BY seq"
    ).fetchall()
    assert [r[0] for r in rows] == list(range(1, 15))
    prev = bytes(32)
    for (seq, at, kind, key, payload, prev_hash, digest), (k, _, _, p) in zip(
        rows, records(14), strict=True
    ):
        assert key == k and json.loads(payload) == p
        assert bytes(prev_hash) == prev
        assert bytes(digest) == by_hand(prev, "postgres", seq, at, kind, key, p)
        prev = bytes(digest)
    # A checkpoint once EVERY records accumulated (at the end of each such batch).
    cps = sql.execute("SELECT seq, kind FROM audit.trail_checkpoint ORDER BY seq").fetchall()
    assert cps == [(12, "periodic")]
    assert [c.seq for c in trail.checkpoint(s)] == [14]
    assert trail.checkpoint(s) == []  # nothing moved since
    report = trail.verify(s)
    assert report.ok and report.records == 14 and report.checkpoints == 2


def test_append_in_the_callers_transaction_commits_or_rolls_back_with_it(s, sql):
    # The collector appends and saves its position in one transaction of its own.
    with db.connect(s, with_key=False) as conn:
        assert trail.append(s, "postgres", records(3), conn=conn) == 3
        conn.rollback()
        assert trail.append(s, "postgres", records(2, start=3), conn=conn) == 2
        conn.commit()
    keys = sql.execute("SELECT seq, source_key FROM audit.trail_record ORDER BY seq").fetchall()
    assert keys == [(1, "postgres:log-3"), (2, "postgres:log-4")]
    assert trail.verify(s).ok


def test_concurrent_appends_to_a_stream_make_one_chain(s, sql):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        counts = list(
            pool.map(
                lambda w: sum(
                    trail.append(s, "api", records(5, start=w * 100 + b * 5)) for b in range(6)
                ),
                range(4),
            )
        )
    assert counts == [30, 30, 30, 30]
    assert sql.execute(
        "SELECT min(seq), max(seq), count(*) FROM audit.trail_record"
    ).fetchone() == (1, 120, 120)
    assert trail.verify(s).ok


def test_bad_input_is_refused(s):
    with pytest.raises(trail.TrailError, match="time zone"):
        trail.append(s, "postgres", [("k", dt.datetime(2026, 1, 1), "x", {})])
    with pytest.raises(trail.TrailError, match="stream"):
        trail.append(s, "Bad Stream", records(1))
    with pytest.raises(trail.TrailError, match="JSON"):
        trail.append(s, "postgres", [("k", NOW, "x", {"v": float("nan")})])


def test_postgres_refuses_update_delete_truncate_even_to_the_superuser(s, sql):
    trail.append(s, "postgres", records(6))
    for statement in (
        "UPDATE audit.trail_record SET payload = '{}' WHERE seq = 2",
        "DELETE FROM audit.trail_record WHERE seq = 6",
        "TRUNCATE audit.trail_record",
        "DELETE FROM audit.trail_checkpoint",
        "UPDATE audit.signing_key SET public_key = public_key",
        "TRUNCATE audit.trail_checkpoint",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            sql.execute(statement)
    # The retention function refuses a cut that is not expired or not anchored.
    with pytest.raises(psycopg.errors.RaiseException, match="not older"):
        sql.execute("SELECT audit.remove_expired('postgres', 3, now() - interval '1 day')")
    with pytest.raises(psycopg.errors.RaiseException, match="no signed retention checkpoint"):
        sql.execute("SELECT audit.remove_expired('postgres', 3, now())")
    # Data roles have no access at all (like the keys and access schemas).
    with sql.transaction():
        sql.execute("SET LOCAL ROLE developer")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            sql.execute("SELECT count(*) FROM audit.trail_record")
    assert trail.verify(s).ok
    assert sql.execute("SELECT count(*) FROM audit.trail_record").fetchone()[0] == 6


@pytest.fixture
def sealed(s, sql):
    """12 records (checkpoint at 12 signed), then 3 more with a checkpoint at 15, in 'postgres';
    2 in 'api'."""
    trail.append(s, "postgres", records(12))
    trail.append(s, "postgres", records(3, start=12))
    trail.checkpoint(s, stream="postgres")
    trail.append(s, "api", [("api:1", NOW, "request", {"path": "/x"}), ("api:2", NOW, "r", {})])
    assert trail.verify(s).ok
    return s


def test_an_edited_record_is_named(sealed, sql):
    tamper(
        sql,
        'UPDATE audit.trail_record SET payload = \'{"user":"nobody"}\' WHERE stream = '
        "'postgres' AND seq = 7",
    )
    bad = problem(sealed)
    assert (bad.seq, bad.why) == (7, "altered")


def test_an_edit_with_the_whole_chain_rehashed_is_caught_by_the_signed_checkpoint(sealed, sql):
    # The intruder rewrites record 14 and recomputes every hash after it: the chain is consistent
    # again, but the checkpoint at 15 was signed over the old hash.
    rows = sql.execute(
        "SELECT seq, at, kind, source_key, payload, prev_hash FROM audit.trail_record "
        "WHERE stream = 'postgres' AND seq >= 14 ORDER BY seq"
    ).fetchall()
    prev = bytes(rows[0][5])
    statements = []
    for seq, at, kind, key, payload, _ in rows:
        p = json.loads(payload)
        if seq == 14:
            p["message"] = "nothing to see"
        text = json.dumps(p, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = by_hand(prev, "postgres", seq, at, kind, key, p)
        statements.append(
            f"UPDATE audit.trail_record SET payload = '{text}', prev_hash = '\\x{prev.hex()}', "
            f"hash = '\\x{digest.hex()}' WHERE stream = 'postgres' AND seq = {seq}"
        )
        prev = digest
    tamper(sql, *statements)
    bad = problem(sealed)
    assert (bad.seq, bad.why) == (13, "altered")  # between the checkpoints at 12 and 15
    assert "15" in bad.detail


def test_a_deleted_record_is_named(sealed, sql):
    tamper(sql, "DELETE FROM audit.trail_record WHERE stream = 'postgres' AND seq = 4")
    bad = problem(sealed)
    assert (bad.seq, bad.why) == (4, "deleted")


def test_a_deleted_start_is_named(sealed, sql):
    tamper(sql, "DELETE FROM audit.trail_record WHERE stream = 'postgres' AND seq <= 2")
    bad = problem(sealed)
    assert (bad.seq, bad.why) == (1, "deleted")


def test_reordered_records_are_named(sealed, sql):
    # Swap the contents of records 5 and 6 (seq stays: the table's order is by seq).
    cols = "at, kind, source_key, payload, prev_hash, hash"
    tamper(
        sql,
        "UPDATE audit.trail_record SET source_key = source_key || '#' WHERE stream = 'postgres' "
        "AND seq IN (5, 6)",
        f"UPDATE audit.trail_record t SET ({cols}) = (SELECT at, kind, rtrim(source_key, '#'), "
        "payload, prev_hash, hash FROM audit.trail_record o WHERE o.stream = t.stream AND o.seq = "
        "11 - t.seq) WHERE stream = 'postgres' AND seq IN (5, 6)",
    )
    bad = problem(sealed)
    assert (bad.seq, bad.why) == (5, "reordered")
    assert "written as seq 6" in bad.detail


def test_a_truncated_tail_is_caught_by_the_last_signed_checkpoint(sealed, sql):
    # Cut the tail and put the head back where the records now end: only the checkpoint knows.
    last = sql.execute(
        "SELECT hash FROM audit.trail_record WHERE stream = 'postgres' AND seq = 13"
    ).fetchone()[0]
    tamper(
        sql,
        "DELETE FROM audit.trail_record WHERE stream = 'postgres' AND seq > 13",
        f"UPDATE audit.trail_head SET seq = 13, hash = '\\x{bytes(last).hex()}' "
        "WHERE stream = 'postgres'",
    )
    bad = problem(sealed)
    assert (bad.seq, bad.why) == (14, "truncated")


def test_a_tail_cut_with_its_checkpoints_is_caught_by_the_lake_copy(sealed, sql):
    trail.export_lake(sealed)
    # The intruder removes the tail, the checkpoints that pin it, and moves the head back.
    last = sql.execute(
        "SELECT hash FROM audit.trail_record WHERE stream = 'postgres' AND seq = 10"
    ).fetchone()[0]
    tamper(
        sql,
        "DELETE FROM audit.trail_record WHERE stream = 'postgres' AND seq > 10",
        "DELETE FROM audit.trail_checkpoint WHERE stream = 'postgres'",
        f"UPDATE audit.trail_head SET seq = 10, hash = '\\x{bytes(last).hex()}' "
        "WHERE stream = 'postgres'",
    )
    assert trail.verify(sealed).ok  # the database alone can no longer tell
    report = trail.verify(sealed, lake=True)
    assert not report.ok
    assert (report.first_bad.stream, report.first_bad.seq, report.first_bad.why) == (
        "postgres",
        11,
        "truncated",
    )


def test_a_forged_checkpoint_signature_is_caught(sealed, sql):
    tamper(
        sql,
        "UPDATE audit.trail_checkpoint SET signature = set_byte(signature, 0, "
        "(get_byte(signature, 0) + 1) % 256) WHERE stream = 'postgres' AND seq = 15",
    )
    bad = problem(sealed)
    assert (bad.seq, bad.why) == (15, "bad signature")


def _raw(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def test_checkpoints_re_signed_with_an_intruders_key_are_caught(sealed, sql):
    # The intruder edits record 14, rehashes the tail, and re-signs the checkpoint at 15 with a key
    # of their own, added to audit.signing_key beside a copy of the platform's wrapped key.
    intruder = Ed25519PrivateKey.generate()
    public = _raw(intruder)
    key_id = "ed25519:" + hashlib.sha256(public).hexdigest()[:16]
    wrapped = sql.execute("SELECT wrapped_private FROM audit.signing_key").fetchone()[0]
    tamper(
        sql,
        "UPDATE audit.trail_record SET payload = '{}' WHERE stream = 'postgres' AND seq = 15",
    )
    row = sql.execute(
        "SELECT at, kind, source_key, prev_hash FROM audit.trail_record WHERE stream = 'postgres' "
        "AND seq = 15"
    ).fetchone()
    digest = by_hand(bytes(row[3]), "postgres", 15, row[0], row[1], row[2], {})
    signed_at = sql.execute(
        "SELECT signed_at FROM audit.trail_checkpoint WHERE seq = 15"
    ).fetchone()
    message = trail._checkpoint_message("postgres", 15, digest, "periodic", signed_at[0])
    tamper(
        sql,
        f"UPDATE audit.trail_record SET hash = '\\x{digest.hex()}' WHERE stream = 'postgres' "
        "AND seq = 15",
        f"UPDATE audit.trail_head SET hash = '\\x{digest.hex()}' WHERE stream = 'postgres'",
    )
    with sql.transaction():
        sql.execute("SET LOCAL session_replication_role = replica")
        sql.execute(
            "INSERT INTO audit.signing_key (key_id, public_key, wrapped_private) VALUES (%s, %s, %s)",
            (key_id, public, wrapped),
        )
        sql.execute(
            "UPDATE audit.trail_checkpoint SET hash = %s, key_id = %s, signature = %s "
            "WHERE stream = 'postgres' AND seq = 15",
            (digest, key_id, intruder.sign(message)),
        )
    # Without the key store, the signature checks out: the stored public key is the intruder's.
    assert trail.verify(sealed, check_keys=False).ok
    bad = problem(sealed)
    assert (bad.seq, bad.why) == (15, "wrong key")
    assert key_id in bad.detail


def test_a_swapped_public_key_is_caught(sealed, sql):
    tamper(
        sql,
        f"UPDATE audit.signing_key SET public_key = '\\x{_raw(Ed25519PrivateKey.generate()).hex()}'",
    )
    bad = problem(sealed)
    assert bad.why == "wrong key" and bad.seq == 12


def test_retention_removes_only_expired_exported_records_and_verify_still_passes(s, sql):
    trail.append(s, "postgres", records(8, days_ago=120))  # past the 90 hot days
    trail.append(s, "postgres", records(4, start=8, days_ago=10))
    trail.append(s, "api", [("api:old", NOW - dt.timedelta(days=400), "request", {})])
    result = trail.apply_retention(s, NOW)
    assert {(c.stream, c.through_seq, c.removed) for c in result.cuts} == {
        ("postgres", 8, 8),
        ("api", 1, 1),
    }
    left = sql.execute(
        "SELECT stream, min(seq), count(*) FROM audit.trail_record GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert left == [("audit", 1, 3), ("postgres", 9, 4)]
    # The cut is on the trail itself, and in audit.trail_cut.
    kinds = sql.execute(
        "SELECT kind, payload FROM audit.trail_record WHERE stream = 'audit' ORDER BY seq"
    ).fetchall()
    assert [k for k, _ in kinds] == ["retention", "retention", "retention_run"]
    assert {json.loads(p)["stream"] for k, p in kinds if k == "retention"} == {"postgres", "api"}
    assert sql.execute("SELECT count(*) FROM audit.trail_cut").fetchone()[0] == 2
    report = trail.verify(s)
    assert report.ok, report.as_dict()
    assert {r.stream: r.anchored_at for r in report.streams}["postgres"] == 8
    # The lake has every record, hashes as in the database, partitioned by stream and day.
    files = sorted(Path(trail.audit_lake_root(s)).rglob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    pg_rows = {(r["stream"], r["seq"]): r for r in rows}
    # ... but the api record, 400 days old, is past the lake's 365 too: gone from both.
    assert len(pg_rows) == 12 and ("api", 1) not in pg_rows
    assert [p.split("/audit/trail/")[1] for p in result.lake_removed] == [
        f"stream=api/date={(NOW - dt.timedelta(days=400)).date()}"
    ]
    assert all("stream=" in str(f) and "date=" in str(f) for f in files)
    first = pg_rows[("postgres", 1)]
    assert first["hash"] == by_hand(
        bytes(32),
        "postgres",
        1,
        first["at"],
        "statement",
        first["source_key"],
        json.loads(first["payload"]),
    )
    # An intruder deleting the next records as if they had expired: no anchor, caught.
    tamper(sql, "DELETE FROM audit.trail_record WHERE stream = 'postgres' AND seq = 9")
    bad = problem(s)
    assert (bad.seq, bad.why) == (9, "deleted")


def test_the_lake_keeps_what_left_postgres_until_the_retention_ends(s, sql):
    trail.append(s, "postgres", records(2, days_ago=500))  # past the 365 days of retention
    trail.append(s, "postgres", records(2, start=2, days_ago=200))  # past hot, within retention
    result = trail.apply_retention(s, NOW)
    assert [(c.stream, c.through_seq) for c in result.cuts] == [("postgres", 4)]
    assert sql.execute(
        "SELECT count(*) FROM audit.trail_record WHERE stream = 'postgres'"
    ).fetchone() == (0,)
    lake = Path(trail.audit_lake_root(s))
    kept = {r["seq"] for f in lake.rglob("*.parquet") for r in pq.read_table(f).to_pylist()}
    assert kept == {3, 4}
    assert len(result.lake_removed) == 1 and "stream=postgres/date=" in result.lake_removed[0]
    run = sql.execute(
        "SELECT payload FROM audit.trail_record WHERE kind = 'retention_run'"
    ).fetchone()[0]
    assert json.loads(run)["lake_removed"] == result.lake_removed
    # An emptied stream is anchored at its head; running again removes nothing more.
    assert trail.verify(s).ok
    assert trail.apply_retention(s, NOW).cuts == []
    assert trail.verify(s).ok


def test_cli_verify_fails_with_exit_1_naming_the_record(sealed, sql, monkeypatch, request):
    from stripe_platform.cli import app

    monkeypatch.setenv("STRIPE_PLATFORM_PROFILE", "embedded")
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(sealed.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", sealed.pg_database)
    monkeypatch.setenv("STRIPE_PLATFORM_LAKE_URI", sealed.lake_root)
    get_settings.cache_clear()
    request.addfinalizer(get_settings.cache_clear)
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "verify", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["ok"] is True
    trail.append(sealed, "api", [("api:3", NOW, "request", {})])
    signed = runner.invoke(app, ["audit", "checkpoint", "--json"])
    assert signed.exit_code == 0, signed.output
    assert [(c["stream"], c["seq"]) for c in json.loads(signed.stdout)] == [("api", 3)]
    kept = runner.invoke(app, ["audit", "retention", "--json"])
    assert kept.exit_code == 0, kept.output
    assert json.loads(kept.stdout)["cuts"] == []  # nothing is 90 days old
    tamper(sql, "DELETE FROM audit.trail_record WHERE stream = 'api' AND seq = 1")
    failed = runner.invoke(app, ["audit", "verify", "--json"])
    assert failed.exit_code == 1
    data = json.loads(failed.stdout)
    assert data["first_bad"] == {
        "stream": "api",
        "seq": 1,
        "why": "deleted",
        "detail": data["first_bad"]["detail"],
    }
    text = runner.invoke(app, ["audit", "verify", "--stream", "api"])
    assert text.exit_code == 1
    assert "NOT intact: stream api, seq 1: deleted" in text.output
    assert runner.invoke(app, ["audit", "verify", "--stream", "postgres"]).exit_code == 0
    exported = runner.invoke(app, ["audit", "export-lake", "--json"])
    assert exported.exit_code == 0 and json.loads(exported.stdout)["records"] == 1  # the run's


# -- the prod audit bucket: Object Lock in COMPLIANCE mode, against moto's S3 ---------------------
# What moto does not prove (docs/audit.md): that AWS itself refuses every delete and shortening of
# a locked version for every principal, the root account included (moto checks the retention on
# the calls it implements, with no IAM); the lifecycle rule's actual expiry (moto stores it, never
# runs it); that Object Lock cannot be turned off or the bucket deleted while locked versions
# remain; S3's replication, legal holds and the retention clock itself. moto 5.2's
# GetObjectRetention fails (500) on a default-retained object, so HeadObject is read instead.
@pytest.fixture
def s3(monkeypatch, settings):
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield boto3.client("s3", region_name="us-east-1")


def test_the_prod_audit_bucket_is_object_locked_in_compliance_mode(settings, s3):
    from stripe_platform.lake import object_lock

    prod = settings.model_copy(
        update={"lake_uri": "s3://pay-lake/prod", "audit_lake_object_lock_days": 400}
    )
    assert object_lock.audit_bucket_root(prod) == "s3://pay-lake-audit/prod"
    config = object_lock.bucket_configuration(prod)
    assert config["put_object_lock_configuration"]["ObjectLockConfiguration"] == {
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 400}},
    }
    object_lock.apply(prod, s3)
    object_lock.apply(prod, s3)  # idempotent
    assert object_lock.check(prod, s3) == []
    # What S3 (moto) gives an object written with no lock of its own: the bucket's default.
    key = "prod/audit/trail/stream=postgres/date=2026-12-07/000000000001-000000000001.parquet"
    version = s3.put_object(Bucket="pay-lake-audit", Key=key, Body=b"x")["VersionId"]
    # (HeadObject: moto 5.2's GetObjectRetention answers 500 for a default-retained object.)
    head = s3.head_object(Bucket="pay-lake-audit", Key=key, VersionId=version)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    until = head["ObjectLockRetainUntilDate"]
    assert dt.timedelta(days=399) < until - dt.datetime.now(dt.UTC) <= dt.timedelta(days=400)
    # The locked version cannot be deleted, even claiming a governance bypass.
    for extra in ({}, {"BypassGovernanceRetention": True}):
        with pytest.raises(s3.exceptions.ClientError, match="AccessDenied"):
            s3.delete_object(Bucket="pay-lake-audit", Key=key, VersionId=version, **extra)
    # A plain delete only adds a delete marker: the version stays.
    s3.delete_object(Bucket="pay-lake-audit", Key=key)
    versions = s3.list_object_versions(Bucket="pay-lake-audit")["Versions"]
    assert [v["VersionId"] for v in versions] == [version]
    lifecycle = s3.get_bucket_lifecycle_configuration(Bucket="pay-lake-audit")["Rules"][0]
    assert lifecycle["Expiration"] == {"Days": prod.audit_retention_days}


def test_an_existing_bucket_without_object_lock_is_refused_and_a_drift_is_named(
    settings, s3, tmp_path
):
    from stripe_platform.lake import object_lock

    prod = settings.model_copy(update={"lake_uri": "s3://other-lake"})
    s3.create_bucket(Bucket="other-lake-audit")
    with pytest.raises(object_lock.ObjectLockError, match="without Object Lock"):
        object_lock.apply(prod, s3)
    local = settings.model_copy(update={"lake_uri": str(tmp_path)})
    with pytest.raises(object_lock.ObjectLockError, match="not on S3"):
        object_lock.bucket_configuration(local)
    s3.create_bucket(Bucket="third-audit", ObjectLockEnabledForBucket=True)
    third = settings.model_copy(update={"lake_uri": "s3://third"})
    s3.put_object_lock_configuration(
        Bucket="third-audit",
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}},
        },
    )
    s3.put_public_access_block(
        Bucket="third-audit",
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    problems = object_lock.check(third, s3)
    assert len(problems) == 1 and "GOVERNANCE" in problems[0]


def test_a_failed_verify_becomes_a_critical_finding_for_the_incidents(sealed, sql, monkeypatch):
    import sys
    import types

    raised = []
    fake = types.ModuleType("stripe_platform.audit.incidents")
    fake.raise_findings = lambda settings, findings: raised.extend(findings) or ["incident"]
    monkeypatch.setitem(sys.modules, "stripe_platform.audit.incidents", fake)
    assert trail.raise_incident(sealed, trail.verify(sealed)) is None  # intact: nothing raised
    tamper(sql, "DELETE FROM audit.trail_record WHERE stream = 'postgres' AND seq = 3")
    assert trail.raise_incident(sealed, trail.verify(sealed)) == ["incident"]
    (finding,) = raised
    assert (finding.rule, finding.severity) == ("audit:trail_verify", "critical")
    assert finding.evidence == ("trail:postgres:3",)
    assert finding.detail["why"] == "deleted"


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("DELETE FROM audit.trail_record WHERE stream = 'postgres' AND seq = 9", (9, "deleted")),
        ("DELETE FROM audit.trail_record WHERE stream = 'postgres' AND seq = 8", (8, "deleted")),
        (
            "UPDATE audit.trail_record SET kind = 'x' WHERE stream = 'postgres' AND seq IN (6, 13)",
            (6, "altered"),
        ),
    ],
)
def test_a_long_stream_checked_in_parallel_slices_misses_nothing_at_their_edges(
    sealed, sql, monkeypatch, statement, expected
):
    import os

    # 15 records in slices 1-4, 5-8, 9-12, 13-15 (a real trail slices from 400,000 records).
    monkeypatch.setattr(trail, "CHAIN_SLICE", 3)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert trail.verify(sealed).ok
    tamper(sql, statement)
    bad = problem(sealed)
    assert (bad.seq, bad.why) == expected


def test_the_service_role_appends_through_auditadmin_and_other_roles_see_nothing(s, sql):
    import secrets

    from psycopg import sql as q

    made = []

    def login(role: str) -> psycopg.Connection:
        user, password = f"w1_{role}_{secrets.token_hex(3)}", secrets.token_urlsafe(12)
        sql.execute(
            q.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                q.Identifier(user), q.Literal(password), q.Identifier(role)
            )
        )
        made.append(user)
        return psycopg.connect(
            db.conninfo(s, database=s.pg_database, user=user, password=password), autocommit=True
        )

    try:
        # A non-superuser member of AuditAdmin (what the platform's service role is on compose
        # and prod) appends, signs and verifies, but cannot change or remove anything.
        with login("auditadmin") as svc:
            assert trail.append(s, "api", records(EVERY), conn=svc) == EVERY
            assert svc.execute("SELECT count(*) FROM audit.trail_checkpoint").fetchone() == (1,)
            for statement, error in (
                ("UPDATE audit.trail_record SET kind = 'x'", psycopg.errors.InsufficientPrivilege),
                ("DELETE FROM audit.trail_record", psycopg.errors.InsufficientPrivilege),
                ("TRUNCATE audit.trail_record", psycopg.errors.InsufficientPrivilege),
                ("DELETE FROM audit.trail_checkpoint", psycopg.errors.InsufficientPrivilege),
                ("SET session_replication_role = replica", psycopg.errors.InsufficientPrivilege),
            ):
                with pytest.raises(error):
                    svc.execute(statement)
        with login("admin") as admin:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="schema audit"):
                admin.execute("SELECT count(*) FROM audit.trail_record")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                admin.execute("SELECT audit.remove_expired('api', 1, now())")
        assert trail.verify(s).ok
    finally:
        for user in made:
            sql.execute(q.SQL("DROP OWNED BY {}").format(q.Identifier(user)))
            sql.execute(q.SQL("DROP ROLE {}").format(q.Identifier(user)))
