"""Reading document collections for the embedded engine: a full read, then incremental reads by
cursor field, or by change stream where the server has them (a replica set; never the stand-in).

Columns come from the collection's $jsonSchema in mongo/collections: top-level properties, typed
(objectId -> string, int/long -> integer, double/decimal -> number, date -> timestamp_tz,
object/array -> json). Fields a document has beyond its schema are kept in ``_extra`` (json), so
nothing is dropped; a value of the wrong type is nulled by the raw layer and recorded in
``_airbyte_meta``. A cursor-based read cannot see deletions (nor can Airbyte's); change streams can.

Cursor reads (:class:`CursorReader`) never skip a document for its cursor value: documents whose
cursor is missing, null or of another BSON type are read by every sync and delivered when they
change; a cursor later than the sync's start never moves the saved cursor past that start.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import bson
import pyarrow as pa
from bson import Decimal128, ObjectId, json_util

from stripe_platform.docstore.client import server_kind
from stripe_platform.docstore.specs import load_specs
from stripe_platform.rawlayer import SOURCE_CHANGES, Column

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
    "binData": "binary",
}


def _column_type(schema: dict[str, Any]) -> str:
    kinds = schema.get("bsonType", "object" if "properties" in schema else "string")
    kinds = [kinds] if isinstance(kinds, str) else [k for k in kinds if k != "null"]
    mapped = {BSON_TYPES.get(k, "json") for k in kinds}
    if mapped <= {"integer", "number"}:
        return "number" if "number" in mapped else "integer"
    if mapped == {"string", "binary"}:  # text that field-level encryption turns into ciphertext
        return "binary"
    if len(mapped) == 1:
        return mapped.pop()
    if "enum" in schema:
        return "string"
    return "json"


def _properties(collection: str) -> dict[str, Any]:
    spec = next((s for s in load_specs() if s.collection == collection), None)
    if spec is None:
        raise KeyError(f"no spec for collection {collection!r} in mongo/collections")
    return spec.validator["$jsonSchema"].get("properties", {})


def collection_columns(collection: str) -> tuple[Column, ...]:
    properties = _properties(collection)
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


def _finite(value: Any) -> Any:
    """A plain value as JSON can hold it: a non-finite double (NaN, ±Infinity; JSON has no token
    for them, and PostgreSQL's jsonb refuses Python's) in relaxed Extended JSON,
    ``{"$numberDouble": "NaN"}``, as :func:`_plain` already writes those inside objects."""
    if isinstance(value, float) and not math.isfinite(value):
        return json.loads(json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS))
    return value


def _bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):  # bson.Binary too
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return _json(value).encode()  # another type where bytes belong: its JSON, like _extra's


def _json(value: Any) -> str:
    return json.dumps(_finite(value), default=str, allow_nan=False)


def to_table(
    docs: list[dict[str, Any]],
    columns: tuple[Column, ...],
    set_aside: list[dict[str, Any]] | None = None,
) -> pa.Table:
    """Documents to a pyarrow table of the stream's columns; unknown fields go to ``_extra``, and
    so do the fields ``set_aside`` holds for each document (values its column cannot take)."""
    names = [c.name for c in columns if c.name != "_extra"]
    known = set(names)
    data: dict[str, list[Any]] = {n: [] for n in names}
    extra: list[str | None] = []
    for i, doc in enumerate(docs):
        aside = set_aside[i] if set_aside else {}
        for n in names:
            data[n].append(None if n in aside else _plain(doc.get(n)))
        rest = {k: _finite(_plain(v)) for k, v in doc.items() if k not in known or k in aside}
        extra.append(_json(rest) if rest else None)
    arrays = {}
    kinds = {c.name: c.type for c in columns}
    for n, values in data.items():
        if kinds[n] == "json":
            arrays[n] = pa.array([None if v is None else _json(v) for v in values], pa.string())
        elif kinds[n] == "binary":  # bytes as they are, text as UTF-8
            arrays[n] = pa.array([_bytes(v) for v in values], pa.binary())
        else:
            try:
                arrays[n] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                # Mixed types in one field (a malformed document): carry them as text and let the
                # raw layer cast each to the column type, nulling and recording what does not fit.
                arrays[n] = pa.array(
                    [
                        None if v is None else _json(v) if isinstance(v, (dict, list)) else str(v)
                        for v in values
                    ],
                    pa.string(),
                )
    arrays["_extra"] = pa.array(extra, pa.string())
    return pa.table(arrays)


# The saved cursor never passes the sync's start less this margin. Cursor values come from the
# writers' clocks and the start from this machine's: a document stamped up to this much behind our
# clock (a writer's clock running late, or a write committed a while after it was stamped) still
# sorts at or after the saved cursor, so the next sync reads it. Documents inside the margin are
# remembered by content hash (``seen``), so reading them again does not deliver them again.
CURSOR_MARGIN = dt.timedelta(minutes=1)
# Cursor values a collection's spec may declare, as $type aliases, and how Python sees them.
_CURSOR_TYPES = {
    "date": lambda v: isinstance(v, dt.datetime),
    "number": lambda v: isinstance(v, int | float | Decimal128) and not isinstance(v, bool),
    "objectId": lambda v: isinstance(v, ObjectId),
    "string": lambda v: isinstance(v, str),
}
_NUMBERS = {"int", "long", "double", "decimal"}
_SET_ASIDE = {"change": "NULLED", "reason": "SOURCE_SERIALIZATION_ERROR"}  # value kept in _extra
_NO_VALUE = {"change": "NULLED", "reason": "SOURCE_RETRIEVAL_ERROR"}
_IN_CHUNK = 1000  # ids per $in query


def cursor_type(collection: str, field: str) -> str:
    """The BSON type (a ``$type`` alias) the collection's cursor field orders documents by."""
    if field == "_id":
        return "objectId"
    schema = _properties(collection).get(field)
    if schema is None:
        raise ValueError(f"{collection}: cursor field {field!r} is not in its spec")
    kinds = schema.get("bsonType", "string")
    kinds = {kinds} if isinstance(kinds, str) else set(kinds) - {"null"}
    if kinds <= _NUMBERS:
        return "number"
    if len(kinds) == 1 and (kind := kinds.pop()) in _CURSOR_TYPES:
        return kind
    raise ValueError(f"{collection}: cursor field {field!r} has no single orderable type")


