"""Shared fixtures: one real PostgreSQL cluster per test session (started by the platform's own
runtime code) with its document server (FerretDB, in the same cluster), a migrated template database
cloned per test, and a document database per test: on that server, or on the MongoDB that
MONGODB_URI names."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from stripe_platform.config import Settings, load_settings
from stripe_platform.docstore import client as docstore
from stripe_platform.oltp import db, partitions
from stripe_platform.oltp.migrate import migrate
from stripe_platform.runtime import embedded
from stripe_platform.showcase import brief_examples

TEMPLATE_DB = "stripe_template"
# Session-wide fixtures started only when a test asks for them by name: the Kafka stack
# (`kafka_stack`), moto's KMS (`kms_endpoint`), the warehouses built once (`built_warehouse`),
# seeded sources cloned from a template seeded once (`seed_templates`).
pytest_plugins = ["kafka_stack", "kms_server", "built_warehouse", "seed_templates"]
_db_counter = itertools.count()


def make_home() -> Path:
    # The cluster runs as an unprivileged OS user under root: its home must be reachable.
    home = Path(tempfile.mkdtemp(prefix="stripe-platform-test-"))
    home.chmod(0o755)
    return home


@pytest.fixture
def fresh_home() -> Iterator[Path]:
    """An empty platform home for tests that start their own cluster."""
    home = make_home()
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    home = make_home()
    s = load_settings(home=home, pg_fsync=False, profile="embedded")
    try:  # a failed set-up stops the servers too: a leaked one holds a port and memory
        embedded.up(s)
        with db.connect(s, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
        with db.connect(s, database=TEMPLATE_DB, autocommit=True) as conn:
            migrate(conn)
        yield s
    finally:
        embedded.down(s)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def database(settings: Settings) -> Iterator[str]:
    """A fresh, fully migrated database for one test (a clone of the template)."""
    name = f"test_{os.getpid()}_{next(_db_counter)}"
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    yield name
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def conn(settings: Settings, database: str) -> Iterator[psycopg.Connection]:
    with db.connect(settings, database=database, autocommit=True) as connection:
        yield connection


@pytest.fixture
def loaded(conn: psycopg.Connection) -> psycopg.Connection:
    """A migrated database with this month's partitions and the brief's example records."""
    partitions.maintain(conn, today=dt.date.today(), months_ahead=1, retention_months=36)
    brief_examples.load_oltp(conn)
    return conn


@pytest.fixture
def docdb(settings: Settings):
    """A document database of its own on the session's document server (FerretDB), or on the
    MongoDB server that MONGODB_URI names."""
    s = settings.model_copy(update={"mongodb_database": f"test_{os.getpid()}_{next(_db_counter)}"})
    database = docstore.connect(s)
    yield database
    database.client.drop_database(database.name)
    database.client.close()


@pytest.fixture
def real_mongodb(docdb):
    if docstore.server_kind(docdb) == "ferretdb":
        pytest.skip(
            "needs what FerretDB v1 lacks ($jsonSchema validators, views, change streams or "
            "transactions): set MONGODB_URI to a real MongoDB"
        )
    return docdb


@pytest.fixture(scope="session")
def snowflake_server() -> Iterator[dict]:
    """fakesnow's HTTP server (Snowflake's wire API on DuckDB) on a free loopback port, once per
    session: a second server in the same process fails (fakesnow keeps process-wide state).
    Yields snowflake.connector.connect() keyword arguments; tests use databases of their own."""
    import fakesnow

    with fakesnow.server(host="127.0.0.1") as kwargs:
        yield kwargs
