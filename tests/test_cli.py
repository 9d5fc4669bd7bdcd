"""The command line as a user runs it, including the main job, in a throwaway platform home."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def cli(fresh_home):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STRIPE_PLATFORM_") and k != "MONGODB_URI"
    }
    env.update(
        STRIPE_PLATFORM_HOME=str(fresh_home), STRIPE_PLATFORM_PG_FSYNC="false", COLUMNS="200"
    )

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "stripe_platform.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=1200,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
        return result

    yield run
    run("down", check=False)


@pytest.mark.timeout(1800)  # two full pipeline runs with real Airflow and dbt
def test_main_job_end_to_end_and_again(cli):
    """`make demo`: the brief's statements, then seed -> Airflow (`airflow dags test` of the ELT
    DAGs: syncs, dbt through cosmos) -> the brief's OLAP queries answered from the marts."""
    first = cli("demo", "--scale", "0.005")
    out = first.stdout
    assert "elt_warehouse_daily: success" in out and "elt_lake_daily: success" in out
    flat = " ".join(out.split())  # the console wraps at 80 columns
    # Access (issue 21): the policy holds, the expired contractor is found and revoked, the API
    # refuses a call without a token and scores with the policy's machine identity.
    assert "`access plan` now: no drift" in flat
    assert "1 revoked (demo_contractor); 0 left" in flat
    assert "without a token: 401;" in flat and "revoked after): 200" in flat
    # Audit (issue 22): logs collected, the trail verified, the rules over the seeded logs.
    assert "`audit collect`:" in flat and "chain intact" in flat
    assert "detection rules on the seed's" in flat and "new incident(s)" in flat
    # The fraud model: trained and promoted (no champion yet), then every payment scored.
    assert "ml_fraud_training: success" in out and "ml_fraud_scoring: success" in out
    assert "✓ promote" in out
    for name in ("revenue-tax-fr", "fraud-daily-small-credit", "premium-spend-fr"):
        answer = json.loads(cli("query", name, "--json").stdout)
        assert answer["rows"], f"{name} returned no rows"
    assert "ACID example (sql/examples/acid_status_change.sql): committed" in out
    assert "refunded -> pending is refused" in out
    assert "John42 │ True" in out and "False (wrong password)" in out
    assert "transaction_default" in out  # the 2019 outlier
    assert '"query_id": 2' in out  # admin's error log
    assert "iPadOS" in out  # top operating systems
    assert "The product was not what I wanted" in out

    # Again: idempotent (nothing applied twice, nothing duplicated) and incremental.
    second = cli("demo", "--scale", "0.005")
    assert "0 migration(s) applied now" in second.stdout
    assert "appended 60 minutes of activity" in second.stdout
    assert "elt_warehouse_daily: success" in second.stdout
    assert "ml_fraud_scoring: success" in second.stdout
    assert "refunded by an earlier run" in second.stdout
    assert second.stdout.count("Exceptional refund") == 1

    status = json.loads(cli("status", "--json").stdout)
    assert status["postgres"]["running"] is True
    assert status["documents"]["backend"] == "ferretdb" and status["documents"]["running"] is True
    plain = cli("status").stdout
    assert "documents running  127.0.0.1:" in plain and "FerretDB v1.24.2  TLS" in plain
    assert cli("down").stdout.splitlines() == ["document server stopped", "PostgreSQL stopped"]
    stopped = json.loads(cli("status", "--json").stdout)
    assert stopped["postgres"]["running"] is False and stopped["documents"]["running"] is False


def test_db_commands(cli):
    cli("up")
    cli("db", "migrate")
    assert "monthly partitions attached" in cli("db", "partitions").stdout
    refused = cli("db", "status-change", "1", "pending", "--reason", "x", "--by", "me", check=False)
    assert refused.returncode == 1 and "does not exist" in refused.stderr
    granted = cli(
        "db", "grant-temporary", "contractor_cli", "--role", "readonlyuser", "--days", "3"
    )
    assert "password (shown once)" in granted.stdout
    assert "contractor_cli" in cli("db", "grants").stdout
    assert "nothing expired" in cli("db", "revoke-expired").stdout
    bad = cli("db", "grant-temporary", "x y", check=False)
    assert bad.returncode == 1 and "user name" in bad.stderr


