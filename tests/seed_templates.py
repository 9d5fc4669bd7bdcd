"""Seeded sources copied from a template seeded once per session (a plugin of tests/conftest.py:
a test fixture asks for ``seed_templates`` by name, never imports it).

Seeding a test's own databases costs seconds (3,000 payments: ~2.5 s; 10,000: ~4 s), and a module
seeds the same dataset for every test. ``seed_templates.seed(s, data, docdb)`` gives the same
stores as ``seed_load.seed(s, data, docdb)``: the first call for a dataset (its spec's run key)
and settings seeds a template (an OLTP database and a document database of their own); every call
then makes the test's OLTP database a clone of it (CREATE DATABASE ... TEMPLATE, a file copy) and
copies its documents into the test's document database, raw BSON, after the collections' specs.
The clone holds the template's key store (its wrapped data keys, under the session home's KEKs),
so the copied ciphertexts read back as they would after a seed. Nothing is left behind: the
templates are dropped at the end of the session. The seed's own behaviour is test_seed's; tests
that seed in their own way call ``seed_load.seed``."""

from __future__ import annotations

import copy
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from psycopg import sql

from conftest import TEMPLATE_DB
from stripe_platform.config import Settings
from stripe_platform.docstore import client as docstore
from stripe_platform.docstore.specs import apply_specs
from stripe_platform.oltp import db
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import Dataset

# Settings a test changes that the seed does not read: they do not need a template of their own.
PER_TEST = {"pg_database", "mongodb_database", "mlflow_tracking_uri", "warehouse", "warehouse_path"}
RAW = CodecOptions(document_class=RawBSONDocument)


@dataclass
class Template:
    database: str
    documents: Any  # pymongo Database
    report: seed_load.SeedReport


class SeedTemplates:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.templates: dict[str, Template] = {}
        self.names = (f"seedtpl_{os.getpid()}_{n}" for n in itertools.count())

    def seed(self, s: Settings, data: Dataset, docdb: Any) -> seed_load.SeedReport:
        """What ``seed_load.seed(s, data, docdb)`` leaves in ``s.pg_database`` and ``docdb``, for
        a database nobody is connected to (else it seeds as usual)."""
        if self._in_use(s.pg_database) or list(docdb.list_collection_names()):
            return seed_load.seed(s, data, docdb)
        key = json.dumps(
            [data.spec.run_key, s.model_dump(mode="json", exclude=PER_TEST)],
            sort_keys=True,
            default=str,
        )
        template = self.templates.get(key)
        if template is None:
            template = self.templates[key] = self._make(s, data)
        self._clone(s.pg_database, template.database)
        apply_specs(docdb, s)
        source = template.documents.with_options(codec_options=RAW)
        for info in source.list_collections():
            if info.get("type", "collection") != "collection":
                continue  # views: apply_specs made them
            documents = list(source[info["name"]].find())
            if documents:
                docdb[info["name"]].insert_many(documents)
        return copy.deepcopy(template.report)

    def _in_use(self, database: str) -> bool:
        with db.connect(self.settings, database="postgres", autocommit=True) as conn:
            return (
                conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
                ).fetchone()[0]
                > 0
            )

    def _make(self, s: Settings, data: Dataset) -> Template:
        name = next(self.names)
        with db.connect(self.settings, database="postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                    sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
                )
            )
        documents = docstore.connect(s.model_copy(update={"mongodb_database": name}))
        template = Template(name, documents, seed_load.SeedReport(run_key=data.spec.run_key))
        try:
            seeded = s.model_copy(update={"pg_database": name, "mongodb_database": name})
            template.report = seed_load.seed(seeded, data, documents)
        except BaseException:
            documents.client.drop_database(name)
            documents.client.close()
            raise
        finally:
            # A template nobody can connect to: a clone needs it idle.
            with db.connect(self.settings, database="postgres", autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                        sql.Identifier(name)
                    )
                )
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
        return template

    def _clone(self, database: str, template: str) -> None:
        with db.connect(self.settings, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(database)))
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                    sql.Identifier(database), sql.Identifier(template)
                )
            )

    def close(self) -> None:
        for template in self.templates.values():
            template.documents.client.drop_database(template.documents.name)
            template.documents.client.close()
            with db.connect(self.settings, database="postgres", autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(template.database)
                    )
                )
        self.templates.clear()


@pytest.fixture(scope="session")
def seed_templates(settings: Settings) -> Iterator[SeedTemplates]:
    templates = SeedTemplates(settings)
    yield templates
    templates.close()
