"""A small seeded platform for the data-subject request tests (tests/test_privacy_requests.py,
tests/test_privacy_erasure.py): a PostgreSQL database cloned from the session's migrated template
and a document database on the session's FerretDB, seeded by the platform's own seed (its
documents encrypted as the seed writes them), and what a test needs to pick subjects.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from conftest import TEMPLATE_DB
from stripe_platform.config import Settings
from stripe_platform.docstore import client as docstore
from stripe_platform.oltp import db
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import Dataset, build
from stripe_platform.seed.spec import make_spec

SPEC = {"scale": 0.005, "seed": 23, "end": "2026-11-01", "max_documents": 600}


@dataclass
class Seeded:
    settings: Settings  # naming the seeded databases
    docs: Any  # the pymongo Database
    data: Dataset  # what the seed generated: a test's expected values come from here

    def customer(self, customer_id: int) -> dict[str, Any]:
        """The generated customer row (username, email, fullname, phone, ...)."""
        t = self.data.entities.customers
        row = t.slice(customer_id - 1, 1).to_pylist()[0]
        assert row["id"] == customer_id
        return row

    def transactions_of(self, customer_id: int) -> int:
        ids = self.data.transactions.column("customerid").to_pylist()
        return sum(1 for c in ids if c == customer_id)

    def active_customers(self) -> list[int]:
        """Customers by number of payments, most first (a subject with traces everywhere)."""
        counts: dict[int, int] = {}
        for c in self.data.transactions.column("customerid").to_pylist():
            counts[c] = counts.get(c, 0) + 1
        return sorted(counts, key=lambda c: (-counts[c], c))


@contextlib.contextmanager
def seeded_platform(settings: Settings, name: str, **spec: Any) -> Iterator[Seeded]:
    """Databases of their own named ``name`` (PostgreSQL and documents), seeded; dropped after."""
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    s = settings.model_copy(update={"pg_database": name, "mongodb_database": name})
    docs = docstore.connect(s)
    try:
        data = build(make_spec(**{**SPEC, **spec}))
        seed_load.seed(s, data, docs)
        yield Seeded(s, docs, data)
    finally:
        docs.client.drop_database(name)
        docs.client.close()
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
