"""Collection specs in ``mongo/collections``: validator, indexes and views per collection."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo.errors import OperationFailure

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
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise SpecError(f"{path}: not a valid collection spec ({exc!r})") from None
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


def apply_specs(db: Any, specs: list[CollectionSpec] | None = None) -> list[ApplyReport]:
    """Create collections, validators, indexes and views; safe to run again."""
    specs = specs or load_specs()
    standin = server_kind(db) == "ferretdb"
    existing = set(db.list_collection_names())
    reports = []
    for spec in specs:
        report = ApplyReport(spec.collection)
        if spec.collection not in existing:
            if standin:
                db.create_collection(spec.collection)
            else:
                db.create_collection(
                    spec.collection,
                    validator=spec.validator,
                    validationLevel="strict",
                    validationAction="error",
                )
            report.created = True
        elif not standin:
            db.command(
                "collMod",
                spec.collection,
                validator=spec.validator,
                validationLevel="strict",
                validationAction="error",
            )
        if standin:
            report.validator = "not enforced by the stand-in (set MONGODB_URI for a real server)"
        have = set(db[spec.collection].index_information())
        for index in spec.indexes:
            if index.name not in have:
                db[spec.collection].create_index(
                    list(index.keys.items()), name=index.name, unique=index.unique
                )
                report.indexes_created.append(index.name)
        for view in spec.views:
            if standin:
                report.views.append(f"{view} (resolved to {spec.collection} by the query runner)")
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
