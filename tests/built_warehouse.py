"""A seeded source synced and built by `stripe-platform transform` into a DuckDB warehouse and a
PostgreSQL warehouse, once per test session (a plugin of tests/conftest.py: a test asks for the
``built_warehouse`` fixture by name, never imports it; an imported fixture is a separate one per
module, which built it twice).

Two builds of the whole dbt project cost about a minute on two cores; test_transform (the two
warehouses give the same answers) and test_masking (the masked marts on both) read the same
builds. A test may rebuild (the masking survives a rebuild: same source, same result) but must not
change the source or the marts' contents."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from psycopg import sql
from pydantic import SecretStr

from conftest import TEMPLATE_DB
from stripe_platform.config import Settings
from stripe_platform.docstore import client as docstore
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import open_writer, run_sync
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.oltp import db
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec

END = dt.date(2026, 11, 1)
CONNECTIONS = ("postgres-to-snowflake", "mongodb-to-snowflake")


@dataclass(frozen=True)
class BuiltWarehouse:
    duckdb: Settings
    """The source (``pg_database``, ``mongodb_database``) with the DuckDB warehouse
    (``warehouse_path``), built."""
    postgres: Settings
    """The same source with the PostgreSQL warehouse (``warehouse_dsn``), built."""
    warehouse_db: str
    """The PostgreSQL warehouse's database on the session's cluster."""


def cli_env(s: Settings) -> dict[str, str]:
    """The environment of `stripe-platform` run as a user runs it, for ``s``."""
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


def transform_cli(s: Settings, *args: str) -> dict:
    """`stripe-platform transform --json` in a subprocess; its summary (a failure fails here)."""
    result = subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", "transform", "--json", *args],
        env=cli_env(s),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    summary = json.loads(result.stdout)
    assert summary["success"], summary
    return summary


def sync_all(s: Settings) -> None:
    catalog = load_catalog()
    for name in CONNECTIONS:
        connection = catalog.resolve(name)
        run_sync(s, connection, open_writer(s, connection))


@contextlib.contextmanager
def _database(settings: Settings, name: str, template: str | None) -> Iterator[str]:
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        create += sql.SQL(" TEMPLATE {} STRATEGY FILE_COPY").format(sql.Identifier(template))
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(create)
    try:
        yield name
    finally:
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def built_warehouse(settings: Settings, tmp_path_factory) -> Iterator[BuiltWarehouse]:
    name = f"built_{os.getpid()}"
    with (
        _database(settings, name, TEMPLATE_DB) as source_db,
        _database(settings, f"{name}_warehouse", None) as warehouse_db,
    ):
        documents = docstore.connect(settings.model_copy(update={"mongodb_database": name}))
        s = settings.model_copy(
            update={
                "pg_database": source_db,
                "mongodb_database": name,
                "warehouse_path": tmp_path_factory.mktemp("built") / "warehouse.duckdb",
            }
        )
        on_postgres = s.model_copy(
            update={
                "warehouse": "postgres",
                "warehouse_dsn": SecretStr(
                    db.conninfo(settings, database=warehouse_db, with_key=False)
                ),
            }
        )
        try:
            data = build(make_spec(scale=0.004, seed=11, end=END, max_documents=2000))
            seed_load.seed(s, data, documents)
            for target in (s, on_postgres):
                sync_all(target)
                summary = transform_cli(target)
                assert summary["counts"].get("error", 0) == 0, summary
            yield BuiltWarehouse(s, on_postgres, warehouse_db)
        finally:
            with db.connect(s, autocommit=True) as conn:
                catalog = load_catalog()
                for c in catalog.connections:
                    connection = catalog.resolve(c.name)
                    if connection.source.kind == "postgres":
                        cdc.drop_slot(conn, connection.slot(conn.info.dbname))
            documents.client.drop_database(name)
            documents.client.close()
