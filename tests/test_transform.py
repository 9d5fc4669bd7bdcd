"""The dbt project end to end: a seeded OLTP database and document store, synced by the embedded
engine into a real warehouse (DuckDB, PostgreSQL), built with `stripe-platform transform`, and the
brief's three queries answered from the marts."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import subprocess
import sys
from decimal import Decimal

import duckdb
import pytest
import yaml
from psycopg import sql
from pydantic import SecretStr

from built_warehouse import cli_env, sync_all
from stripe_platform.config import Settings
from stripe_platform.docstore.client import connect as connect_docs
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.oltp import db
from stripe_platform.oltp.status import change_status
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec
from stripe_platform.transform import analyses
from stripe_platform.transform import dbt as transform

END = dt.date(2026, 11, 1)
QUERIES = ("revenue-tax-fr", "fraud-daily-small-credit", "premium-spend-fr")
# Relations an incremental run must leave exactly as a rebuild from scratch would.
INCREMENTAL = (
    "analytics.fact_revenue",
    "analytics.fact_fraudanalysis",
    "analytics.fact_customersegmentation",
    "analytics.dim_customer",
    "intermediate.int_transactions",
)


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


def duckdb_rows(s: Settings, query: str) -> list[tuple]:
    with duckdb.connect(str(s.warehouse_file), read_only=True) as conn:
        return conn.execute(query).fetchall()


# The brief's three answers computed straight from the sources (OLTP tables, the scored Transaction
# documents), with the definitions of docs/transform.md, never through dbt's models: money in EUR at
# the reference rates (the seed is input data), revenue and tax only for completed payments, dates
# in UTC. Tax is included in prices: France's standard VAT (20 %) is amount * 0.20 / 1.20.
FRANCE_VAT = Decimal("0.20")
PAYMENTS_SQL = """
    SELECT t.ID, t.CustomerID, t.TransactionLocationID AS location_id,
           (t.DateTime AT TIME ZONE 'UTC')::date AS day, s.Name = 'completed' AS completed,
           t.Amount * r.eur_per_unit AS amount_eur, i.Name AS industry, ms.Name AS merchant_size,
           pm.Name AS payment_method, l.Country AS country
    FROM Transaction t
    JOIN TransactionStatus s ON s.ID = t.TransactionStatusID
    JOIN Currency c ON c.ID = t.CurrencyID
    JOIN unnest(%(codes)s::text[], %(rates)s::numeric[]) AS r (code, eur_per_unit)
        ON r.code = c.Code
    JOIN Merchant m ON m.ID = t.MerchantID
    JOIN Industry i ON i.ID = m.IndustryID
    JOIN MerchantSize ms ON ms.ID = m.MerchantSizeID
    JOIN PaymentMethod pm ON pm.ID = t.PaymentMethodID
    LEFT JOIN Location l ON l.ID = t.TransactionLocationID
