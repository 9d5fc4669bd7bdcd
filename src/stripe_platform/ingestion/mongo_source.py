"""Reading document collections for the embedded engine: a full read, then incremental reads by
cursor field, or by change stream where the server has them (a replica set; never the stand-in).

Columns come from the collection's $jsonSchema in mongo/collections: top-level properties, typed
(objectId -> string, int/long -> integer, double/decimal -> number, date -> timestamp_tz,
object/array -> json). Fields a document has beyond its schema are kept in ``_extra`` (json), so
nothing is dropped; a value of the wrong type is nulled by the raw layer and recorded in
``_airbyte_meta``. A cursor-based read cannot see deletions (nor can Airbyte's); change streams can.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from bson import ObjectId, json_util

from stripe_platform.docstore.client import is_standin
from stripe_platform.docstore.specs import load_specs
from stripe_platform.warehouse.raw import Column

BSON_TYPES = {
    "objectId": "string",
    "int": "integer",
    "long": "integer",
    "double": "number",
    "decimal": "number",
    "string": "string",
    "bool": "boolean",
    "date": "timestamp_tz",
    "object": "json",
    "array": "json",
}


def _column_type(schema: dict[str, Any]) -> str:
    kinds = schema.get("bsonType", "object" if "properties" in schema else "string")
    kinds = [kinds] if isinstance(kinds, str) else [k for k in kinds if k != "null"]
    mapped = {BSON_TYPES.get(k, "json") for k in kinds}
    if mapped <= {"integer", "number"}:
        return "number" if "number" in mapped else "integer"
    if len(mapped) == 1:
        return mapped.pop()
    if "enum" in schema:
        return "string"
    return "json"


def collection_columns(collection: str) -> tuple[Column, ...]:
    spec = next((s for s in load_specs() if s.collection == collection), None)
    if spec is None:
        raise KeyError(f"no spec for collection {collection!r} in mongo/collections")
    properties = spec.validator["$jsonSchema"].get("properties", {})
    columns = [Column("_id", "string")]
    for name, schema in properties.items():
        kind = "string" if "enum" in schema and "bsonType" not in schema else _column_type(schema)
        columns.append(Column(name, kind))
    columns.append(Column("_extra", "json"))
    return tuple(columns)


def _plain(value: Any) -> Any:
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, (dict, list)):
        return json.loads(json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS))
    return value


def to_table(docs: list[dict[str, Any]], columns: tuple[Column, ...]) -> pa.Table:
    """Documents to a pyarrow table of the stream's columns; unknown fields go to ``_extra``."""
    names = [c.name for c in columns if c.name != "_extra"]
    known = set(names)
    data: dict[str, list[Any]] = {n: [] for n in names}
    extra: list[str | None] = []
    for doc in docs:
        for n in names:
            data[n].append(_plain(doc.get(n)))
        rest = {k: _plain(v) for k, v in doc.items() if k not in known}
        extra.append(json.dumps(rest, default=str) if rest else None)
    arrays = {}
    kinds = {c.name: c.type for c in columns}
    for n, values in data.items():
        if kinds[n] == "json":
            arrays[n] = pa.array(
                [None if v is None else json.dumps(v, default=str) for v in values], pa.string()
            )
        else:
            try:
                arrays[n] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                # Mixed types in one field (a malformed document): carry them as text and let the
                # raw layer cast each to the column type, nulling and recording what does not fit.
                arrays[n] = pa.array(
                    [
                        None
                        if v is None
                        else json.dumps(v)
                        if isinstance(v, (dict, list))
                        else str(v)
                        for v in values
                    ],
                    pa.string(),
                )
    arrays["_extra"] = pa.array(extra, pa.string())
    return pa.table(arrays)


def cursor_number(value: Any) -> int | None:
    """A cursor value as an integer for ``_ab_cdc_cursor`` (epoch microseconds for dates)."""
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return int(aware.timestamp() * 1_000_000)
    if isinstance(value, int):
        return value
    return None