def test_mongo_commands(cli):
    stopped = cli("mongo", "apply", check=False)
    assert stopped.returncode == 1 and "run `stripe-platform up`" in stopped.stderr
    cli("up")
    first = {r["collection"]: r for r in json.loads(cli("mongo", "apply", "--json").stdout)}
    assert first["Transaction"]["created"] and first["Transaction"]["warnings"] == []
    assert first["Transaction"]["indexes_created"] == ["transaction_id_1"]
    backend = first["Transaction"]["backend_indexes"]
    assert [entry.split(": ")[0] for entry in backend] == ["_id", "transaction_id"]
    assert [entry.split(": ")[1] for entry in backend] == first["Transaction"][
        "backend_indexes_created"
    ]
    again = cli("mongo", "apply").stdout
    assert "CustomerReview" in again
    assert "backend GIN indexes: _id (present), transaction_id (present)" in again
    unknown = cli("mongo", "query", "nope", check=False)
    assert unknown.returncode == 1 and "known: admin-error-logs" in unknown.stderr
    assert "db.LogData.find" in cli("mongo", "query", "admin-error-logs").stdout


# -- from anywhere, exactly as written ---------------------------------------------------------------
PROJECT_DIR = Path(__file__).resolve().parents[1]  # the checkout these tests run from