def _bson_name(value: Any) -> str:
    """The BSON type name of a value, as ``$type`` spells it (for reports)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(2**31) <= value < 2**31 else "long"
    names = {
        str: "string",
        float: "double",
        dict: "object",
        list: "array",
        ObjectId: "objectId",
        dt.datetime: "date",
        Decimal128: "decimal",
        Decimal: "decimal",
        bytes: "binData",
    }
    return next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.blake2b(bson.encode(doc), digest_size=8).hexdigest()


@dataclass
class DocumentBatch:
    table: pa.Table
    state: dict[str, Any]


class CursorReader:
    """Documents changed since the saved cursor state, in batches, each with the state that
    covers it (saved with the batch, so a crash re-delivers, never skips).

    Three reads per sync:
    1. documents whose cursor cannot order them (missing, null, another BSON type, an array):
       all of them, every sync;
    2. documents whose cursor is of the declared type, at or after the saved cursor, in cursor
       order (at-or-after, so documents sharing the last value are never skipped);
    3. documents remembered from the last sync that neither read found (their cursor moved
       back, or they were deleted): fetched by ``_id``.
    The state remembers, by ``_id``, the content hash of every document the next sync will read
    again (those of read 1, and those at or after the new saved cursor): such a document is
    delivered again only when it changed. The saved cursor is the last one read, but never later
    than the sync's start less :data:`CURSOR_MARGIN` (a document dated in the future would
    otherwise hide every later one for ever).

    A document with an unusable cursor is delivered with ``{field, change: NULLED, reason}`` in
    ``_airbyte_meta.changes``: SOURCE_RETRIEVAL_ERROR when the cursor is missing or null,
    SOURCE_SERIALIZATION_ERROR when it has another type (its value is then kept in ``_extra``).
    ``_ab_cdc_cursor`` is the extraction order (increasing across syncs, as in Airbyte's MongoDB
    source), so the latest read version of a document wins whatever its cursor field says.
    ``issues`` counts the documents delivered with a cursor problem (missing, null, a type name,
    ``future``); ``warnings`` says what happened in words.
    """

    def __init__(
        self,
        db: Any,
        collection: str,
        cursor_field: str,
        columns: tuple[Column, ...],
        state: dict[str, Any] | None,
        batch_size: int,
        *,
        started: dt.datetime,
        kind: str | None = None,
    ) -> None:
        self.db, self.collection, self.field = db, collection, cursor_field
        self.columns, self.batch_size = columns, batch_size
        self.kind = kind or cursor_type(collection, cursor_field)
        self.started = started
        # Only dates are compared with the clock.
        self.ceiling = started - CURSOR_MARGIN if self.kind == "date" else None
        self.issues: collections.Counter[str] = collections.Counter()
        self.warnings: list[str] = []
        self._latest_future: Any = None
        state = state if state and state.get("mode") == "cursor" else {}
        saved = json_util.loads(state["cursor"]) if state.get("cursor") is not None else None
        if saved is not None and not _CURSOR_TYPES[self.kind](saved):
            saved = None  # left by an earlier version from a document of the wrong type
        if saved is not None and self.ceiling is not None and _aware(saved) > self.ceiling:
            # Left by an earlier version from a document dated in the future: documents written
            # since were skipped, and which ones cannot be known: read the collection again.
            self.warnings.append(
                f"{collection}: the saved cursor {_aware(saved).isoformat()} was after the "
                "sync's start; every document is read again"
            )
            saved = None
        self.saved = saved
        self.seen: dict[str, str] = dict(state.get("seen") or {})  # _id -> digest delivered
        self._remembered = set(self.seen)  # those not found again are fetched by _id (read 3)
        self._cursors: dict[str, Any] = {}  # _id -> cursor (None: unusable) of what was read
        now_us = int(started.timestamp() * 1_000_000)
        self._sequence = max(now_us, int(state.get("sequence") or 0))
        self._last: Any = saved
        self._pending: list[tuple[dict[str, Any], str | None]] = []
        self._done = False  # all three reads ended: what was not found is forgotten

    # -- reading ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[DocumentBatch]:
        field, kind = self.field, self.kind
        unusable = {"$or": [{field: {"$not": {"$type": kind}}}, {field: {"$type": "array"}}]}
        for doc in self.db[self.collection].find(unusable).sort("_id", 1):
            yield from self._take(doc)
        ordered: dict[str, Any] = {"$type": kind}
        if self.saved is not None:
            ordered["$gte"] = self.saved
        found = self.db[self.collection].find({field: ordered}).sort([(field, 1), ("_id", 1)])
        for doc in found:
            if self._problem(doc) is not None:
                continue  # an array holding a date: read 1 had it
            self._last = doc[field]
            yield from self._take(doc)
        gone = [json_util.loads(k) for k in self._remembered]
        for i in range(0, len(gone), _IN_CHUNK):
            for doc in self.db[self.collection].find({"_id": {"$in": gone[i : i + _IN_CHUNK]}}):
                yield from self._take(doc)
        self._done = True
        if self._pending:
            yield self._flush()
        self._summarise()

    def _problem(self, doc: dict[str, Any]) -> str | None:
        if self.field not in doc:
            return "missing"
        value = doc[self.field]
        if value is None:
            return "null"
        return None if _CURSOR_TYPES[self.kind](value) else _bson_name(value)

    def _take(self, doc: dict[str, Any]) -> Iterator[DocumentBatch]:
        key = json_util.dumps(doc["_id"])
        self._remembered.discard(key)
        problem = self._problem(doc)
        self._cursors[key] = None if problem else doc[self.field]
        digest = _digest(doc)
        if self.seen.get(key) == digest:
            return  # delivered already, unchanged
        self.seen[key] = digest
        if problem:
            self.issues[problem] += 1
        elif self.kind == "date" and _aware(doc[self.field]) > self.started + CURSOR_MARGIN:
            self.issues["future"] += 1
            latest = _aware(doc[self.field])
            self._latest_future = max(self._latest_future or latest, latest)
        self._pending.append((doc, problem))
        if len(self._pending) >= self.batch_size:
            yield self._flush()

    # -- state --------------------------------------------------------------------------------------
    def _cursor(self) -> Any:
        """The cursor to save now: the last read, held back to the sync's start less the margin."""
        if self._last is None or self.ceiling is None:
            return self._last
        return min(_aware(self._last), self.ceiling)

    def _state(self) -> dict[str, Any]:
        cursor = self._cursor()
        # Forget what the next sync will not read again (before the cursor); keep what it will,
        # and, until this sync ends, what it has not found yet (it may still be delivered).
        for key, value in list(self._cursors.items()):
            if value is not None and cursor is not None and _order(value) < _order(cursor):
                del self._cursors[key]
                self.seen.pop(key, None)
        if self._done:
            self.seen = {k: v for k, v in self.seen.items() if k in self._cursors}
        return {
            "mode": "cursor",
            "cursor": json_util.dumps(cursor),
            "seen": dict(self.seen),
            "sequence": self._sequence,
        }

    def _flush(self) -> DocumentBatch:
        docs = [d for d, _ in self._pending]
        problems = [p for _, p in self._pending]
        self._pending = []
        # A value of another type leaves its column for _extra; never the key, though (an _id
        # cursor of another type is only recorded).
        aside = [
            {self.field: d[self.field]}
            if p not in (None, "missing", "null") and self.field != "_id"
            else {}
            for d, p in zip(docs, problems, strict=True)
        ]
        table = to_table(docs, self.columns, aside)
        n = len(docs)
        table = table.append_column(
            "_ab_cdc_cursor", pa.array(range(self._sequence, self._sequence + n), pa.int64())
        )
        self._sequence += n
        updated = [
            None if p else _plain(d[self.field]) for d, p in zip(docs, problems, strict=True)
        ]
        if self.kind != "date":
            updated = [None] * n
        table = table.append_column(
            "_ab_cdc_updated_at", pa.array(updated, pa.timestamp("us", tz="UTC"))
        )
        changes = [
            None
            if p is None
            else json.dumps(
                [{"field": self.field, **(_NO_VALUE if p in ("missing", "null") else _SET_ASIDE)}]
            )
            for p in problems
        ]
        table = table.append_column(SOURCE_CHANGES, pa.array(changes, pa.string()))
        return DocumentBatch(table, self._state())

    def _summarise(self) -> None:
        unusable = {k: n for k, n in sorted(self.issues.items()) if k != "future"}
        if unusable:
            detail = ", ".join(f"{k} {n}" for k, n in unusable.items())
            self.warnings.append(
                f"{self.collection}: {sum(unusable.values())} document(s) without a usable "
                f"{self.field} ({detail}): synced and recorded in _airbyte_meta.changes; every "
                "sync reads them again and delivers them when they change"
            )
        if self.issues["future"]:
            self.warnings.append(
                f"{self.collection}: {self.issues['future']} document(s) with {self.field} after "
                f"the sync's start (latest {_aware(self._latest_future).isoformat()}): synced; "
                f"the saved cursor stays at {_aware(self._cursor()).isoformat()}"
            )


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _order(value: Any) -> Any:
    """A cursor value comparable with others of its kind (dates may come back naive, and
    Decimal128 compares with nothing)."""
    if isinstance(value, dt.datetime):
        return _aware(value)
    return value.to_decimal() if isinstance(value, Decimal128) else value


def read_by_cursor(
    db: Any,
    collection: str,
    cursor_field: str,
    columns: tuple[Column, ...],
    state: dict[str, Any] | None,
    batch_size: int,
    *,
    started: dt.datetime | None = None,
) -> CursorReader:
    """A :class:`CursorReader` for a sync that starts now (or at ``started``)."""
    return CursorReader(
        db,
        collection,
        cursor_field,
        columns,
        state,
        batch_size,
        started=started or dt.datetime.now(dt.UTC),
    )


def supports_change_streams(db: Any) -> bool:
    if server_kind(db) == "ferretdb":  # FerretDB v1 has no change streams
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
