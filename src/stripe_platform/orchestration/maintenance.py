"""The jobs of the ``oltp_maintenance`` DAG, callable without Airflow."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from stripe_platform.config import Settings


class IndexCheckError(RuntimeError):
    """Indexes the specs declare are missing and could not be created."""


def maintain_partitions(settings: Settings, today: dt.date | None = None) -> dict[str, Any]:
    """Monthly Transaction partitions ahead and retention (oltp.partitions.maintain)."""
    from stripe_platform.oltp import db, partitions

    with db.connect(settings, autocommit=True) as conn:
        report = partitions.maintain(
            conn,
            today=today or dt.date.today(),
            months_ahead=settings.partition_months_ahead,
            retention_months=settings.partition_retention_months,
        )
    return asdict(report)


def missing_indexes(database: Any, specs: list[Any] | None = None) -> dict[str, list[str]]:
    """Per collection, the spec indexes the document store does not have."""
    from stripe_platform.docstore.specs import load_specs

    missing: dict[str, list[str]] = {}
    existing = set(database.list_collection_names())
    for spec in specs or load_specs():
        have = (
            set(database[spec.collection].index_information())
            if spec.collection in existing
            else set()
        )
        absent = [index.name for index in spec.indexes if index.name not in have]
        if absent:
            missing[spec.collection] = absent
    return missing


def check_document_indexes(settings: Settings, *, repair: bool = True) -> dict[str, Any]:
    """Compare the document store with mongo/collections; create what is missing when ``repair``
    (the specs are idempotent); raise if indexes are still missing."""
    from stripe_platform.docstore.client import connect
    from stripe_platform.docstore.specs import apply_specs, load_specs

    database = connect(settings)
    specs = load_specs()
    found = missing_indexes(database, specs)
    created: dict[str, list[str]] = {}
    if found and repair:
        created = {
            r.collection: r.indexes_created
            for r in apply_specs(database, settings, specs)
            if r.indexes_created
        }
        found = missing_indexes(database, specs)
    if found:
        raise IndexCheckError(f"document indexes missing: {found}")
    return {
        "collections": len(specs),
        "indexes": sum(len(s.indexes) for s in specs),
        "created": created,
    }
