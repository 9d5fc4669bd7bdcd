"""Warehouse masking (issue 20): restricted mart columns hidden from every role below admin.

PostgreSQL: logged in as members of the brief's roles on a real PostgreSQL warehouse built by
`stripe-platform transform`. DuckDB: the marts_masked views of a real build. Snowflake: fakesnow
parses neither masking policies nor ALTER TABLE ... MODIFY COLUMN, so the statements are checked as
rendered for a Snowflake target (and the Snowflake build itself runs in test_dbt_snowflake.py);
that proves what is attached to which column, not that Snowflake enforces it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import psycopg
import pytest
import yaml
from psycopg import errors, sql
from pydantic import SecretStr

from built_warehouse import transform_cli
from stripe_platform.config import Settings
from stripe_platform.governance.classification import RESTRICTED
from stripe_platform.oltp import db
from stripe_platform.security.coverage import coverage_report
from stripe_platform.transform import dbt as transform

pytestmark = pytest.mark.timeout(900)

MASKED = "***MASKED***"
# The restricted mart columns, as models/marts/*.yml classify them today.
RESTRICTED_COLUMNS = {"dim_customer": ["username"], "fact_session": ["country", "city"]}


def test_the_masking_set_is_the_catalogs_restricted_set():
    project = yaml.safe_load((transform.DBT_PROJECT_DIR / "dbt_project.yml").read_text())
    assert set(project["vars"]["restricted_classes"]) == {c.value for c in RESTRICTED}
    marts = project["models"]["stripe_platform"]["marts"]
    assert marts["+post-hook"] == "{{ apply_masking() }}"
    assert project["on-run-start"] == ["{{ prepare_masking() }}"]


@contextlib.contextmanager
def login_as(settings: Settings, database: str, role: str):
    """A fresh login role, member of the brief's group role ``role``, connected to ``database``."""
    user = f"{role}_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    with db.connect(settings, database="postgres", autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(user), sql.Literal(password), sql.Identifier(role)
            )
        )
    try:
        with psycopg.connect(
            db.conninfo(settings, database=database, user=user, password=password),
            autocommit=True,
        ) as conn:
            yield conn
    finally:
        with db.connect(settings, database="postgres", autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))


def rows(conn, query: str) -> list[tuple]:
    return sorted(conn.execute(query).fetchall(), key=repr)


def test_below_admin_roles_read_masked_marts_and_admin_reads_them_clear(built_warehouse, settings):
    # The session's seeded source, synced and built on both warehouses (tests/built_warehouse.py).
    s, on_postgres = built_warehouse.duckdb, built_warehouse.postgres
    warehouse_db = built_warehouse.warehouse_db
    with db.connect(settings, database=warehouse_db) as owner:
        base = {
            t: rows(owner, f"SELECT CustomerKey, {', '.join(cols)} FROM analytics.{t}")
            for t, cols in RESTRICTED_COLUMNS.items()
        }
        segments = rows(owner, "SELECT CustomerKey, CustomerSegment FROM analytics.dim_customer")
    assert all(base.values()), base
    assert all(v not in (None, MASKED) for r in base["dim_customer"] for v in r[1:])

    for role in ("developer", "readonlyuser"):
        with login_as(settings, warehouse_db, role) as reader:
            for table, cols in RESTRICTED_COLUMNS.items():
                masked = rows(
                    reader, f"SELECT CustomerKey, {', '.join(cols)} FROM marts_masked.{table}"
                )
                assert len(masked) == len(base[table])
                assert {v for r in masked for v in r[1:]} == {MASKED}, (role, table)
            # Unrestricted columns come through unchanged.
            assert (
                rows(reader, "SELECT CustomerKey, CustomerSegment FROM marts_masked.dim_customer")
                == segments
            )
            # Every mart has its masked view.
            assert reader.execute("SELECT count(*) FROM marts_masked.fact_revenue").fetchone()[0]
            # The base marts and the layers under them are out of reach.
            for relation in (
                "analytics.dim_customer",
                "analytics.fact_session",
                "staging.stg_postgres__customers",
                "raw.postgres_customer",
            ):
                with pytest.raises(errors.InsufficientPrivilege):
                    reader.execute(f"SELECT 1 FROM {relation} LIMIT 1")

    with login_as(settings, warehouse_db, "admin") as admin:
        for table, cols in RESTRICTED_COLUMNS.items():
            clear = rows(admin, f"SELECT CustomerKey, {', '.join(cols)} FROM analytics.{table}")
            assert clear == base[table]
        # marts_masked is the same for admin: the masked names are for tools that must never
        # see restricted values.
        assert {r[0] for r in admin.execute("SELECT UserName FROM marts_masked.dim_customer")} == {
            MASKED
        }

    # A rebuild (tables replaced) keeps the masking: the post-hook runs again.
    transform_cli(on_postgres)
    with login_as(settings, warehouse_db, "readonlyuser") as reader:
        assert {r[0] for r in reader.execute("SELECT City FROM marts_masked.fact_session")} == {
            MASKED
        }
        with pytest.raises(errors.InsufficientPrivilege):
            reader.execute("SELECT 1 FROM analytics.fact_session LIMIT 1")

    # DuckDB: the same masked views; no roles (the file's mode is the only access control).
    with duckdb.connect(str(s.warehouse_file), read_only=True) as conn:
        for table, cols in RESTRICTED_COLUMNS.items():
            base_rows = rows(conn, f"SELECT CustomerKey, {', '.join(cols)} FROM analytics.{table}")
            masked = rows(conn, f"SELECT CustomerKey, {', '.join(cols)} FROM marts_masked.{table}")
            assert base_rows and len(masked) == len(base_rows)
            assert {v for r in masked for v in r[1:]} == {MASKED}, table
            assert MASKED not in {v for r in base_rows for v in r[1:]}
        assert rows(
            conn, "SELECT CustomerKey, CustomerSegment FROM marts_masked.dim_customer"
        ) == rows(conn, "SELECT CustomerKey, CustomerSegment FROM analytics.dim_customer")
        marts = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'analytics'"
            ).fetchall()
        }
        views = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'marts_masked' AND table_type = 'VIEW'"
            ).fetchall()
        }
        assert len(marts) >= 11 and views == marts
    store = coverage_report(s, stores=["marts"]).store("marts")
    assert [f.status for f in store.fields] == ["masked"] * 3 and store.percent == 100.0
    assert "DuckDB: no roles" in store.fields[0].detail


