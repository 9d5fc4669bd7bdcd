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


# A single condition on one field of an array element means the same in dotted form only when it
# asks that SOME element's field satisfy it: equality to a non-null value or one of these.
_POSITIVE_OPERATORS = {"$eq", "$gt", "$gte", "$lt", "$lte", "$in", "$regex"}


def _dotted_condition(value: Any) -> bool:
    if value is None:
        return False  # `a.f: null` also matches documents without `a`
    if isinstance(value, dict) and any(k.startswith("$") for k in value):
        operators = set(value) - {"$options"} if "$regex" in value else set(value)
        if value.get("$eq", 0) is None or None in value.get("$in", ()):
            return False
        return len(operators) == 1 and operators <= _POSITIVE_OPERATORS
    return True


def without_elem_match(query_name: str, filter_: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"$elemMatch": {"f": c}}}`` as ``{"a.f": c}``, for FerretDB v1, whose
    ``$elemMatch`` with field conditions on an array of documents matches nothing
    (docs/research/ferretdb.md; pinned by tests/test_docstore.py). The two are equivalent only for
    one positive condition on one field, on a field that holds an array (the specs' validators say
    so for the brief's `lines`); anything else raises QueryError rather than answer differently."""

    def refuse(why: str) -> QueryError:
        return QueryError(
            f"query {query_name!r}: {why}; FerretDB v1's $elemMatch on an array of documents "
            "matches nothing and only a single positive field condition can be rewritten "
            "(set MONGODB_URI to a MongoDB server to run it as written)"
        )

    out: dict[str, Any] = {}
    for key, value in filter_.items():
        if key in ("$and", "$or", "$nor"):
            out[key] = [without_elem_match(query_name, f) for f in value]
            continue
        if not (isinstance(value, dict) and "$elemMatch" in value):
            out[key] = value
            continue
        if len(value) != 1:
            raise refuse(
                f"{key}: $elemMatch beside other operators {sorted(set(value) - {'$elemMatch'})}"
            )
        conditions = value["$elemMatch"]
        fields = [k for k in conditions if not k.startswith("$")]
        if not fields:
            out[key] = value  # $elemMatch on an array of values (operators only) works
            continue
        if len(conditions) != 1 or not _dotted_condition(conditions[fields[0]]):
            raise refuse(
                f"{key}: $elemMatch {json_util.dumps(conditions)} is not one positive field condition"
            )
        dotted = f"{key}.{fields[0]}"
        if dotted in filter_ or dotted in out:
            raise refuse(f"{key}: {dotted} is already in the filter")
        out[dotted] = conditions[fields[0]]
    return out


def run_query(db: Any, query: DocumentQuery, limit: int | None = None) -> list[dict[str, Any]]:
    """Run a query as written on MongoDB; on FerretDB v1 (no views, a broken $elemMatch) read a
    view's source collection and rewrite $elemMatch (:func:`without_elem_match`)."""
    name = query.collection
    find = query.find
    pipeline = list(query.aggregate or [])
    if server_kind(db) == "ferretdb":
        # The specs' views have an empty pipeline: their documents are their source's.
        name = view_sources().get(name, name)
        if find is not None:
            find = without_elem_match(query.name, find)
        pipeline = [
            {"$match": without_elem_match(query.name, s["$match"])} if "$match" in s else s
            for s in pipeline
        ]
    collection = db[name]
    if find is not None:
        cursor = collection.find(find)
        return list(cursor.limit(limit) if limit else cursor)
    if limit:
        pipeline.append({"$limit": limit})
    return list(collection.aggregate(pipeline))