@dataclass
class DocumentBatch:
    table: pa.Table
    state: dict[str, Any]


def read_by_cursor(
    db: Any,
    collection: str,
    cursor_field: str,
    columns: tuple[Column, ...],
    state: dict[str, Any] | None,
    batch_size: int,
) -> Iterator[DocumentBatch]:
    """Documents whose cursor is at or after the saved one, in cursor order, in batches.

    At-or-after (not strictly after) so documents sharing the last cursor value are never
    skipped; the deduplicated destination makes the re-read ones harmless.
    """
    query: dict[str, Any] = {}
    if state and state.get("cursor") is not None:
        query = {cursor_field: {"$gte": json_util.loads(state["cursor"])}}
    found = db[collection].find(query).sort([(cursor_field, 1), ("_id", 1)])
    batch: list[dict[str, Any]] = []
    last = None
    for doc in found:
        batch.append(doc)
        last = doc.get(cursor_field, last)
        if len(batch) >= batch_size:
            yield _batch(batch, columns, cursor_field, last)
            batch = []
    if batch:
        yield _batch(batch, columns, cursor_field, last)


def _batch(
    docs: list[dict[str, Any]], columns: tuple[Column, ...], cursor_field: str, last: Any
) -> DocumentBatch:
    table = to_table(docs, columns)
    cursors = [cursor_number(d.get(cursor_field)) for d in docs]
    table = table.append_column("_ab_cdc_cursor", pa.array(cursors, pa.int64()))
    updated = [
        d.get(cursor_field) if isinstance(d.get(cursor_field), dt.datetime) else None for d in docs
    ]
    table = table.append_column(
        "_ab_cdc_updated_at", pa.array([_plain(u) for u in updated], pa.timestamp("us", tz="UTC"))
    )
    return DocumentBatch(table, {"mode": "cursor", "cursor": json_util.dumps(last)})


def supports_change_streams(db: Any) -> bool:
    if is_standin(db):
        return False
    hello = db.client.admin.command("hello")
    return bool(hello.get("setName") or hello.get("msg") == "isdbgrid")


def read_change_stream(
    db: Any,
    collection: str,
    columns: tuple[Column, ...],
    state: dict[str, Any] | None,
    batch_size: int,
    max_wait_ms: int = 1000,
) -> Iterator[DocumentBatch]:
    """Changes since the saved resume token (inserts, updates, replaces, deletes as tombstones)."""
    resume = json_util.loads(state["resume_token"]) if state and state.get("resume_token") else None
    with db[collection].watch(
        full_document="updateLookup", resume_after=resume, max_await_time_ms=max_wait_ms
    ) as stream:
        docs: list[dict[str, Any]] = []
        meta: list[tuple[int, dt.datetime | None, dt.datetime | None]] = []
        while True:
            change = stream.try_next()
            if change is None:
                break
            when = change.get("wallTime") or dt.datetime.now(dt.UTC)
            cursor = change["clusterTime"].time * 1_000_000 + change["clusterTime"].inc
            if change["operationType"] == "delete":
                docs.append({"_id": change["documentKey"]["_id"]})
                meta.append((cursor, when, when))
            elif change.get("fullDocument") is not None:
                docs.append(change["fullDocument"])
                meta.append((cursor, when, None))
            if len(docs) >= batch_size:
                break
        if not docs:
            return
        table = to_table(docs, columns)
        table = table.append_column("_ab_cdc_cursor", pa.array([m[0] for m in meta], pa.int64()))
        table = table.append_column(
            "_ab_cdc_updated_at", pa.array([m[1] for m in meta], pa.timestamp("us", tz="UTC"))
        )
        table = table.append_column(
            "_ab_cdc_deleted_at", pa.array([m[2] for m in meta], pa.timestamp("us", tz="UTC"))
        )
        yield DocumentBatch(
            table, {"mode": "change_stream", "resume_token": json_util.dumps(stream.resume_token)}
        )
