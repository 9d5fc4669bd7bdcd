"""Collection specs in ``mongo/collections``: validator, indexes and views per collection, and
:func:`apply_specs`, which makes a document database match them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo.errors import OperationFailure

from stripe_platform.config import Settings
from stripe_platform.docstore import ferretdb
from stripe_platform.docstore.client import server_kind
from stripe_platform.errors import PlatformError
from stripe_platform.paths import MONGO_DIR


class SpecError(PlatformError, ValueError):
    pass


@dataclass(frozen=True)
class IndexSpec:
    keys: dict[str, int]
    unique: bool = False

    @property
    def name(self) -> str:
        # MongoDB's own default naming, so specs and server agree on what already exists.
        return "_".join(f"{k}_{v}" for k, v in self.keys.items())


@dataclass(frozen=True)
class CollectionSpec:
    collection: str
    description: str
    validator: dict[str, Any]
    indexes: list[IndexSpec]
    views: list[str] = field(default_factory=list)
    # Dotted field path -> class, or {"class": ..., "category": ..., "subject": true}: the spec's
    # part of the classification catalog (governance/classification.py checks and reads it). Not
    # part of the validator: never sent to the server.
    classification: dict[str, Any] = field(default_factory=dict)


def load_specs(directory: Path = MONGO_DIR / "collections") -> list[CollectionSpec]:
    specs = []
    for path in sorted(directory.glob("*.json")):
        try:
            raw = json.loads(path.read_text())
            spec = CollectionSpec(
                collection=raw["collection"],
                description=raw["description"],
                validator=raw["validator"],
                indexes=[
                    IndexSpec(keys=i["keys"], unique=i.get("unique", False)) for i in raw["indexes"]
                ],
                views=raw.get("views", []),
                classification=raw.get("classification", {}),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise SpecError(f"{path}: not a valid collection spec ({exc!r})") from None
        if not isinstance(spec.classification, dict):
            raise SpecError(f"{path}: classification must be an object (field path -> class)")
        if path.stem != spec.collection:
            raise SpecError(f"{path}: file name must match its collection {spec.collection!r}")
        specs.append(spec)
    return specs


def view_sources(specs: list[CollectionSpec] | None = None) -> dict[str, str]:
    return {view: s.collection for s in (specs or load_specs()) for view in s.views}


@dataclass
class ApplyReport:
    collection: str
    created: bool = False
    indexes_created: list[str] = field(default_factory=list)
    validator: str = "applied"
    views: list[str] = field(default_factory=list)
    # FerretDB only: GIN indexes on the collection's backend table that keyed finds and updates use
    # (docstore/ferretdb.py), as "field: index name"; the ones this run created, and a warning when
    # the backend is out of reach.
    backend_indexes: list[str] = field(default_factory=list)
    backend_indexes_created: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


FERRETDB_VALIDATOR = (
    "enforced by the application on the platform's writes (FerretDB v1 has no validators: "
    "docstore/validation.py)"
)


def apply_specs(
    db: Any, settings: Settings, specs: list[CollectionSpec] | None = None
) -> list[ApplyReport]:
    """Create collections, validators, indexes and views; safe to run again. ``settings`` says
    where the embedded FerretDB's backend is (its keyed-access indexes live there)."""
    specs = specs or load_specs()
    on_ferretdb = server_kind(db) == "ferretdb"
    # Only the embedded FerretDB's PostgreSQL is the platform's to index.
    backend_reachable = on_ferretdb and settings.mongodb_uri is None
    existing = set(db.list_collection_names())
    reports = []
    for spec in specs:
        report = ApplyReport(spec.collection)
        if spec.collection not in existing:
            if on_ferretdb:
                db.create_collection(spec.collection)
            else:
                db.create_collection(
                    spec.collection,
                    validator=spec.validator,
                    validationLevel="strict",
                    validationAction="error",
                )
            report.created = True
        elif not on_ferretdb:
            db.command(
                "collMod",
                spec.collection,
                validator=spec.validator,
                validationLevel="strict",
                validationAction="error",
            )
        if on_ferretdb:
            report.validator = FERRETDB_VALIDATOR
        have = set(db[spec.collection].index_information())
        for index in spec.indexes:
            if index.name not in have:
                db[spec.collection].create_index(
                    list(index.keys.items()), name=index.name, unique=index.unique
                )
                report.indexes_created.append(index.name)
        if backend_reachable:
            fields = ferretdb.keyed_fields(i.keys for i in spec.indexes)
            for found in ferretdb.ensure_keyed_indexes(settings, db.name, spec.collection, fields):
                report.backend_indexes.append(f"{found.field}: {found.name}")
                if found.created:
                    report.backend_indexes_created.append(found.name)
        elif on_ferretdb:
            report.warnings.append(
                "the FerretDB at MONGODB_URI keeps its PostgreSQL out of the platform's reach: "
                "finds and updates by _id or key scan the collection (docstore/ferretdb.py)"
            )
        for view in spec.views:
            if on_ferretdb:
                report.views.append(
                    f"{view} (FerretDB v1 has no views: the query runner reads {spec.collection})"
                )
            elif view not in existing:
                try:
                    db.create_collection(view, viewOn=spec.collection, pipeline=[])
                except OperationFailure as exc:
                    raise SpecError(
                        f"cannot create view {view} on {spec.collection}: {exc}"
                    ) from exc
                report.views.append(view)
        reports.append(report)
    return reports
