"""The command line as a user runs it, including the main job, in a throwaway platform home."""

import json
import os
import subprocess
import sys

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
    assert "refunded by an earlier run" in second.stdout
    assert second.stdout.count("Exceptional refund") == 1

    status = json.loads(cli("status", "--json").stdout)
    assert status["postgres"]["running"] is True
    plain = cli("status").stdout
    assert "running" in plain and "stand-in" in plain
    assert cli("down").stdout.strip() == "PostgreSQL stopped"
    assert json.loads(cli("status", "--json").stdout)["postgres"]["running"] is False


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
    assert "CustomerReview" in cli("mongo", "apply").stdout
    unknown = cli("mongo", "query", "nope", check=False)
    assert unknown.returncode == 1 and "known: admin-error-logs" in unknown.stderr
    assert "db.LogData.find" in cli("mongo", "query", "admin-error-logs").stdout
