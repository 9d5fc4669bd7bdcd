"""The dbt project end to end: a seeded OLTP database and document store, synced by the embedded
engine into a real warehouse (DuckDB, PostgreSQL), built with `stripe-platform transform`, and the
brief's three queries answered from the marts."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from decimal import Decimal

import duckdb
import pytest
import yaml
from psycopg import sql
from pydantic import SecretStr

from stripe_platform.config import Settings
from stripe_platform.docstore.client import connect as connect_docs
from stripe_platform.ingestion import cdc
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import open_writer, run_sync, slot_name
from stripe_platform.oltp import db
from stripe_platform.oltp.status import change_status
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec
from stripe_platform.transform import analyses
from stripe_platform.transform import dbt as transform

END = dt.date(2026, 11, 1)
CONNECTIONS = ("postgres-to-snowflake", "mongodb-to-snowflake")
QUERIES = ("revenue-tax-fr", "fraud-daily-small-credit", "premium-spend-fr")
# Relations an incremental run must leave exactly as a rebuild from scratch would.
INCREMENTAL = (
    "analytics.fact_revenue",
    "analytics.fact_fraudanalysis",
    "analytics.fact_customersegmentation",
    "analytics.dim_customer",
    "intermediate.int_transactions",
)


def cli_env(s: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_PLATFORM_")}
    env.update(
        STRIPE_PLATFORM_HOME=str(s.home),
        STRIPE_PLATFORM_PG_DATABASE=s.pg_database,
        STRIPE_PLATFORM_MONGODB_DATABASE=s.mongodb_database,
        STRIPE_PLATFORM_WAREHOUSE=s.warehouse_backend,
        COLUMNS="200",
    )
    if s.warehouse_path:
        env["STRIPE_PLATFORM_WAREHOUSE_PATH"] = str(s.warehouse_path)
    if s.warehouse_dsn:
        env["STRIPE_PLATFORM_WAREHOUSE_DSN"] = s.warehouse_dsn.get_secret_value()
    return env


def cli(s: Settings, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", *args],
        env=cli_env(s),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def sync_all(s: Settings) -> None:
    catalog = load_catalog()
    for name in CONNECTIONS:
        run_sync(s, catalog, open_writer(s, catalog, name), name)


def duckdb_rows(s: Settings, query: str) -> list[tuple]:
    with duckdb.connect(str(s.warehouse_file), read_only=True) as conn:
        return conn.execute(query).fetchall()


@pytest.fixture
def pipeline(settings, database, tmp_path):
    """A seeded source (OLTP + documents) and an empty DuckDB warehouse."""
    s = settings.model_copy(
        update={
            "pg_database": database,
            "mongodb_database": database,
            "warehouse_path": tmp_path / "warehouse.duckdb",
        }
    )
    seed_load.seed(
        s, build(make_spec(scale=0.004, seed=11, end=END, max_documents=2000)), connect_docs(s)
    )
    yield s
    with db.connect(s, autocommit=True) as conn:
        for c in load_catalog().connections:
            cdc.drop_slot(conn, slot_name("stripe_platform", c.name, conn.info.dbname))


def test_build_answers_the_brief_and_incremental_runs_equal_a_full_rebuild(pipeline):
    s = pipeline
    sync_all(s)
    first = json.loads(cli(s, "transform", "--json").stdout)
    assert first["success"] and first["counts"].get("error", 0) == 0
    assert first["counts"]["pass"] > 50  # the generic and singular tests ran

    with db.connect(s) as conn:
        source_count = conn.execute("SELECT count(*) FROM Transaction").fetchone()[0]
        completed = conn.execute(
            "SELECT t.ID FROM Transaction t JOIN TransactionStatus s ON s.ID = t.TransactionStatusID "
            "WHERE s.Name = 'completed' ORDER BY t.ID LIMIT 1"
        ).fetchone()[0]
        customer = conn.execute("SELECT min(ID) FROM Customer").fetchone()[0]
    assert duckdb_rows(s, "SELECT count(*) FROM analytics.fact_revenue")[0][0] == source_count
    for name in QUERIES:
        result = analyses.run_analysis(s, name)
        assert result.rows, f"{name} returned nothing"

    # Changes at the source: a refund, a deleted payment, an hour of new activity, a customer who
    # moved country.
    with db.connect(s, autocommit=True) as conn:
        change_status(conn, completed, "refunded", reason="test refund", updated_by="test")
        deleted = conn.execute(
            "SELECT max(ID) FROM Transaction WHERE ID <> %s", (completed,)
        ).fetchone()[0]
        conn.execute("DELETE FROM Transaction WHERE ID = %s", (deleted,))
        conn.execute(
            "UPDATE Customer SET CountryCode = 'JP', UpdatedAt = now() WHERE ID = %s", (customer,)
        )
    cli(s, "seed", "--minutes", "60", "--seed", "3")
    sync_all(s)
    cli(s, "transform")

    assert duckdb_rows(
        s, f"SELECT Status, Amount, TaxAmount FROM analytics.fact_revenue WHERE ID = {completed}"
    ) == [("refunded", Decimal("0.00"), Decimal("0.00"))]
    with db.connect(s) as conn:
        grown = conn.execute("SELECT count(*) FROM Transaction").fetchone()[0]
    assert grown > source_count - 1  # the hour added payments; one was deleted
    assert duckdb_rows(s, "SELECT count(*) FROM analytics.fact_revenue")[0][0] == grown
    for relation, key in (
        ("analytics.fact_revenue", "ID"),
        ("intermediate.int_transactions", "transaction_id"),
    ):
        assert duckdb_rows(s, f"SELECT count(*) FROM {relation} WHERE {key} = {deleted}") == [(0,)]
    versions = duckdb_rows(
        s,
        "SELECT country_code, dbt_valid_to IS NULL FROM snapshots.customers_snapshot "
        f"WHERE customer_id = {customer} ORDER BY dbt_valid_from",
    )
    assert len(versions) == 2 and versions[-1] == ("JP", True) and versions[0][1] is False

    # A lost replication slot makes the next sync take a new snapshot: every payment arrives
    # again, every day changes, and the aggregate facts' pre-hooks empty them before refilling.
    with db.connect(s, autocommit=True) as conn:
        cdc.drop_slot(conn, slot_name("stripe_platform", "postgres-to-snowflake", conn.info.dbname))
    sync_all(s)
    cli(s, "transform")

    # The incremental facts must hold exactly what a rebuild from scratch computes.
    incremental = {m: sorted(duckdb_rows(s, f"SELECT * FROM {m}"), key=repr) for m in INCREMENTAL}
    cli(s, "transform", "--full-refresh")
    rebuilt = {m: sorted(duckdb_rows(s, f"SELECT * FROM {m}"), key=repr) for m in INCREMENTAL}
    for m in INCREMENTAL:
        assert incremental[m] == rebuilt[m], f"{m} differs after incremental runs"

    # Required mart columns are NOT NULL constraints of the contract: the warehouse rejects a NULL.
    with duckdb.connect(str(s.warehouse_file)) as conn, pytest.raises(duckdb.ConstraintException):
        conn.execute("UPDATE analytics.fact_revenue SET Amount = NULL WHERE ID = ?", [completed])


def test_postgres_warehouse_gives_the_same_answers_as_duckdb(pipeline, settings):
    s = pipeline
    warehouse_db = f"{s.pg_database}_warehouse"
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(warehouse_db)))
    try:
        on_postgres = s.model_copy(
            update={
                "warehouse": "postgres",
                "warehouse_dsn": SecretStr(
                    db.conninfo(settings, database=warehouse_db, with_key=False)
                ),
            }
        )
        for target in (s, on_postgres):
            sync_all(target)
            cli(target, "transform")
        for name in QUERIES:
            expected = analyses.run_analysis(s, name).rows
            assert expected
            assert analyses.run_analysis(on_postgres, name).rows == expected, name
    finally:
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(warehouse_db)
                )
            )


def test_profiles_are_generated_without_secrets(settings, tmp_path):
    s = settings.model_copy(
        update={
            "home": tmp_path,
            "warehouse": "postgres",
            "warehouse_dsn": SecretStr(
                "host=127.0.0.1 port=6543 user=dbt password=s3cret dbname=wh sslmode=require"
            ),
        }
    )
    directory = transform.write_profiles(s)
    text = (directory / "profiles.yml").read_text()
    assert "s3cret" not in text
    target = yaml.safe_load(text)["stripe_platform"]["outputs"]["postgres"]
    assert (target["host"], target["port"], target["dbname"], target["sslmode"]) == (
        "127.0.0.1",
        6543,
        "wh",
        "require",
    )
    assert transform.dbt_env(s) == {transform.PG_PASSWORD_VAR: "s3cret"}

    duck = transform.profile_target(
        settings.model_copy(update={"warehouse_path": tmp_path / "w.duckdb"})
    )
    assert duck["type"] == "duckdb" and duck["path"] == str(tmp_path / "w.duckdb")


def test_unknown_query_and_unbuilt_marts_are_clear_errors(settings, tmp_path):
    with pytest.raises(analyses.AnalysisError, match="known: fraud-daily-small-credit"):
        analyses.query_sql("revenue")
    s = settings.model_copy(update={"warehouse_path": tmp_path / "empty.duckdb"})
    duckdb.connect(str(s.warehouse_file)).close()
    with pytest.raises(analyses.AnalysisError, match="stripe-platform transform"):
        analyses.run_analysis(s, "revenue-tax-fr")


def test_the_analyses_are_the_brief_queries_as_written():
    brief = transform.REPO_ROOT.parent / "shared" / "BRIEF.txt"
    if not brief.exists():
        pytest.skip("the brief is not beside the repository")
    text = brief.read_text().replace('"', "'")
    flat = " ".join(text.split())
    for name in QUERIES:
        query = " ".join(analyses.query_sql(name).split())
        assert query in flat, f"{name} is not the brief's query"


def test_docs_generate_and_every_mart_column_is_documented_and_classified(settings, tmp_path):
    s = settings.model_copy(update={"home": tmp_path, "warehouse_path": tmp_path / "w.duckdb"})
    cli(s, "dbt", "docs", "generate", "--empty-catalog")
    manifest = json.loads((tmp_path / "dbt" / "target" / "manifest.json").read_text())
    marts = [
        n
        for n in manifest["nodes"].values()
        if n["resource_type"] == "model" and n["original_file_path"].startswith("models/marts/")
    ]
    assert {m["name"] for m in marts} >= {
        "FACT_Revenue",
        "FACT_FraudAnalysis",
        "FACT_CustomerSegmentation",
        "DIM_Date",
        "DIM_Customer",
        "DIM_Merchant",
        "DIM_Location",
        "DIM_PaymentMethod",
    }
    for model in marts:
        assert model["description"], model["name"]
        assert model["config"]["contract"]["enforced"], model["name"]
        for column in model["columns"].values():
            where = f"{model['name']}.{column['name']}"
            assert column["description"], where
            assert column["config"]["meta"]["classification"] in {"PII", "PCI", "none"}, where
