"""`dbt build` of dbt_project/ on Snowflake, through fakesnow's wire server (ARCHITECTURE §5).

A small seeded dataset is synced (postgres-to-snowflake, mongodb-to-snowflake) into the Snowflake
raw layer on a fakesnow server, then `stripe-platform transform` runs as a user runs it, in a
subprocess, twice: a full build, then (after changes at the source and a CDC re-sync) an
incremental run that merges facts and adds snapshot versions. The brief's three queries must then
give the same answers as a full DuckDB build of the same data.

fakesnow needs the test-only macro overrides of dbt_project/macros/fakesnow.sql, switched on by
STRIPE_PLATFORM_DBT_FAKESNOW_SHIMS=1. It answers SQL it cannot handle with HTTP 500, which the
connector retries for a long time: dbt always runs under a timeout here. Passing proves the
project's SQL compiles and runs through Snowflake's dialect (sqlglot, executed by DuckDB); it does
not prove real Snowflake semantics.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest
import snowflake.connector
from pydantic import SecretStr

from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import open_writer, run_sync
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.oltp import db
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec
from stripe_platform.transform.analyses import available, run_analysis
from stripe_platform.transform.dbt import FAKESNOW_SHIMS_VAR
from stripe_platform.warehouse import snowflake_params
from stripe_platform.warehouse.snowflake import SnowflakeRaw

pytestmark = [
    pytest.mark.timeout(900),
    # fakesnow's own server code, not ours.
    pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning"),
]

END = dt.date(2026, 11, 1)
CONNECTIONS = ("postgres-to-snowflake", "mongodb-to-snowflake")
DATABASE = "STRIPE"
DBT_TIMEOUT = 600  # seconds; a statement fakesnow cannot handle would otherwise hang the build
FRAUD_MART = (
    "SELECT DateKey, CustomerKey, MerchantKey, LocationKey, PaymentMethodKey, ScoredCount, "
    "PredictedFraudCount, AvgFraudScore, ConfirmedFraudCount, PredictedConfirmedFraudCount "
    "FROM FACT_FraudAnalysis"
)


def transform(home: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`stripe-platform transform --json` in a subprocess with its own platform home (its dbt
    profile and target; a transform reaches only the warehouse, never the session's servers)."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STRIPE_PLATFORM_") and k != "MONGODB_URI"
    }
    return subprocess.Popen(
        [sys.executable, "-m", "stripe_platform.cli", "transform", "--json"],
        env={**base, "STRIPE_PLATFORM_HOME": str(home), "COLUMNS": "200", **env},
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], what: str) -> dict[str, Any]:
    """Waits for a transform (killing it after DBT_TIMEOUT) and returns its JSON summary."""
    try:
        out, err = process.communicate(timeout=DBT_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{what}: dbt did not finish in {DBT_TIMEOUT}s (fakesnow HTTP 500?)\n{err}")
    assert process.returncode == 0, f"{what} failed:\n{out}\n{err}"
    summary = json.loads(out)
    assert summary["success"] and not summary["failures"], summary
    return summary


def normalise(value: Any) -> Any:
    """fakesnow returns some NUMBER aggregates as floats where Snowflake returns Decimals."""
    if isinstance(value, decimal.Decimal | float | int) and not isinstance(value, bool):
        return round(float(value), 2)
    return value


def answers(settings: Any) -> dict[str, list[tuple[Any, ...]]]:
    """The brief's three queries on the settings' warehouse (stripe-platform query's path)."""
    results = {}
    for name in available():
        result = run_analysis(settings, name)
        results[name] = sorted(tuple(normalise(v) for v in row) for row in result.rows)
    return results


def test_dbt_build_on_snowflake_full_then_incremental_matches_duckdb(
    snowflake_server, settings, database, docdb, tmp_path, seed_templates
):
    started = time.monotonic()
    s = settings.model_copy(update={"pg_database": database, "mongodb_database": docdb.name})
    seed_templates.seed(s, build(make_spec(scale=0.003, seed=4, end=END, max_documents=300)), docdb)
    catalog = load_catalog()
    sf_home, duck_home = tmp_path / "snowflake", tmp_path / "duckdb"
    sf_home.mkdir()
    duck_home.mkdir()
    server = snowflake_server
    sf = s.model_copy(
        update={
            "warehouse": "snowflake",
            "snowflake_account": server["account"],
            "snowflake_user": server["user"],
            "snowflake_password": SecretStr(server["password"]),
            "snowflake_database": DATABASE,
            "snowflake_host": server["host"],
            "snowflake_port": server["port"],
            "snowflake_protocol": "http",
        }
    )
    sf_env = {
        "STRIPE_PLATFORM_WAREHOUSE": "snowflake",
        "STRIPE_PLATFORM_SNOWFLAKE_ACCOUNT": server["account"],
        "STRIPE_PLATFORM_SNOWFLAKE_USER": server["user"],
        "STRIPE_PLATFORM_SNOWFLAKE_PASSWORD": server["password"],
        "STRIPE_PLATFORM_SNOWFLAKE_DATABASE": DATABASE,
        "STRIPE_PLATFORM_SNOWFLAKE_HOST": server["host"],
        "STRIPE_PLATFORM_SNOWFLAKE_PORT": str(server["port"]),
        "STRIPE_PLATFORM_SNOWFLAKE_PROTOCOL": "http",
        FAKESNOW_SHIMS_VAR: "1",
    }
    timeouts = {"login_timeout": 10, "network_timeout": 30, "socket_timeout": 30}
    # One writer session for both connections, with server-side (qmark) binding. Two fakesnow
    # gaps, not the writer's: a client-interpolated literal containing `$date` (MongoDB cursor
    # state) is read as a session variable, and a second session without a current schema trips
    # an assertion in fakesnow's CREATE TABLE handling (HTTP 500).
    writer = SnowflakeRaw(
        snowflake.connector.connect(**{**snowflake_params(sf), **timeouts}, paramstyle="qmark"),
        database=DATABASE,
    )
    marts = snowflake.connector.connect(**{**snowflake_params(sf), **timeouts}, schema="ANALYTICS")
    try:
        connections = [catalog.resolve(name) for name in CONNECTIONS]
        for connection in connections:
            assert run_sync(sf, connection, writer).rows > 0
        synced = time.monotonic()

        # 1. A full build.
        first = finish(transform(sf_home, sf_env), "first snowflake build")
        assert first["counts"].get("success", 0) >= 30 and first["counts"].get("pass", 0) >= 50
        built = time.monotonic()
        before = answers(sf)
        assert all(before.values()), before
        with marts.cursor() as cur:  # nothing scored yet: nothing predicted, fraud reported
            unscored = cur.execute(
                "SELECT sum(ScoredCount), sum(PredictedFraudCount), count(AvgFraudScore), "
                "sum(ConfirmedFraudCount) FROM FACT_FraudAnalysis"
            ).fetchone()
        assert tuple(unscored[:3]) == (0, 0, 0) and unscored[3] > 0

        # 2. Changes at the source: refunds (FACT_Revenue merges, aggregate facts recompute their
        # days), a merchant update (a new merchants_snapshot version) and model scores; then a CDC
        # re-sync.
        with db.connect(s, autocommit=True) as conn:
            refunded = [
                r[0]
                for r in conn.execute(
                    # Completed retail payments in France: the brief's revenue-tax-fr must move.
                    "SELECT t.ID FROM Transaction t JOIN Location l ON l.ID = t.TransactionLocationID "
                    "JOIN Merchant m ON m.ID = t.MerchantID JOIN Industry i ON i.ID = m.IndustryID "
                    "WHERE t.TransactionStatusID = 1 AND l.CountryCode = 'FR' AND i.Name = 'Retail' "
                    "ORDER BY t.ID LIMIT 5"
                ).fetchall()
            ]
            assert refunded
            for transaction_id in refunded:
                conn.execute(
                    "SELECT change_transaction_status(%s, 2::smallint, 'refund', 'test')",
                    (transaction_id,),
                )
            merchant = conn.execute("SELECT min(ID) FROM Merchant").fetchone()[0]
            conn.execute("UPDATE Merchant SET Rating = 1.5 WHERE ID = %s", (merchant,))
            # The first build had no model score (the mart built with nothing predicted); now a
            # third of the payments are scored, as `ml score` writes them.
            scored, flagged = conn.execute(
                "WITH s AS (INSERT INTO FraudScore (TransactionID, TransactionDateTime, ModelName, "
                "ModelVersion, FeatureVersion, Score, Threshold, IsFraud) "
                "SELECT ID, DateTime, 'fraud', 1, 'v1', ID * 7919 % 1000 / 1000.0, 0.5, "
                "ID * 7919 % 1000 >= 500 FROM Transaction WHERE ID % 3 = 0 RETURNING IsFraud) "
                "SELECT count(*), count(*) FILTER (WHERE IsFraud) FROM s"
            ).fetchone()
            assert 0 < flagged < scored
        again = run_sync(sf, connections[0], writer)
        assert again.phase == "incremental" and again.rows >= len(refunded) + 1

        # The same data into DuckDB (a fresh snapshot sync: it takes over the connection's slot,
        # so it runs after the Snowflake re-sync).
        duck = s.model_copy(
            update={"warehouse": "duckdb", "warehouse_path": duck_home / "warehouse.duckdb"}
        )
        duck_writer = open_writer(duck, connections[0])
        try:
            for connection in connections:
                run_sync(duck, connection, duck_writer)
        finally:
            duck_writer.conn.close()

        # 3. The incremental run on Snowflake and a full DuckDB build, side by side.
        second = transform(sf_home, sf_env)
        reference = transform(
            duck_home,
            {
                "STRIPE_PLATFORM_WAREHOUSE": "duckdb",
                "STRIPE_PLATFORM_WAREHOUSE_PATH": str(duck_home / "warehouse.duckdb"),
            },
        )
        finish(second, "incremental snowflake run")
        finish(reference, "duckdb build")
        rebuilt = time.monotonic()

        with marts.cursor() as cur:
            statuses = cur.execute(
                "SELECT DISTINCT Status FROM FACT_Revenue WHERE ID IN ("
                + ", ".join(str(i) for i in refunded)
                + ")"
            ).fetchall()
            assert statuses == [("refunded",)]
            versions = cur.execute(
                "SELECT count(*), count(dbt_valid_to) FROM SNAPSHOTS.MERCHANTS_SNAPSHOT "
                f"WHERE merchant_id = {merchant}"
            ).fetchone()
            assert tuple(versions) == (2, 1)  # the old version closed, the new one current

        after = answers(sf)
        assert all(after.values()), after
        assert after["revenue-tax-fr"] != before["revenue-tax-fr"]  # the refunds arrived
        assert after == answers(duck)
        # The model's predictions beside confirmed fraud, merged incrementally: Snowflake's mart
        # is DuckDB's.
        with marts.cursor() as cur:
            predicted = sorted(
                tuple(normalise(v) for v in row) for row in cur.execute(FRAUD_MART).fetchall()
            )
        with duckdb.connect(str(duck.warehouse_file), read_only=True) as conn:
            assert predicted == sorted(
                tuple(normalise(v) for v in row)
                for row in conn.execute(FRAUD_MART.replace("FROM ", "FROM analytics.")).fetchall()
            )
        assert sum(r[5] for r in predicted) == scored and sum(r[6] for r in predicted) == flagged
    finally:
        marts.close()
        writer.conn.close()
        with db.connect(s, autocommit=True) as conn:
            for c in catalog.connections:
                connection = catalog.resolve(c.name)
                if connection.source.kind == "postgres":
                    cdc.drop_slot(conn, connection.slot(conn.info.dbname))
    print(
        f"\nsync {synced - started:.0f}s, full snowflake build {built - synced:.0f}s, "
        f"incremental + duckdb {rebuilt - built:.0f}s, total {time.monotonic() - started:.0f}s"
    )