"""
ANSWERS_SQL = {
    # Every month with a French retail payment; TaxAmount is rounded to the cent per payment.
    "revenue-tax-fr": """
        SELECT extract(year FROM day)::int, to_char(day, 'MM'),
               sum(CASE WHEN completed THEN round(amount_eur * %(vat)s / (1 + %(vat)s), 2)
                        ELSE 0 END)
        FROM payments WHERE industry = 'Retail' AND country = 'France'
        GROUP BY 1, 2 ORDER BY 1, 2""",
    # Every day with a credit-card payment at a small merchant, and how many were labelled fraud.
    "fraud-daily-small-credit": """
        SELECT day, count(*) FILTER (WHERE ID = ANY(%(fraud)s))
        FROM payments WHERE payment_method = 'Credit Card' AND merchant_size = 'Small'
        GROUP BY 1 ORDER BY 1""",
    # Premium: the top 10 % of customers by completed spend over the 365 days ending at the last
    # completed payment; their French spend per year, pre-aggregated (to the cent) per day,
    # customer and place.
    "premium-spend-fr": """
        WITH paid AS (SELECT * FROM payments WHERE completed),
        trailing_spend AS (
            SELECT CustomerID, sum(amount_eur) AS spend FROM paid
            WHERE day > (SELECT max(day) FROM paid) - 365 GROUP BY 1),
        premium AS (
            SELECT CustomerID FROM (
                SELECT CustomerID, percent_rank() OVER (ORDER BY spend DESC) AS share
                FROM trailing_spend) AS ranked
            WHERE share < 0.10),
        daily AS (
            SELECT day, CustomerID, location_id, round(sum(amount_eur), 2) AS spent FROM paid
            WHERE country = 'France' AND CustomerID IN (SELECT CustomerID FROM premium)
            GROUP BY 1, 2, 3)
        SELECT extract(year FROM day)::int, sum(spent) FROM daily GROUP BY 1 ORDER BY 1""",
}


def answers_from_the_sources(s: Settings) -> dict[str, list[tuple]]:
    with (transform.DBT_PROJECT_DIR / "seeds" / "currency_rates.csv").open() as fh:
        rates = {r["currency_code"]: Decimal(r["eur_per_unit"]) for r in csv.DictReader(fh)}
    fraud = [
        d["transaction_id"]
        for d in connect_docs(s)["Transaction"].find({}, {"transaction_id": 1, "isFraud": 1})
        if int(d.get("isFraud") or 0) == 1
    ]
    params = {
        "codes": list(rates),
        "rates": list(rates.values()),
        "vat": FRANCE_VAT,
        "fraud": fraud,
    }
    with db.connect(s) as conn:
        conn.execute(f"CREATE TEMP TABLE payments AS {PAYMENTS_SQL}", params)
        return {name: conn.execute(q, params).fetchall() for name, q in ANSWERS_SQL.items()}


def assert_answers_match_the_sources(s: Settings) -> None:
    expected = answers_from_the_sources(s)
    assert sum(n for _, n in expected["fraud-daily-small-credit"]) > 0  # the check has teeth
    for name in QUERIES:
        assert expected[name], name
        assert analyses.run_analysis(s, name).rows == expected[name], name


@pytest.fixture
def pipeline(settings, database, docdb, tmp_path):
    yield from seeded_source(settings, database, docdb, tmp_path, scale=0.004, seed=11, docs=2000)


def seeded_source(settings, database, docdb, tmp_path, *, scale, seed, docs):
    """A seeded source (OLTP + documents, the test's own databases on the session's servers) and
    an empty DuckDB warehouse; the replication slots the syncs made are dropped after."""
    s = settings.model_copy(
        update={
            "pg_database": database,
            "mongodb_database": docdb.name,
            "warehouse_path": tmp_path / "warehouse.duckdb",
        }
    )
    seed_load.seed(s, build(make_spec(scale=scale, seed=seed, end=END, max_documents=docs)), docdb)
    yield s
    with db.connect(s, autocommit=True) as conn:
        catalog = load_catalog()
        for c in catalog.connections:
            connection = catalog.resolve(c.name)
            if connection.source.kind == "postgres":
                cdc.drop_slot(conn, connection.slot(conn.info.dbname))


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
    assert_answers_match_the_sources(s)
    # Versions a later change supersedes, kept to be delivered again (below).
    with duckdb.connect(str(s.warehouse_file)) as wh:
        wh.execute("CREATE SCHEMA test_stale")
        for table, key in (("postgres_transaction", completed), ("postgres_customer", customer)):
            wh.execute(f"CREATE TABLE test_stale.{table} AS FROM raw.{table} WHERE id = {key}")

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
    # An older version of a key delivered again (a retried load, an append stream): staging must
    # keep the latest version, by the source's log position.
    with duckdb.connect(str(s.warehouse_file)) as wh:
        for table in ("postgres_transaction", "postgres_customer"):
            wh.execute(f"INSERT INTO raw.{table} FROM test_stale.{table}")
        assert wh.execute(
            f"SELECT count(*) FROM raw.postgres_transaction WHERE id = {completed}"
        ).fetchone() == (2,)
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
    assert duckdb_rows(
        s, f"SELECT CountryCode FROM analytics.dim_customer WHERE CustomerKey = {customer}"
    ) == [("JP",)]
    assert_answers_match_the_sources(s)

    # A lost replication slot makes the next sync take a new snapshot: every payment arrives
    # again, every day changes, and the aggregate facts' pre-hooks empty them before refilling.
    with db.connect(s, autocommit=True) as conn:
        cdc.drop_slot(conn, load_catalog().resolve("postgres-to-snowflake").slot(conn.info.dbname))
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


@contextlib.contextmanager
def postgres_warehouse(settings, s):
    """``s`` pointed at a PostgreSQL warehouse database of its own, dropped afterwards."""
    warehouse_db = f"{s.pg_database}_warehouse"
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(warehouse_db)))
    try:
        yield s.model_copy(
            update={
                "warehouse": "postgres",
                "warehouse_dsn": SecretStr(
                    db.conninfo(settings, database=warehouse_db, with_key=False)
                ),
            }
        )
    finally:
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(warehouse_db)
                )
            )


def test_postgres_warehouse_gives_the_same_answers_as_duckdb(built_warehouse):
    # One seeded source synced and built on both warehouses (tests/built_warehouse.py).
    for name in QUERIES:
        expected = analyses.run_analysis(built_warehouse.duckdb, name).rows
        assert expected
        assert analyses.run_analysis(built_warehouse.postgres, name).rows == expected, name


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
    env = transform.dbt_env(s)
    assert env[transform.PG_PASSWORD_VAR] == "s3cret"
    # Beside the secret, only the access policy's masking roles (access_warehouse.MASKING_ENV).
    assert set(env) == {transform.PG_PASSWORD_VAR, "STRIPE_PLATFORM_DBT_MASKING"}

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
            assert column["config"]["meta"]["classification"] in {
                "pci",
                "pii",
                "pii_quasi",
                "credential",
                "non_personal",
            }, where