def run_cli(*args: str, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """The command line run from ``cwd`` with only the given platform variables set."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STRIPE_PLATFORM_", "AWS_")) and k != "MONGODB_URI"
    }
    return subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", *args],
        capture_output=True,
        text=True,
        env={**base, "COLUMNS": "200", **env},
        cwd=cwd,
        check=False,
        timeout=timeout,
    )


def test_the_home_is_the_same_from_any_directory(fresh_home, tmp_path):
    """A relative STRIPE_PLATFORM_HOME (like the default .platform) is taken from the project
    directory: the cluster started from the checkout is the one `status` sees from elsewhere."""
    relative = os.path.relpath(fresh_home, PROJECT_DIR)
    env = {"STRIPE_PLATFORM_HOME": relative, "STRIPE_PLATFORM_PG_FSYNC": "false"}
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    try:
        started = run_cli("up", cwd=PROJECT_DIR, **env)
        assert started.returncode == 0, started.stderr
        seen = run_cli("status", "--json", cwd=elsewhere, **env)
        assert seen.returncode == 0, seen.stderr
        status = json.loads(seen.stdout)
        assert status["home"] == str(fresh_home)
        assert status["home_from"] == "STRIPE_PLATFORM_HOME"
        assert status["postgres"]["running"] is True
        plain = run_cli("status", cwd=elsewhere, **env).stdout
        assert f"home      {fresh_home}  (STRIPE_PLATFORM_HOME)" in plain
        assert list(elsewhere.iterdir()) == []  # nothing made where the command ran
    finally:
        run_cli("down", cwd=PROJECT_DIR, **env)  # where it was started: stopped whatever happened


def test_the_default_home_is_in_the_project_directory(tmp_path):
    seen = run_cli("status", "--json", cwd=tmp_path)
    assert seen.returncode == 0, seen.stderr
    status = json.loads(seen.stdout)
    assert status["home"] == str(PROJECT_DIR / ".platform")
    assert status["home_from"] == f"default: .platform in the project directory {PROJECT_DIR}"
    assert status["lake"] == {
        "root": str(PROJECT_DIR / ".platform" / "lake"),
        "kind": "local directory",
        "from": "default: <home>/lake",
    }


def test_rules_paths_and_names_keep_their_brackets(tmp_path):
    """Nothing the user, the database or a rule supplies is read as rich markup."""
    rule = run_cli("status", cwd=tmp_path, STRIPE_PLATFORM_PG_DATABASE="Stripe")
    assert rule.returncode == 1
    assert "String should match pattern '^[a-z_][a-z0-9_]*$'" in rule.stderr
    unknown = run_cli("mongo", "query", "logs[a-z]", cwd=tmp_path)
    assert unknown.returncode == 1 and "unknown query 'logs[a-z]'" in unknown.stderr
    home = tmp_path / "[b]home[/b]"
    shown = run_cli("status", cwd=tmp_path, STRIPE_PLATFORM_HOME=str(home))
    assert shown.returncode == 0, shown.stderr
    assert f"home      {home}  (STRIPE_PLATFORM_HOME)" in shown.stdout
    assert f"data {home}/pg/data  audit log {home}/pg/data/log" in shown.stdout  # a styled line
    assert f"log {home}/docstore/ferretdb.log" in shown.stdout  # another styled line


def test_the_demo_tables_print_values_as_they_are():
    from rich.console import Console

    from stripe_platform.showcase.demo import table

    console = Console(record=True, width=120)
    console.print(table("t[a-z]", ["pattern [x]"], [("^[a-z_][a-z0-9_]*$",)]))
    text = console.export_text()
    assert "t[a-z]" in text and "pattern [x]" in text and "^[a-z_][a-z0-9_]*$" in text


@pytest.mark.parametrize("command", [("status",), ("sync", "postgres-to-s3")])
def test_a_lake_uri_of_another_form_stops_the_command_naming_it(tmp_path, command):
    result = run_cli(*command, cwd=tmp_path, STRIPE_PLATFORM_LAKE_URI="ftp://x")
    assert result.returncode == 1
    assert result.stderr.startswith("error: STRIPE_PLATFORM_LAKE_URI is not valid: ftp:// is not")
    assert "accepted forms: a local directory, or s3://bucket/prefix" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "line"),
    [
        # Raised by modules the command line imports only when a command needs them.
        (("sync", "nope"), "error: unknown connection 'nope'; known: postgres-to-snowflake"),
        (("query", "nope"), "error: unknown query 'nope'; known: fraud-daily-small-credit"),
        (("seed", "--end", "soon"), "error: --end 'soon': expected YYYY-MM-DD"),
    ],
)
def test_an_expected_failure_is_one_line_and_exit_1(tmp_path, command, line):
    result = run_cli(*command, cwd=tmp_path, STRIPE_PLATFORM_HOME=str(tmp_path / "home"))
    assert result.returncode == 1
    # sync's progress display, closed by the error, leaves an empty line before it
    assert result.stderr.lstrip("\n").startswith(line)
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line: no traceback


def test_status_reports_the_lake(tmp_path):
    result = run_cli(
        "status", "--json", cwd=tmp_path, STRIPE_PLATFORM_LAKE_URI="s3://stripe-platform-lake/x"
    )
    assert json.loads(result.stdout)["lake"] == {
        "root": "s3://stripe-platform-lake/x",
        "kind": "s3",
        "from": "STRIPE_PLATFORM_LAKE_URI",
    }
    plain = run_cli("status", cwd=tmp_path, STRIPE_PLATFORM_LAKE_URI="s3://stripe-platform-lake/x")
    assert "lake      s3://stripe-platform-lake/x  (s3; STRIPE_PLATFORM_LAKE_URI)" in plain.stdout


@pytest.mark.timeout(300)
def test_a_sync_to_a_lake_it_cannot_write_names_the_variable(settings, database, tmp_path):
    """A well-formed lake that does not exist (no such bucket on the S3 endpoint): the sync stops
    with the variable's name, not a traceback."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        result = run_cli(
            "sync",
            "postgres-to-s3",
            cwd=tmp_path,
            STRIPE_PLATFORM_HOME=str(settings.home_dir),
            STRIPE_PLATFORM_PG_DATABASE=database,
            STRIPE_PLATFORM_LAKE_URI="s3://no-such-bucket-here/lake",
            STRIPE_PLATFORM_S3_ENDPOINT_URL=f"http://{host}:{port}",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_EC2_METADATA_DISABLED="true",
        )
    finally:
        server.stop()
    assert result.returncode == 1, result.stdout
    # Raised where the lake's filesystem refused, naming the object it was reaching (the first
    # write is the record of which columns the lake encrypts, beside the sync state).
    assert (
        "\nerror: STRIPE_PLATFORM_LAKE_URI: the lake s3://no-such-bucket-here/lake cannot be "
        "written (s3://no-such-bucket-here/lake/_stripe_platform/state/" in result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_an_os_error_from_outside_the_lake_is_not_blamed_on_it(tmp_path, monkeypatch):
    """A lake sync can fail on a file that is not the lake's (a source's TLS certificate, the
    numba cache): that error is not relabelled as the lake's setting."""
    from typer.testing import CliRunner

    from stripe_platform.cli import app, ingestion
    from stripe_platform.config import get_settings

    def broken(*args):
        raise FileNotFoundError(2, "No such file or directory", "/elsewhere/tls/ca.crt")

    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STRIPE_PLATFORM_LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setattr(ingestion, "_sync_embedded", broken)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["sync", "postgres-to-s3"])
    finally:
        get_settings.cache_clear()
    assert isinstance(result.exception, FileNotFoundError), result.output
    assert "LAKE_URI" not in result.output
