"""The log collector (issue 22 "Collect", "Secrets in logs", "Bad input"): the session cluster's
real jsonlog and API access log shipped into the Log collection, the trail and the lake with the
brief's secrets redacted; collected twice without duplicates; rotation and truncation; each kind of
bad input quarantined as read; a `stripe-platform audit collect` killed with SIGKILL mid-run, then
resumed: every line exactly once."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from stripe_platform.audit import access_log, collector, trail
from stripe_platform.oltp import db

T0 = "2026-12-07 10:00:00.000 UTC"
SERVER = ("stripe_docstore", "ferretdb")  # the document server's own sessions


@pytest.fixture
def cs(settings, database, docdb, tmp_path):
    """The session's settings on this test's database, document database and lake."""
    return settings.model_copy(
        update={
            "pg_database": database,
            "mongodb_database": docdb.name,
            "lake_uri": str(tmp_path / "lake"),
        }
    )


def pg_line(second: float, session: str, message: str, severity: str = "LOG", **extra) -> str:
    """A jsonlog line as PostgreSQL 16 writes it (the fields the collector reads)."""
    minute, sec = divmod(second, 60)
    line = {
        "timestamp": f"2026-12-07 10:{int(minute):02d}:{sec:06.3f} UTC",
        "user": "alice",
        "dbname": "stripe",
        "pid": int(session.split(".")[1], 16),
        "remote_host": "10.0.0.7",
        "session_id": session,
        "session_start": T0,
        "application_name": "psql",
        "backend_type": "client backend",
        "error_severity": severity,
        "state_code": "00000",
        "message": message,
        **extra,
    }
    return json.dumps(line) + "\n"


def api_line(second: float, request_id: str | None, kind: str = "request", **extra) -> str:
    line = {
        "time": f"2026-12-07T10:{int(second // 60):02d}:{second % 60:09.6f}+00:00",
        "v": 1,
        "kind": kind,
        "user": "bob",
        "source": "10.0.0.9",
        "resource": "/customers/12",
        "action": "GET",
        "outcome": "allow",
        "request_id": request_id,
        "pid": 4242,
        "detail": {"status": 200},
        **extra,
    }
    return json.dumps(line) + "\n"


def trail_keys(s, stream: str) -> list[str]:
    with db.connect(s, with_key=False, autocommit=True) as conn:
        return [
            k
            for (k,) in conn.execute(
                "SELECT source_key FROM audit.trail_record WHERE stream = %s", (stream,)
            )
        ]


def log_line_keys(docdb, source: str) -> list[str]:
    return [
        line["source_key"] for doc in docdb["Log"].find({"source": source}) for line in doc["lines"]
    ]


def lake_rows(s, source: str) -> list[dict]:
    files = sorted(Path(s.lake_root, "audit/log").glob(f"source={source}/*/*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def offsets(path: Path) -> list[int]:
    found, at = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        if line.endswith(b"\n"):
            found.append(at)
        at += len(line)
    return found


# -- the real cluster: secrets redacted, collected twice without duplicates ------------------------
def _wait_in_log(s, needle: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = "".join(
            p.read_text(errors="replace")
            for p in access_log.postgres_log_dir(s).glob("postgresql-*.json")
        )
        if needle in raw:
            return
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} never reached the cluster's log")


def test_real_logs_collected_redacted_and_idempotent(cs, loaded, docdb, settings):
    # `loaded` ran the brief's sql/examples/customer_insert.sql with statement logging off (its
    # literals: crypt('password_john', ...), 'john.doe@stripe.com'); this test sends its own.
    tag = secrets.token_hex(4)
    password, email = f"password_john_{tag}", f"john.doe.{tag}@example.com"
    loaded.execute(
        f"UPDATE Customer SET Password = crypt('{password}', gen_salt('bf')) WHERE ID = 12"
    )
    with pytest.raises(psycopg.errors.DivisionByZero):
        loaded.execute(f"SELECT '{email}' AS email, 1 / 0")
    access_log.record(
        cs, kind="authn", user="john", source="10.1.2.3", resource="/token", action="login",
        outcome="deny", reason="bad password", detail={"password": password, "email": email},
    )  # fmt: skip
    loaded.execute(f"SELECT 'end-{tag}'")
    _wait_in_log(cs, f"end-{tag}")
    raw = "".join(
        p.read_text(errors="replace")
        for p in access_log.postgres_log_dir(cs).glob("postgresql-*.json")
    )
    for secret in (password, email):
        assert secret in raw  # PostgreSQL's own log holds this test's literals in clear...

    first = collector.collect(cs)
    assert first.lines_read > 0 and first.documents_written > 0
    assert first.trail_records == first.lines_read - sum(first.quarantined.values())
    docs = list(docdb["Log"].find())
    with db.connect(cs, with_key=False, autocommit=True) as conn:
        trail_text = "\n".join(p for (p,) in conn.execute("SELECT payload FROM audit.trail_record"))
    lake_text = json.dumps(lake_rows(cs, "postgres") + lake_rows(cs, "api"), default=str)
    shipped = {"Log": json.dumps(docs, default=str), "trail": trail_text, "lake": lake_text}
    for where, text in shipped.items():
        for secret in (password, email, "password_john", "john.doe@stripe.com"):
            assert secret not in text, f"{secret} reached the {where}"  # ...nothing shipped does

    # The brief's shape, grouped per session and query.
    # The collector ships the whole cluster's log: other tests' sessions are in it too.
    ours = [d for d in docs if d.get("dbname") == cs.pg_database]
    (updated,) = [
        d for d in ours if any("UPDATE Customer SET Password" in ln["message"] for ln in d["lines"])
    ]
    assert updated["source"] == "postgres" and updated["dbname"] == cs.pg_database
    assert updated["_id"] == f"pg:{updated['session_id']}:{updated['query_id']}"
    assert updated["lines"][0]["message"] == (
        "statement: UPDATE Customer SET Password = crypt('?', gen_salt('?')) WHERE ID = ?"
    )
    (failed,) = [d for d in ours if any(ln.get("state_code") == "22012" for ln in d["lines"])]
    assert [ln["error_severity"] for ln in failed["lines"]] == ["LOG", "ERROR"]
    assert failed["lines"][1]["statement"] == "SELECT '?' AS email, ? / ?"
    assert failed["session_id"] == updated["session_id"]
    assert failed["query_id"] > updated["query_id"]
    # The session's API log holds other tests' events too: this test's refused login is john's.
    (login,) = [
        d
        for d in docs
        if d["source"] == "api"
        and d["lines"][0]["message"].startswith("authn")
        and d["user"] == "john"
    ]
    assert login["lines"][0]["error_severity"] == "FATAL"
    assert login["lines"][0]["state_code"] == "28000"
    assert login["lines"][0]["message"] == "authn deny login /token: bad password"

    # Again: only what came since (the statements of the first pass, the document server's own),
    # and again: the document server's lines of the second pass are not Log documents, so the
    # collector's own traffic does not feed on itself.
    passes = [first] + [collector.collect(cs) for _ in range(3)]
    print("passes (lines read, documents written):",
          [(p.lines_read, p.documents_written) for p in passes])  # fmt: skip
    assert passes[3].lines_read < first.lines_read and passes[3].documents_written < 200
    for stream in ("postgres", "api"):
        keys = trail_keys(cs, stream)
        assert len(keys) == len(set(keys))  # never twice in the trail
        lines = log_line_keys(docdb, stream)
        assert len(lines) == len(set(lines))  # never twice in the Log collection
        rows = lake_rows(cs, stream)
        assert sorted(r["source_key"] for r in rows) == sorted(keys)  # the lake: the same lines
        server = {r["source_key"] for r in rows if (r["user"], r["dbname"]) == SERVER}
        assert set(lines) == set(keys) - server
    report = trail.verify(cs)  # what the collector appended is a sound chain
    assert report.ok and report.records >= len(trail_keys(cs, "postgres")), report.as_dict()


# -- synthetic logs: grouping, rotation, bad input -------------------------------------------------
def test_grouping_rotation_and_truncation(cs, docdb, tmp_path):
    logs = tmp_path / "pg"
    logs.mkdir()
    src = [collector.LogSource("postgres", logs, "postgresql-*.json")]
    first = logs / "postgresql-2026-12-07.json"
    s1 = "6754e0a0.1a2b"
    first.write_text(
        pg_line(1, s1, "connection received: host=10.0.0.7 port=5555")
        + pg_line(1.1, s1, "connection authorized: user=alice database=stripe")
        + pg_line(2, s1, "statement: SELECT * FROM customer WHERE email = 'a@b.c'")
        + pg_line(
            2.1, s1, "permission denied for table customer", "ERROR", state_code="42501",
            statement="SELECT * FROM customer WHERE email = 'a@b.c'",
        )
        + pg_line(3, s1, 'syntax error at or near "SELEC"', "ERROR", state_code="42601",
                  statement="SELEC 'x'")
        + pg_line(4, s1, "statement: SELECT 1")
    )  # fmt: skip
    r1 = collector.collect(cs, log_sources=src)
    assert (r1.lines_read, r1.trail_records, r1.quarantined) == (6, 6, {})
    docs = {d["_id"]: d for d in docdb["Log"].find()}
    assert sorted(docs) == [f"pg:{s1}:0", f"pg:{s1}:1", f"pg:{s1}:2", f"pg:{s1}:3"]
    assert len(docs[f"pg:{s1}:0"]["lines"]) == 2  # the session's own lines
    assert [ln["error_severity"] for ln in docs[f"pg:{s1}:1"]["lines"]] == ["LOG", "ERROR"]
    assert docs[f"pg:{s1}:1"]["lines"][1]["state_code"] == "42501"
    assert docs[f"pg:{s1}:2"]["lines"][0]["statement"] == "SELEC '?'"  # its own query
    assert docs[f"pg:{s1}:3"]["user"] == "alice" and docs[f"pg:{s1}:3"]["pid"] == 0x1A2B

    # Appended to, and a new day's file: only the new lines, the session's grouping continues.
    with first.open("a") as f:
        f.write(pg_line(5, s1, "duration: 0.5 ms"))
        f.write(pg_line(6, s1, "disconnection: session time: 0:00:05.000 user=alice"))
    second = logs / "postgresql-2026-12-08.json"
    second.write_text(pg_line(7, "6754e0a9.1a2c", "statement: SELECT 2"))
    r2 = collector.collect(cs, log_sources=src)
    assert (r2.lines_read, r2.trail_records) == (3, 3)
    docs = {d["_id"]: d for d in docdb["Log"].find()}
    assert [ln["message"] for ln in docs[f"pg:{s1}:3"]["lines"]] == [
        "statement: SELECT ?",
        "duration: 0.5 ms",
    ]
    assert docs[f"pg:{s1}:0"]["lines"][-1]["message"].startswith("disconnection")
    assert "pg:6754e0a9.1a2c:1" in docs

    # Replaced under the same name (another inode), and truncated then rewritten.
    replacement = logs / "new.tmp"
    replacement.write_text(pg_line(8, "6754e0b0.1a2d", "statement: SELECT 3"))
    replacement.rename(first)
    second.write_text(pg_line(9, "6754e0b1.1a2e", "statement: TABLE t"))  # O_TRUNC, shorter
    r3 = collector.collect(cs, log_sources=src)
    assert r3.lines_read == 2 and r3.trail_records == 2
    assert any("postgresql-2026-12-07.json replaced" in n for n in r3.notes), r3.notes
    assert any("postgresql-2026-12-08.json truncated" in n for n in r3.notes), r3.notes
    keys = trail_keys(cs, "postgres")
    assert "postgres:postgresql-2026-12-07.json~2:0" in keys
    assert "postgres:postgresql-2026-12-08.json~2:0" in keys
    assert len(keys) == len(set(keys)) == 11
    # Nothing new: nothing read.
    assert collector.collect(cs, log_sources=src).lines_read == 0


def test_bad_input_quarantined_as_read(cs, docdb, tmp_path, monkeypatch):
    api_dir, pg_dir = tmp_path / "api", tmp_path / "pg"
    api_dir.mkdir()
    pg_dir.mkdir()
    src = [
        collector.LogSource("postgres", pg_dir, "postgresql-*.json"),
        collector.LogSource("api", api_dir, "api-*.jsonl"),
    ]
    s1 = "6754e0a0.1a2b"
    good = pg_line(10, s1, "statement: SELECT 1")
    cut = pg_line(11, s1, "statement: SELECT 2")[:70] + "\n"  # a writer died mid-line
    corrupt = '{"timestamp": 2026-12-07 oops}\n'
    binary = b"\xff\xfe\x00garbage\n"
    unknown = json.dumps({"hello": "world"}) + "\n"
    array = "[1, 2, 3]\n"
    backwards = pg_line(1, s1, "statement: SELECT 3").replace("10:00:01", "08:00:01")
    later = pg_line(12, s1, "statement: SELECT 4")
    half = pg_line(13, s1, "statement: SELECT 5")
    path = pg_dir / "postgresql-2026-12-07.json"
    path.write_bytes(
        (good + cut + corrupt).encode() + binary
        + (unknown + array + backwards + later).encode() + half.encode()[:40]
    )  # fmt: skip
    (api_dir / "api-2026-12-07.jsonl").write_text(
        api_line(30, "r1") + json.dumps({"time": "yesterday", "kind": "x"}) + "\n"
    )
    # An older file, rotated away, whose last line was never finished (the writer died): once it
    # is older than ORPHAN_TAIL_AGE (here at once) it is quarantined, not waited for forever.
    orphan = api_line(21, "r0")[:50]
    (api_dir / "api-2026-12-06.jsonl").write_text(api_line(20, "r0") + orphan)
    monkeypatch.setattr(collector, "ORPHAN_TAIL_AGE", -1)
    result = collector.collect(cs, log_sources=src)
    assert result.quarantined == {
        "truncated": 2,
        "corrupt": 2,
        "unknown_format": 3,
        "clock_backwards": 1,
    }
    assert result.lines_read == 12 and result.trail_records == 4  # the last half line waits
    with db.connect(cs, with_key=False, autocommit=True) as conn:
        kept = {
            bytes(line): reason
            for reason, line in conn.execute("SELECT reason, line FROM audit.collector_quarantine")
        }
    assert kept == {
        cut.encode(): "truncated",
        corrupt.encode(): "corrupt",
        binary: "corrupt",
        unknown.encode(): "unknown_format",
        array.encode(): "unknown_format",
        backwards.encode(): "clock_backwards",
        (json.dumps({"time": "yesterday", "kind": "x"}) + "\n").encode(): "unknown_format",
        orphan.encode(): "truncated",
    }
    statements = sorted(
        ln["message"] for d in docdb["Log"].find({"source": "postgres"}) for ln in d["lines"]
    )
    assert statements == ["statement: SELECT ?", "statement: SELECT ?"]  # good and later
    # The half-written line, once finished, is collected whole.
    with path.open("ab") as f:
        f.write(half.encode()[40:])
    again = collector.collect(cs, log_sources=src)
    assert (again.lines_read, again.trail_records, again.quarantined) == (1, 1, {})
    assert collector.quarantine(cs)[0]["reason"] in {"truncated", "corrupt", "unknown_format",
                                                     "clock_backwards"}  # fmt: skip


def test_follow_collects_as_lines_come_until_stopped(cs, tmp_path):
    api_dir = tmp_path / "api"
    api_dir.mkdir()
    path = api_dir / "api-2026-12-07.jsonl"
    path.write_text(api_line(1, "a"))
    src = [collector.LogSource("api", api_dir, "api-*.jsonl")]
    stop, passes, failed = threading.Event(), [], []

    def follow() -> None:
        try:
            collector.collect(
                cs, until_idle=False, interval=0.1, log_sources=src, stop=stop,
                on_pass=passes.append,
            )  # fmt: skip
        except Exception as exc:  # reported below, in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=follow)
    thread.start()
    try:
        _wait(lambda: len(trail_keys(cs, "api")) == 1)
        with path.open("a") as f:
            f.write(api_line(2, "b"))
        _wait(lambda: len(trail_keys(cs, "api")) == 2)
        with pytest.raises(collector.CollectorBusy, match="another collector is running"):
            collector.collect(cs, log_sources=src)  # one collector a database at a time
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive() and not failed
    assert sum(p.lines_read for p in passes) == 2 and len(passes) >= 2


def test_cli_prints_counts_and_refuses_a_bad_log_dir(cs, tmp_path, monkeypatch, request):
    from stripe_platform.cli import app
    from stripe_platform.config import get_settings

    api_dir = tmp_path / "api"
    api_dir.mkdir()
    (api_dir / "api-2026-12-07.jsonl").write_text(api_line(1, "a") + "not json\n")
    for name, value in {
        "PROFILE": cs.profile, "HOME": str(cs.home_dir), "PG_DATABASE": cs.pg_database,
        "MONGODB_DATABASE": cs.mongodb_database, "LAKE_URI": cs.lake_root,
    }.items():  # fmt: skip
        monkeypatch.setenv(f"STRIPE_PLATFORM_{name}", value)
    get_settings.cache_clear()
    request.addfinalizer(get_settings.cache_clear)
    runner = CliRunner()
    done = runner.invoke(app, ["audit", "collect", "--log-dir", f"api={api_dir}"])
    assert done.exit_code == 0, done.output
    assert "2 lines read" in done.output and "1 Log documents written" in done.output
    assert "1 quarantined (1 corrupt)" in done.output
    refused = runner.invoke(app, ["audit", "collect", "--log-dir", f"mysql={api_dir}"])
    assert refused.exit_code == 1 and "expected SOURCE=DIRECTORY" in refused.output


def _wait(condition, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- kill -9 mid-run, then resume ------------------------------------------------------------------
LINES = 3000


def test_kill_9_mid_collection_then_resume(cs, docdb, tmp_path):
    api_dir = tmp_path / "api"
    api_dir.mkdir()
    path = api_dir / "api-2026-12-07.jsonl"
    # Three events a request: a request's document is built across batch boundaries.
    path.write_text(
        "".join(
            api_line(i * 0.01, f"req{i // 3:05d}", kind="request" if i % 3 == 2 else "authz")
            for i in range(LINES)
        )
    )
    env = {
        **os.environ,
        "STRIPE_PLATFORM_HOME": str(cs.home_dir),
        "STRIPE_PLATFORM_PROFILE": cs.profile,
        "STRIPE_PLATFORM_PG_DATABASE": cs.pg_database,
        "STRIPE_PLATFORM_MONGODB_DATABASE": cs.mongodb_database,
        "STRIPE_PLATFORM_LAKE_URI": cs.lake_root,
        collector.PAUSE_ENV: "0.05",
    }
    argv = [sys.executable, "-m", "stripe_platform.cli", "audit", "collect"]
    argv += ["--log-dir", f"api={api_dir}", "--batch-lines", "97", "--json"]
    for _ in range(2):  # killed twice, at different points
        child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            before = _committed(cs)
            deadline = time.monotonic() + 60
            while _committed(cs) < before + 5 * 97 and time.monotonic() < deadline:
                assert child.poll() is None, child.stderr.read().decode()
                time.sleep(0.05)
            time.sleep(secrets.randbelow(50) / 1000)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
            child.stdout.close()
            child.stderr.close()
    resumed_at = _committed(cs)
    assert 0 < resumed_at < LINES  # it really was stopped mid-run

    done = subprocess.run(argv, env={**env, collector.PAUSE_ENV: "0"}, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["lines_read"] == LINES - resumed_at
    expected = [f"api:{path.name}:{o}" for o in offsets(path)]
    assert len(expected) == LINES
    keys = trail_keys(cs, "api")
    assert sorted(keys) == sorted(expected)  # every line exactly once in the trail
    lines = log_line_keys(docdb, "api")
    assert sorted(lines) == sorted(expected)  # ...and in the Log collection
    assert docdb["Log"].count_documents({}) == LINES // 3
    lake = [r["source_key"] for r in lake_rows(cs, "api")]
    assert sorted(lake) == sorted(expected)  # ...and in the lake
    source = collector.LogSource("api", api_dir, "api-*.jsonl")
    assert collector.collect(cs, log_sources=[source]).lines_read == 0


def _committed(s) -> int:
    with db.connect(s, with_key=False, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(lines), 0) FROM audit.collector_file WHERE source = 'api'"
        ).fetchone()
    return int(row[0])
