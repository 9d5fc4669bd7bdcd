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


def missing_indexes(
    database: Any, specs: list[Any] | None = None, settings: Settings | None = None
) -> dict[str, list[str]]:
    """Per collection, the spec indexes the document store does not have and, on the embedded
    FerretDB (``settings`` given, no MONGODB_URI), the GIN indexes on its backend tables that keyed
    finds and updates need (docstore/ferretdb.py), as ``"field (backend GIN index name)"``."""
    from stripe_platform.docstore import ferretdb
    from stripe_platform.docstore.client import server_kind
    from stripe_platform.docstore.specs import load_specs

    specs = specs or load_specs()
    missing: dict[str, list[str]] = {}
    existing = set(database.list_collection_names())
    for spec in specs:
        have = (
            set(database[spec.collection].index_information())
            if spec.collection in existing
            else set()
        )
        absent = [index.name for index in spec.indexes if index.name not in have]
        if absent:
            missing[spec.collection] = absent
    # The same condition as apply_specs: only the embedded FerretDB's PostgreSQL is the platform's.
    if settings is None or settings.mongodb_uri is not None or server_kind(database) != "ferretdb":
        return missing
    with ferretdb.backend_connection(settings) as conn:
        for spec in specs:
            fields = ferretdb.keyed_fields(i.keys for i in spec.indexes)
            if spec.collection not in existing:  # no backend table yet: every one is missing
                absent = [f"{field} (backend GIN index)" for field in fields]
            else:
                table = ferretdb.backend_table(conn, database.name, spec.collection)
                names = {field: ferretdb.gin_index_name(table, field) for field in fields}
                present = {
                    row[0]
                    for row in conn.execute(
                        "SELECT indexname FROM pg_indexes WHERE schemaname = %s "
                        "AND indexname = ANY(%s)",
                        (database.name, list(names.values())),
                    )
                }
                absent = [
                    f"{field} (backend GIN index {name})"
                    for field, name in names.items()
                    if name not in present
                ]
            if absent:
                missing.setdefault(spec.collection, []).extend(absent)
    return missing


def check_document_indexes(settings: Settings, *, repair: bool = True) -> dict[str, Any]:
    """Compare the document store with mongo/collections (and, on the embedded FerretDB, its
    backend tables' keyed-access indexes); create what is missing when ``repair`` (the specs are
    idempotent); raise if indexes are still missing."""
    from stripe_platform.docstore.client import connect
    from stripe_platform.docstore.specs import apply_specs, load_specs

    database = connect(settings)
    specs = load_specs()
    found = missing_indexes(database, specs, settings)
    created: dict[str, list[str]] = {}
    if found and repair:
        created = {
            r.collection: r.indexes_created + r.backend_indexes_created
            for r in apply_specs(database, settings, specs)
            if r.indexes_created or r.backend_indexes_created
        }
        found = missing_indexes(database, specs, settings)
    if found:
        raise IndexCheckError(f"document indexes missing: {found}")
    return {
        "collections": len(specs),
        "indexes": sum(len(s.indexes) for s in specs),
        "created": created,
    }
