"""The centralised access log (issue 21 §5): the API's events written whole by concurrent processes,
secrets kept out, the request middleware through a real app, and PostgreSQL's jsonlog of the
session cluster (a refused login, statements with secret literals) read back redacted, by
``events()`` and by ``stripe-platform access log``."""

from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing
import os
import secrets
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from psycopg import sql
from typer.testing import CliRunner

from stripe_platform.audit import access_log
from stripe_platform.audit.access_log import events, record, redact_sql, summarise_sql
from stripe_platform.config import get_settings, load_settings
from stripe_platform.oltp import db

WRITERS, THREADS, PER_THREAD = 2, 4, 300
BIG = 6  # detail values of 1000 characters each: a line of ~6.5 KB, beyond a pipe's atomic size


def _write_events(home: str, writer: int) -> None:
    """One process: THREADS threads appending PER_THREAD events each."""
    import threading

    s = load_settings(home=Path(home))

    def run(thread: int) -> None:
        for n in range(PER_THREAD):
            mark = f"{writer}-{thread}-{n}"
            record(
                s,
                kind="read",
                user=f"user-{writer}",
                source="127.0.0.1",
                resource=f"/v1/probe/{mark}",
                action="GET",
                outcome="allow",
                detail={f"f{i}": mark * (1000 // len(mark) + 1) for i in range(BIG)},
            )

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_processes_write_whole_lines(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=_write_events, args=(str(tmp_path), w)) for w in range(WRITERS)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    directory = tmp_path / "logs" / "access"
    paths = sorted(directory.glob("api-*.jsonl"))  # one per UTC day: two across midnight
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert paths and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in paths)
    lines = []
    for path in paths:
        raw = path.read_bytes()
        assert raw.endswith(b"\n")
        lines += raw.split(b"\n")[:-1]
    assert len(lines) == WRITERS * THREADS * PER_THREAD
    seen = set()
    for line in lines:
        event = json.loads(line)  # every line whole
        mark = event["resource"].rsplit("/", 1)[1]
        assert event["user"] == f"user-{mark.split('-')[0]}"
        assert len(event["detail"]) == BIG
        assert all(v.startswith(mark) for v in event["detail"].values())  # not another's piece
        seen.add(mark)
    assert len(seen) == WRITERS * THREADS * PER_THREAD
    pids = {json.loads(line)["pid"] for line in lines}
    assert len(pids) == WRITERS and os.getpid() not in pids


def test_secrets_never_reach_the_log(tmp_path):
    s = load_settings(home=tmp_path)
    secret_values = {
        "password": "pw-1",
        "SAMLResponse": "PHNhbWxwOlJlc3BvbnNl",
        "code": "123456",
        "otp_code": "654321",
        "api-token": "tok-1",
        "client_secret": "sec-1",
        "Authorization": "Bearer abc",
        "sp_session": "cookie-1",
    }
    record(
        s,
        kind="authn",
        user="alice",
        source="10.0.0.1",
        resource="/saml/acs",
        action="login",
        outcome="allow",
        via="saml",
        detail={
            **secret_values,
            "nested": {"new_password": "pw-2", "groups": ["dev"]},
            "status_code": 303,
            "key_id": "postgres/customer:2",
        },
    )
    text = next((tmp_path / "logs" / "access").glob("api-*.jsonl")).read_text()
    for value in [*secret_values.values(), "pw-2"]:
        assert value not in text
    (event,) = [json.loads(line) for line in text.splitlines()]
    assert event["detail"] == {
        "nested": {"groups": ["dev"]},
        "status_code": 303,
        "key_id": "postgres/customer:2",
    }
    assert (event["kind"], event["user"], event["source"], event["outcome"]) == (
        "authn",
        "alice",
        "10.0.0.1",
        "allow",
    )
    assert event["host"] and event["pid"] == os.getpid()
    assert dt.datetime.fromisoformat(event["time"]).tzinfo is not None


def test_a_failure_to_log_never_reaches_the_caller(tmp_path, caplog):
    home = tmp_path / "home"
    home.mkdir()
    (home / "logs").write_text("a file where the log directory should be")
    s = load_settings(home=home)
    args = dict(kind="read", user="u", source=None, resource="r", action="GET", outcome="allow")
    with caplog.at_level(logging.WARNING, logger="stripe_platform.access_log"):
        record(s, **args)
        record(s, **args)
        failures = [r for r in caplog.records if "cannot write the access log" in r.message]
        assert len(failures) == 1  # reported once, not once per event
        (home / "logs").unlink()
        record(s, **args)
    assert any("written again" in r.message for r in caplog.records)
    assert len(list((home / "logs" / "access").glob("api-*.jsonl"))) == 1


# -- the request middleware -------------------------------------------------------------------------
def _app(settings) -> FastAPI:
    app = FastAPI()

    def signed_in(request: Request) -> None:
        request.state.principal = SimpleNamespace(user="alice", via="token")

    @app.get("/v1/customers/{cid}", dependencies=[Depends(signed_in)])
    def customer(cid: str) -> dict:
        record(
            settings,
            kind="read",
            user="alice",
            source=None,
            resource=f"customer/{cid}",
            action="read_pii",
            outcome="allow",
        )
        return {"id": cid}

    @app.get("/v1/forbidden")
    async def forbidden() -> None:
        raise HTTPException(403, "no")

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    access_log.install(app, settings)
    return app


def _api_lines(home: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted((home / "logs" / "access").glob("api-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_the_middleware_logs_every_request(tmp_path):
    s = load_settings(home=tmp_path)
    with TestClient(_app(s), raise_server_exceptions=False) as client:
        ok = client.get("/v1/customers/c42", params={"email": "john.doe@example.com", "x": "1"})
        denied = client.get("/v1/forbidden")
        failed = client.get("/v1/boom")
        missing = client.get("/nowhere")
    assert (ok.status_code, denied.status_code, failed.status_code) == (200, 403, 500)
    lines = _api_lines(tmp_path)
    assert "john.doe@example.com" not in json.dumps(lines)
    requests = [e for e in lines if e["kind"] == "request"]
    assert [
        (e["action"], e["resource"], e["outcome"], e["detail"]["status"]) for e in requests
    ] == [
        ("GET", "/v1/customers/c42?email&x", "allow", 200),
        ("GET", "/v1/forbidden", "deny", 403),
        ("GET", "/v1/boom", "error", 500),
        ("GET", "/nowhere", "allow", 404),
    ]
    first = requests[0]
    assert (first["user"], first["via"], first["source"]) == ("alice", "token", "testclient")
    assert requests[1]["user"] is None and requests[1]["reason"] == "HTTP 403"
    assert all(e["detail"]["ms"] >= 0 for e in requests)
    # The read recorded by the endpoint carries the request's id, which the client got back.
    (read,) = [e for e in lines if e["kind"] == "read"]
    assert read["request_id"] == first["request_id"] == ok.headers["x-request-id"]
    assert len({e["request_id"] for e in requests}) == 4
    assert missing.headers["x-request-id"] == requests[3]["request_id"]


# -- reading: merge, filters, damaged lines -----------------------------------------------------------
def _pg_line(ts: str, **fields) -> str:
    return json.dumps({"timestamp": ts, "backend_type": "client backend", **fields})


def test_events_merge_both_logs_in_time_order_and_skip_damaged_lines(tmp_path):
    s = load_settings(home=tmp_path, profile="embedded")
    api_dir = tmp_path / "logs" / "access"
    pg_dir = tmp_path / "pg" / "data" / "log"
    api_dir.mkdir(parents=True)
    pg_dir.mkdir(parents=True)

    def api(ts: str, user: str, outcome: str = "allow") -> str:
        return json.dumps(
            {"time": ts, "v": 1, "kind": "authz", "user": user, "source": "10.0.0.9",
             "resource": "/v1/x", "action": "GET", "outcome": outcome}
        )  # fmt: skip

    (api_dir / "api-2026-12-06.jsonl").write_text(
        api("2026-12-06T23:59:59.000000+00:00", "a") + "\n"
        "{not json\n"
        + api("2026-12-06T10:00:00.000000+00:00", "b", "deny")  # out of order within the file
        + "\n"
    )
    (api_dir / "api-2026-12-07.jsonl").write_text(
        api("2026-12-07T00:00:01.000000+00:00", "c") + "\n" + '{"time":"2026-12-07T00:00:02'
    )  # the last line is still being written: not an error, not an event
    (pg_dir / "postgresql-2026-12-06.json").write_text(
        _pg_line(
            "2026-12-06 12:00:00.000 UTC", user="bob", dbname="stripe", remote_host="127.0.0.1",
            error_severity="LOG", message="statement: SELECT 1",
        ) + "\n"
        + _pg_line(  # written after the midnight rotation of the collector: in the next file
            "2026-12-07 00:00:00.500 UTC", user="bob", dbname="stripe", remote_host="127.0.0.1",
            error_severity="LOG", message="disconnection: session time: 0:00:01.000 user=bob",
        ) + "\n"
        + json.dumps({"timestamp": "2026-12-06 13:00:00.000 UTC", "backend_type": "checkpointer",
                      "error_severity": "LOG", "message": "checkpoint starting: time"}) + "\n"
    )  # fmt: skip
    stream = events(s)
    got = [(e.time.isoformat(), e.origin, e.user, e.action, e.outcome) for e in stream]
    assert got == [
        ("2026-12-06T10:00:00+00:00", "api", "b", "GET", "deny"),
        ("2026-12-06T12:00:00+00:00", "postgres", "bob", "SELECT", "allow"),
        ("2026-12-06T23:59:59+00:00", "api", "a", "GET", "allow"),
        ("2026-12-07T00:00:00.500000+00:00", "postgres", "bob", "disconnect", "allow"),
        ("2026-12-07T00:00:01+00:00", "api", "c", "GET", "allow"),
    ]
    assert stream.skipped == {str(api_dir / "api-2026-12-06.jsonl"): 1}

    def window(**kwargs) -> list[str | None]:
        return [e.user for e in events(s, **kwargs)]

    since = dt.datetime(2026, 12, 6, 12, 0)  # naive: UTC
    until = dt.datetime(2026, 12, 7, 0, 0, 1, tzinfo=dt.UTC)
    assert window(since=since, until=until) == ["bob", "a", "bob"]
    assert window(user="bob") == ["bob", "bob"]
    assert window(origins=["api"], since=dt.datetime(2026, 12, 7)) == ["c"]
    assert window(since=dt.datetime(2026, 12, 8)) == []


# -- redaction ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("statement", "redacted"),
    [
        ("SELECT crypt('password_john', gen_salt('bf'))", "SELECT crypt('?', gen_salt('?'))"),
        (
            "ALTER ROLE bob PASSWORD 'hunter2' VALID UNTIL '2027-01-01'",
            "ALTER ROLE bob PASSWORD '?' VALID UNTIL '?'",
        ),
        (
            "select * from t where email = E'john\\'s@x.com' and n > 10.5e3 and m = -7",
            "select * from t where email = '?' and n > ? and m = -?",
        ),
        ('SELECT $1::text AS pan, "Col 1"', 'SELECT $1::text AS pan, "Col 1"'),
        ("DO $body$ BEGIN PERFORM 'x'; END $body$", "DO '?'"),
        ("SELECT 1 -- card 4970 1234\n, 2 /* a /* nested */ b */", "SELECT ? , ?"),
        ("SELECT x'1F', b'101', n'nat', 0x1F", "SELECT '?', '?', '?', ?"),
        # A backslash in a plain string reads two ways (standard_conforming_strings on or off):
        # all of what follows is hidden, the only reading that redacts the secret in both.
        ("SELECT 'a\\' , 'secret' FROM t", "SELECT '?'"),
        ("SELECT 'unterminated secret", "SELECT '?'"),
        ('SELECT "unterminated secret', "SELECT '?'"),
    ],
)
def test_literals_are_redacted(statement, redacted):
    assert redact_sql(statement) == redacted


@pytest.mark.parametrize(
    ("statement", "command", "relations"),
    [
        ("SELECT * FROM public.customer c JOIN payment p ON p.id = c.id", "SELECT",
         ("public.customer", "payment")),
        ("INSERT INTO customer (email) VALUES ($1)", "INSERT", ("customer",)),
        ("WITH x AS (SELECT 1 FROM a) UPDATE b SET v = 1 FROM x", "UPDATE", ("a", "b")),
        ("SELECT extract(epoch FROM now()) FROM generate_series(1, 3) g, \"Odd\".\"Tab\"",
         "SELECT", ("Odd.Tab",)),
        ("CREATE OR REPLACE FUNCTION f() RETURNS int AS $$ SELECT 1 FROM t $$ LANGUAGE sql",
         "CREATE FUNCTION", ()),
        ("REVOKE SELECT ON TABLE customer FROM bob", "REVOKE", ("customer",)),
        ("SELECT * FROM t FOR UPDATE SKIP LOCKED", "SELECT", ("t",)),
        ("COPY payment (id, amount) FROM STDIN", "COPY", ("payment",)),
    ],
)  # fmt: skip
def test_statements_are_summarised(statement, command, relations):
    assert summarise_sql(statement) == (command, relations)


# -- PostgreSQL's log of the session cluster ------------------------------------------------------------
def _wait_for(settings, predicate, *, since: dt.datetime, timeout: float = 30.0) -> list:
    """The logging collector writes asynchronously: read until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(events(settings, since=since, origins=["postgres"]))
        if predicate(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_postgres_logins_and_statements_redacted(settings, conn, database, monkeypatch, request):
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    tag = secrets.token_hex(4)
    role, password = f"access_log_probe_{tag}", f"pw-{secrets.token_hex(8)}"
    crypt_secret = f"password_john_{tag}"
    email = f"john.doe.{tag}@example.com"
    card = f"4970{secrets.randbelow(10**12):012d}"
    conn.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)
        )
    )
    request.addfinalizer(
        lambda: conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    )
    # A refused login: the wrong password.
    wrong = db.conninfo(
        settings, database=database, with_key=False, user=role, password="not-the-password"
    )
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong).close()
    # The role logs in and reads what it was never granted: refused by the server.
    right = db.conninfo(settings, database=database, with_key=False, user=role, password=password)
    with (
        psycopg.connect(right, autocommit=True) as probe,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        probe.execute("SELECT * FROM customer WHERE email = 'nobody@example.com'")
    # Secrets as literals, in statements that log_statement=all writes in clear.
    conn.execute(f"SELECT crypt('{crypt_secret}', gen_salt('bf'))")
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute(f"SELECT '{email}' AS email, 1 / 0")
    with pytest.raises(psycopg.errors.RaiseException):  # a function's message quotes anything
        conn.execute(f"DO $$ BEGIN RAISE EXCEPTION 'card %', '{card}'; END $$")

    def complete(found: list) -> bool:
        return any(e.sqlstate == "P0001" for e in found) and any(
            e.action == "disconnect" and e.user == role for e in found
        )

    found = _wait_for(settings, complete, since=since)
    assert complete(found), "the cluster's log never showed the probe's session"
    raw = "".join(p.read_text() for p in access_log.postgres_log_dir(settings).glob("*.json"))
    for secret in (crypt_secret, email, password, card):
        assert secret in raw  # PostgreSQL's own log has them in clear...
    shown = json.dumps([e.as_dict() for e in found])
    for secret in (crypt_secret, email, password, card):
        assert secret not in shown  # ...the access log view never does

    mine = [e for e in found if e.user == role]
    refused = [e for e in mine if e.kind == "authn" and e.outcome == "deny"]
    assert len(refused) == 1
    (denied_login,) = refused
    assert (denied_login.source, denied_login.database, denied_login.sqlstate) == (
        "127.0.0.1",
        database,
        "28P01",
    )
    assert denied_login.action == "connect" and "password authentication failed" in (
        denied_login.reason or ""
    )
    assert [e.outcome for e in mine if e.kind == "authn"] == ["deny", "allow"]
    (no_grant,) = [e for e in mine if e.kind == "authz"]
    assert (no_grant.outcome, no_grant.sqlstate, no_grant.resource) == ("deny", "42501", "customer")
    assert no_grant.statement == "SELECT * FROM customer WHERE email = '?'"

    ours = [e for e in found if e.session is not None and e.database == database]
    statements = {e.statement for e in ours if e.kind == "statement"}
    assert "SELECT crypt('?', gen_salt('?'))" in statements
    assert f"CREATE ROLE \"{role}\" LOGIN PASSWORD '?'" in statements
    (division,) = [e for e in ours if e.sqlstate == "22012"]
    assert division.outcome == "error" and division.statement == "SELECT '?' AS email, ? / ?"
    (raised,) = [e for e in ours if e.sqlstate == "P0001"]
    assert (raised.reason, raised.statement) == ("P0001 raised by a function", "DO '?'")
    assert [e.time for e in found] == sorted(e.time for e in found)

    # The command line shows the same, for machines (--json) and people.
    from stripe_platform.cli import app

    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(settings.home_dir))
    get_settings.cache_clear()
    request.addfinalizer(get_settings.cache_clear)
    runner = CliRunner()
    result = runner.invoke(
        app, ["access", "log", "--since", "10m", "--source", "postgres", "--user", role,
              "--outcome", "deny", "--json"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [(e["kind"], e["sqlstate"]) for e in listed] == [("authn", "28P01"), ("authz", "42501")]
    assert all(e["user"] == role and e["source"] == "127.0.0.1" for e in listed)
    result = runner.invoke(app, ["access", "log", "--since", "10m", "--limit", "0"])
    assert result.exit_code == 0, result.output
    assert "SELECT crypt('?', gen_salt('?'))" in result.stdout and role in result.stdout
    for secret in (crypt_secret, email, password, card):
        assert secret not in result.output
    bad = runner.invoke(app, ["access", "log", "--since", "yesterday"])
    assert bad.exit_code != 0 and "neither a duration" in bad.output