def run_operation(project_dir: Path, profiles_dir: Path, env: dict[str, str]) -> tuple[bool, str]:
    """`dbt run-operation print_masking_statements` in a subprocess; (success, output)."""
    code = (
        "import sys; from dbt.cli.main import dbtRunner; "
        "r = dbtRunner().invoke(sys.argv[1:]); sys.exit(0 if r.success else 1)"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "run-operation",
            "print_masking_statements",
            "--project-dir",
            str(project_dir),
            "--profiles-dir",
            str(profiles_dir),
            "--target-path",
            str(profiles_dir / "target"),
            "--log-path",
            str(profiles_dir / "logs"),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode == 0, result.stdout + result.stderr


def masking_plan(output: str) -> dict[str, list[str]]:
    line = next(line for line in output.splitlines() if "MASKING_PLAN " in line)
    return json.loads(line.split("MASKING_PLAN ", 1)[1])


def snowflake_settings(settings: Settings, server: dict, home: Path) -> Settings:
    return settings.model_copy(
        update={
            "home": home,
            "warehouse": "snowflake",
            "snowflake_account": server["account"],
            "snowflake_user": server["user"],
            "snowflake_password": SecretStr(server["password"]),
            "snowflake_database": "STRIPE",
            "snowflake_host": server["host"],
            "snowflake_port": server["port"],
            "snowflake_protocol": "http",
        }
    )


def test_snowflake_policies_as_rendered(settings, snowflake_server, tmp_path):
    sf = snowflake_settings(settings, snowflake_server, tmp_path)
    ok, output = run_operation(
        transform.DBT_PROJECT_DIR, transform.write_profiles(sf), transform.dbt_env(sf)
    )
    assert ok, output[-3000:]
    plan = masking_plan(output)
    admin_or = "CASE WHEN IS_ROLE_IN_SESSION('ADMIN') THEN val ELSE"
    assert plan.pop("setup")[:2] == [
        "CREATE MASKING POLICY IF NOT EXISTS STRIPE.ANALYTICS.MASK_VARCHAR AS (val VARCHAR) "
        f"RETURNS VARCHAR -> {admin_or} '***MASKED***' END",
        f"ALTER MASKING POLICY STRIPE.ANALYTICS.MASK_VARCHAR SET BODY -> {admin_or} "
        "'***MASKED***' END",
    ]
    assert plan.pop("DIM_Customer") == [
        "ALTER TABLE STRIPE.ANALYTICS.DIM_Customer MODIFY COLUMN USERNAME "
        "SET MASKING POLICY STRIPE.ANALYTICS.MASK_VARCHAR FORCE"
    ]
    assert plan.pop("FACT_Session") == [
        "ALTER TABLE STRIPE.ANALYTICS.FACT_Session MODIFY COLUMN COUNTRY "
        "SET MASKING POLICY STRIPE.ANALYTICS.MASK_VARCHAR FORCE",
        "ALTER TABLE STRIPE.ANALYTICS.FACT_Session MODIFY COLUMN CITY "
        "SET MASKING POLICY STRIPE.ANALYTICS.MASK_VARCHAR FORCE",
    ]
    # Every other mart has no restricted column: nothing attached.
    assert len(plan) >= 9 and all(statements == [] for statements in plan.values()), plan


def test_an_unknown_classification_fails_the_masking_closed(settings, tmp_path):
    project = tmp_path / "dbt_project"
    shutil.copytree(
        transform.DBT_PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs")
    )
    spec = project / "models" / "marts" / "DIM_Customer.yml"
    text = spec.read_text()
    assert text.count("classification: pii\n") == 1
    spec.write_text(text.replace("classification: pii\n", "classification: secretish\n"))
    duck = settings.model_copy(update={"home": tmp_path, "warehouse_path": tmp_path / "w.duckdb"})
    ok, output = run_operation(project, transform.write_profiles(duck), {})
    assert not ok
    assert 'DIM_Customer.UserName has classification "secretish"' in output
