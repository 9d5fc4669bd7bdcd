"""The brief's document-store example queries, kept as files in ``mongo/queries``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bson import json_util

from stripe_platform.docstore.client import server_kind
from stripe_platform.docstore.specs import view_sources
from stripe_platform.errors import PlatformError
from stripe_platform.paths import MONGO_DIR


class QueryError(PlatformError, ValueError):
    pass


@dataclass(frozen=True)
class DocumentQuery:
    name: str
    description: str
    collection: str
    find: dict[str, Any] | None = None
    aggregate: list[dict[str, Any]] | None = None

    @property
    def shell(self) -> str:
        """The query as one would type it in mongosh."""
        if self.find is not None:
            return f"db.{self.collection}.find({json_util.dumps(self.find)})"
        return f"db.{self.collection}.aggregate({json_util.dumps(self.aggregate)})"


def load_queries(directory: Path = MONGO_DIR / "queries") -> dict[str, DocumentQuery]:
    queries = {}
    for path in sorted(directory.glob("*.json")):
        raw = json_util.loads(path.read_text())
        if ("find" in raw) == ("aggregate" in raw):
            raise QueryError(f"{path}: a query has exactly one of `find` or `aggregate`")
        query = DocumentQuery(**raw)
        queries[query.name] = query
    return queries


def run_query(db: Any, query: DocumentQuery, limit: int | None = None) -> list[dict[str, Any]]:
    name = query.collection
    if server_kind(db) == "ferretdb":
        # The stand-in has no views: read the view's source collection directly.
        name = view_sources().get(name, name)
    collection = db[name]
    if query.find is not None:
        cursor = collection.find(query.find)
        return list(cursor.limit(limit) if limit else cursor)
    pipeline = list(query.aggregate or [])
    if limit:
        pipeline.append({"$limit": limit})
    return list(collection.aggregate(pipeline))
