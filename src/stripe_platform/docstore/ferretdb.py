"""What the platform does about FerretDB v1 (the embedded document server) that a MongoDB server
needs no help with; the one place that knows its PostgreSQL backend.

Keyed access. FerretDB v1 pushes a top-level equality filter (a find, and the query part of an
update or a delete: ``msg_update.go`` and ``msg_delete.go`` run the same ``Query`` with the same
filter as ``find``) down to PostgreSQL as ``_jsonb -> $1 @> $2``, the field name a bind parameter.
Its own indexes are btree indexes on ``(_jsonb -> 'field')``, which ``@>`` cannot use, so a find
or update by ``_id`` or ``transaction_id`` reads the whole table. A GIN ``jsonb_path_ops`` index on
the same expression serves ``@>``; the planner sees the field only in a custom plan, which the
runtime forces on the backend database (``plan_cache_mode = force_custom_plan``,
``runtime/ferretdb.py``). :func:`ensure_keyed_indexes` creates those indexes on the collection's
backend table, found through FerretDB's own metadata table.

Bulk updates. An ``update`` command holds one PostgreSQL connection per statement until the whole
command ends (a ``defer`` in a loop in ``msg_update.go``); with FerretDB's pool of 50, a command of
~49 statements or more waits for a connection that never comes and hangs the server for good.
:func:`bulk_write` sends at most :data:`MAX_UPDATES_PER_COMMAND` per command. ``insert`` and
``delete`` commands release their connection per batch or statement: a 120,000-document
``insert_many`` was measured fine.

Set-based field updates. Through the protocol, FerretDB v1 updates one document per statement:
it reads the document, applies the operators in Go and writes it back with one ``UPDATE ... WHERE
_jsonb -> '_id' = $1`` in a transaction of its own, holding a pooled connection each (measured
384-463 updates/s for 1-4 writers, close to the same per-row UPDATEs sent straight to PostgreSQL).
Scoring 1M Transaction documents that way takes most of an hour. :func:`set_fields` writes the
same change as one ``UPDATE ... FROM unnest(keys, values)`` per chunk of keys, straight into the
collection's backend table, in FerretDB's own stored form (``sjson``, FerretDB's
``internal/handler/sjson``): the document's fields beside a ``$s`` key holding each field's type
(``{"p": {field: {"t": type}}, "$k": [field order]}``), dates as milliseconds since the epoch,
an ObjectId as its hex string, int/long/double as JSON numbers told apart by ``$s``. A field that
exists keeps its place in ``$k``; new fields are appended in byte order of their names, as
FerretDB's ``$set`` does (it sorts an update's fields, then appends the missing ones). Only simple
values are taken (double, bool, int, long, string, date, null): anything else is refused before
anything is written. Each chunk is one transaction; its UPDATE locks the rows it changes like any
UPDATE, so a concurrent FerretDB writer waits for it or it waits for the writer. What it does not
fix: FerretDB's own updates are read-modify-write without a row lock, so one that read a document
before a chunk committed and writes it after overwrites the chunk's fields in that document (two
FerretDB updates of one document race the same way).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import queue
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any

from bson import Int64, ObjectId
from bson.datetime_ms import DatetimeMS, _datetime_to_millis
from psycopg import sql
from pymongo import DeleteMany, DeleteOne, InsertOne, ReplaceOne, UpdateMany, UpdateOne

from stripe_platform.config import Settings
from stripe_platform.docstore.client import server_kind
from stripe_platform.errors import PlatformError
from stripe_platform.runtime.ferretdb import BACKEND_DATABASE

MAX_UPDATES_PER_COMMAND = 40  # the hang starts at ~49 (the pool's 50 less what else is in use)
WriteRequest = InsertOne | ReplaceOne | UpdateOne | UpdateMany | DeleteOne | DeleteMany


class BackendError(PlatformError, RuntimeError):
    pass


# -- keyed access: GIN indexes on the backend tables -------------------------------------------------
def keyed_fields(index_keys: Iterable[dict[str, int]]) -> list[str]:
    """``_id`` and the first key of each index when it is a top-level field: the keys FerretDB
    pushes down as ``_jsonb -> 'field' @> value`` (a dotted key is pushed down as ``#>``, which
    these indexes do not serve)."""
    fields = ["_id"]
    for keys in index_keys:
        first = next(iter(keys))
        if "." not in first and first not in fields:
            fields.append(first)
    return fields


def gin_index_name(table: str, field: str) -> str:
    """Deterministic, unique per (table, field) and within PostgreSQL's 63 characters."""
    digest = hashlib.sha256(f"{table}\0{field}".encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9_]", "_", field.lower())
    return f"{f'{table}_{slug}'[:49]}_{digest}_gin"


def backend_connection(settings: Settings):
    """The embedded cluster's superuser on FerretDB's backend database (only the embedded
    FerretDB has a backend the platform can reach)."""
    from stripe_platform.oltp import db

    return db.connect(settings, database=BACKEND_DATABASE, autocommit=True, with_key=False)


def backend_table(conn: Any, database: str, collection: str) -> str:
    """The table of ``collection`` in the schema of MongoDB database ``database``."""
    metadata = sql.Identifier(database, "_ferretdb_database_metadata")
    row = conn.execute(
        sql.SQL(
            "SELECT _jsonb ->> 'table' FROM {} WHERE _jsonb -> '_id' = to_jsonb(%s::text)"
        ).format(metadata),
        (collection,),
    ).fetchone()
    if row is None:
        raise BackendError(
            f"FerretDB has no table for collection {collection!r} of database {database!r} "
            f"(looked up in {database}._ferretdb_database_metadata)"
        )
    return row[0]


@dataclass(frozen=True)
class KeyedIndex:
    field: str
    name: str
    created: bool


def ensure_keyed_indexes(
    settings: Settings, database: str, collection: str, fields: Sequence[str]
) -> list[KeyedIndex]:
    """A GIN ``jsonb_path_ops`` index on ``(_jsonb -> field)`` per field; idempotent."""
    found = []
    with backend_connection(settings) as conn:
        table = backend_table(conn, database, collection)
        for field in fields:
            name = gin_index_name(table, field)
            exists = conn.execute(
                "SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
                (database, name),
            ).fetchone()
            if not exists:
                # fastupdate off: the index is made on an empty table before a bulk load, and
                # with GIN's pending list every entry of that load would wait there, scanned by
                # each keyed lookup until a vacuum (measured: 200,000 pending, 77-100 lookups/s).
                conn.execute(
                    sql.SQL(
                        "CREATE INDEX IF NOT EXISTS {} ON {} USING gin ((_jsonb -> {}) "
                        "jsonb_path_ops) WITH (fastupdate = off)"
                    ).format(
                        sql.Identifier(name), sql.Identifier(database, table), sql.Literal(field)
                    )
                )
            found.append(KeyedIndex(field, name, created=not exists))
    return found


# -- bulk writes ---------------------------------------------------------------------------------------
@dataclass
class BulkCounts:
    inserted: int = 0
    matched: int = 0
    modified: int = 0
    deleted: int = 0
    upserted: int = 0
    commands: int = 0


def bulk_write(
    collection: Any, requests: Sequence[WriteRequest], *, ordered: bool = True
) -> BulkCounts:
    """``collection.bulk_write`` in slices of at most MAX_UPDATES_PER_COMMAND requests on FerretDB
    (one call elsewhere). A failing slice raises pymongo's BulkWriteError; the slices before it
    are written and the ones after it are not sent."""
    counts = BulkCounts()
    if not requests:
        return counts
    size = (
        MAX_UPDATES_PER_COMMAND if server_kind(collection.database) == "ferretdb" else len(requests)
    )
    for start in range(0, len(requests), size):
        result = collection.bulk_write(list(requests[start : start + size]), ordered=ordered)
        counts.inserted += result.inserted_count
        counts.matched += result.matched_count
        counts.modified += result.modified_count
        counts.deleted += result.deleted_count
        counts.upserted += result.upserted_count
        counts.commands += 1
    return counts


# -- set-based field updates ---------------------------------------------------------------------------
SET_FIELDS_CHUNK = 10_000  # keys per UPDATE statement (and transaction)
SET_FIELDS_WRITERS = 2  # connections writing chunks at once (measured ~1.5x one on 2 cores)
INT32 = (-(2**31), 2**31)
INT64 = (-(2**63), 2**63)
# The stored types a key may match: MongoDB's equality treats int, long and double alike.
KEY_TYPES = {"number": ("int", "long", "double"), "string": ("string",), "objectId": ("objectId",)}


class FieldUpdateRefused(PlatformError, ValueError):
    """An update set_fields does not take (its key, a field name, a value's type); nothing of the
    call was written."""


def stored_value(value: Any) -> tuple[str, str]:
    """(FerretDB's type name, the value's JSON text as FerretDB stores it) for a simple BSON value,
    as pymongo would encode it; FieldUpdateRefused for anything else. The text is made here, not
    by the json module: these few types need no more, and this runs once per value."""
    kind = type(value)
    if kind is float:  # the common cases first, by exact type
        if not math.isfinite(value):  # FerretDB refuses infinities and cannot store NaN
            raise FieldUpdateRefused(f"{value} is not a finite double")
        return "double", repr(value)  # the shortest text that reads back as the same double
    if kind is int:
        if INT32[0] <= value < INT32[1]:
            return "int", str(value)
        if INT64[0] <= value < INT64[1]:
            return "long", str(value)
        raise FieldUpdateRefused(f"{value} does not fit a 64-bit integer")
    if value is None:
        return "null", "null"
    if kind is bool:
        return "bool", "true" if value else "false"
    if isinstance(value, Int64):
        return "long", str(int(value))
    if isinstance(value, int | float):  # subclasses (an IntEnum, numpy's float64)
        return stored_value(int(value) if isinstance(value, int) else float(value))
    if isinstance(value, str):
        return "string", encode_basestring_ascii(_checked_text(value))
    if isinstance(value, DatetimeMS):
        return "date", str(int(value))
    if isinstance(value, dt.datetime):  # pymongo's own encoding: naive is UTC
        return "date", str(_datetime_to_millis(value))
    raise FieldUpdateRefused(
        f"a {type(value).__name__} is not a value set_fields writes (double, bool, int, long, "
        "string, date or null); write it with an update command (docstore.validation.bulk_write)"
    )


def _checked_text(text: str) -> str:
    # PostgreSQL's jsonb stores no NUL character, and a lone surrogate is not UTF-8.
    if "\0" in text:
        raise FieldUpdateRefused("a string with a NUL character cannot be stored")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise FieldUpdateRefused(f"{text!r} is not valid Unicode text") from None
    return text


def _stored_key(key: Any) -> tuple[str, str]:
    """(key kind, the key's JSON text) for a key: a number, a string or an ObjectId."""
    if isinstance(key, int | float) and not isinstance(key, bool):
        return "number", stored_value(key)[1]
    if isinstance(key, str):
        return "string", encode_basestring_ascii(_checked_text(key))
    if isinstance(key, ObjectId):
        return "objectId", f'"{key}"'  # FerretDB stores an ObjectId as its hex text
    raise FieldUpdateRefused(
        f"a key is a number, a string or an ObjectId, not a {type(key).__name__}"
    )


def check_field_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise FieldUpdateRefused(f"{what} {name!r}: a field name is a non-empty string")
    if name.startswith("$") or "." in name or "\0" in name:
        raise FieldUpdateRefused(
            f"{what} {name!r}: a top-level field name (no leading '$', no '.', no NUL)"
        )
    try:
        _checked_text(name)
    except FieldUpdateRefused as exc:
        raise FieldUpdateRefused(f"{what} {name!r}: {exc}") from None
    return name


@dataclass(frozen=True, slots=True)
class FieldUpdate:
    key: Any
    fields: Mapping[str, Any]  # as given (not copied)
    key_json: str
    values_json: str  # the fields as FerretDB stores them, one JSON object
    shape: tuple[str, tuple[tuple[str, str], ...]]  # (key kind, ((field, type), ...) by name)


@dataclass(frozen=True)
class FieldUpdates:
    """set_fields' input, checked: keys distinct, fields named and typed as FerretDB stores them."""

    key_field: str
    items: list[FieldUpdate]


def prepare_field_updates(
    key_field: str, updates: Iterable[tuple[Any, Mapping[str, Any]]]
) -> FieldUpdates:
    """Check every update before anything is written: the key field, each key (a number, a string
    or an ObjectId, given once: 5 and 5.0 are one key), each field name (top level, not the key
    field, not ``_id``) and each value's type (:func:`stored_value`). An error names the update
    (its position and key) and the field."""
    check_field_name(key_field, "key field")
    items: list[FieldUpdate] = []
    seen: set[Any] = set()
    names: dict[str, str] = {}  # checked field names -> their JSON text and colon
    shapes: dict[tuple, tuple] = {}  # the types in the order given -> sorted by name
    position, key, name = 0, None, None
    try:
        for position, update in enumerate(updates):  # noqa: B007 (named in the error below)
            key = name = None
            try:
                key, fields = update
            except (TypeError, ValueError):
                raise FieldUpdateRefused(
                    f"a (key, {{field: value}}) pair, not {update!r}"
                ) from None
            kind, key_json = _stored_key(key)
            # Numbers equal in value are one key (hash(5) == hash(5.0) == hash(Int64(5))).
            identity = key if kind == "number" else (kind, str(key))
            if identity in seen:
                raise FieldUpdateRefused("the key is given more than once")
            seen.add(identity)
            if not isinstance(fields, Mapping) or not fields:
                raise FieldUpdateRefused("the fields to set are a non-empty mapping")
            texts, types = [], []
            for name, value in fields.items():
                if name not in names:  # the same few names in every update: checked once
                    check_field_name(name, "field")
                    if name in ("_id", key_field):
                        raise FieldUpdateRefused(f"set_fields does not change {name!r}")
                    names[name] = encode_basestring_ascii(name) + ":"
                type_name, text = stored_value(value)
                texts.append(names[name] + text)
                types.append((name, type_name))
            name = None
            given = tuple(types)
            typed = shapes.get(given) or shapes.setdefault(given, tuple(sorted(given)))
            values_json = "{" + ",".join(texts) + "}"
            items.append(FieldUpdate(key, fields, key_json, values_json, (kind, typed)))
    except FieldUpdateRefused as exc:
        field = f", field {name!r}" if name is not None else ""
        raise FieldUpdateRefused(
            f"update #{position} ({key_field}={key!r}{field}): {exc}; nothing was written"
        ) from None
    return FieldUpdates(key_field, items)


@dataclass
class SetFieldsResult:
    """What set_fields did: documents matched (each written), the keys no document has (in the
    order given), and the statements sent (UPDATEs on the backend, update commands otherwise)."""

    path: str  # "backend" (FerretDB's PostgreSQL tables) or "protocol" (update commands)
    matched: int = 0
    missing: list[Any] = field(default_factory=list)
    statements: int = 0


def set_fields_statement(
    table: sql.Identifier, key_field: str, shape: tuple[str, tuple[tuple[str, str], ...]]
) -> sql.Composed:
    """One UPDATE of the documents whose ``key_field`` equals a key of ``unnest(keys, values)``.

    The join is FerretDB's own keyed condition, ``_jsonb -> key @> key`` (JSON containment: 5
    matches 5.0, a string never matches a number), which the key's GIN index serves one lookup per
    key (containment has no hash or merge join: without that index the statement would compare
    every key with every row). The new document is the old one with the values merged in
    (``||``) and, unless every field is already stored with its type, ``$s`` rebuilt: each
    field's type replaced and the new fields appended to ``$k`` in byte order. A document whose
    key is stored as another type (a date whose milliseconds equal a number key, an ObjectId whose
    hex equals a string key) or in an array is left as it is and its key reported missing.
    RETURNING says which keys matched and whether each was of the key's type."""
    kind, typed = shape
    names = [name for name, _ in typed]
    types = json.dumps({name: {"t": type_name} for name, type_name in typed})
    doc, key = sql.SQL("t._jsonb"), sql.Literal(key_field)
    schema, order = sql.SQL("(t._jsonb -> '$s' -> 'p')"), sql.SQL("(t._jsonb -> '$s' -> '$k')")
    key_ok = sql.SQL("coalesce(({} -> {} ->> 't') = ANY({}), false)").format(
        schema, key, sql.Literal(list(KEY_TYPES[kind]))
    )
    new_order = sql.SQL(
        "CASE WHEN {order} @> {names} THEN {order} ELSE {order} || coalesce((SELECT "
        "jsonb_agg(f ORDER BY o) FROM jsonb_array_elements_text({names}) WITH ORDINALITY AS "
        "x(f, o) WHERE NOT ({order} ? f)), '[]') END"
    ).format(order=order, names=sql.Literal(json.dumps(names)))
    return sql.SQL(
        "UPDATE {table} AS t SET _jsonb = CASE "
        "WHEN NOT {key_ok} THEN {doc} "
        "WHEN {schema} @> {types} THEN {doc} || u.vals "
        "ELSE {doc} || (u.vals || jsonb_build_object('$s', jsonb_build_object("
        "'p', {schema} || {types}, '$k', {new_order}))) END "
        "FROM unnest(%s::text[]::jsonb[], %s::text[]::jsonb[]) WITH ORDINALITY AS u(key, vals, i) "
        "WHERE (t._jsonb -> {key}) @> u.key "
        "RETURNING u.i, {key_ok}"
    ).format(
        table=table,
        key_ok=key_ok,
        doc=doc,
        schema=schema,
        types=sql.Literal(types),
        new_order=new_order,
        key=key,
    )


def _collection_table(conn: Any, database: str, collection: str) -> str | None:
    try:
        return backend_table(conn, database, collection)
    except BackendError:
        return None
    except Exception as exc:  # no schema: the database has no collection yet
        if getattr(exc, "sqlstate", None) == "42P01":
            return None
        raise


def _sort_key(item: FieldUpdate) -> Any:
    return item.key if item.shape[0] == "number" else str(item.key)


def set_fields(
    settings: Settings,
    database: str,
    collection: str,
    key_field: str,
    updates: FieldUpdates | Iterable[tuple[Any, Mapping[str, Any]]],
    *,
    chunk_size: int = SET_FIELDS_CHUNK,
    writers: int = SET_FIELDS_WRITERS,
) -> SetFieldsResult:
    """Set fields on the documents of ``collection`` whose ``key_field`` equals each key, straight
    in the embedded FerretDB's backend: per chunk of ``chunk_size`` keys one UPDATE in one
    transaction (:func:`set_fields_statement`), ``writers`` connections at once. Every update is
    checked before anything is written (:func:`prepare_field_updates`); the application's
    validator is the caller's (``docstore.validation.set_fields``, the platform's entry point).

    The key is meant to identify one document (``_id`` or a field with a unique index): a key
    that matches more than one rolls its chunk back with a BackendError. Chunks commit on their
    own: an error leaves the chunks before it written, and a re-run writes the same values again
    (idempotent). The key's GIN index is made first if it is missing (what ``apply_specs`` makes)."""
    prepared = (
        updates if isinstance(updates, FieldUpdates) else prepare_field_updates(key_field, updates)
    )
    if prepared.key_field != key_field:
        raise FieldUpdateRefused(
            f"updates prepared for key field {prepared.key_field!r}, not {key_field!r}"
        )
    if chunk_size < 1 or writers < 1:
        raise FieldUpdateRefused("chunk_size and writers are at least 1")
    result = SetFieldsResult(path="backend")
    if not prepared.items:
        return result
    with backend_connection(settings) as conn:
        name = _collection_table(conn, database, collection)
    if name is None:  # no such collection: no document has any of the keys
        result.missing = [item.key for item in prepared.items]
        return result
    ensure_keyed_indexes(settings, database, collection, [key_field])
    table = sql.Identifier(database, name)

    by_shape: dict[Any, list[int]] = {}
    for position, item in enumerate(prepared.items):
        by_shape.setdefault(item.shape, []).append(position)
    work: queue.SimpleQueue = queue.SimpleQueue()
    for shape, positions in by_shape.items():
        # Keys in one order in every call: two calls over the same keys lock rows in the same
        # order and cannot deadlock.
        positions.sort(key=lambda p: _sort_key(prepared.items[p]))
        statement = set_fields_statement(table, key_field, shape)
        for start in range(0, len(positions), chunk_size):
            work.put((statement, positions[start : start + chunk_size]))

    matched = bytearray(len(prepared.items))
    lock, errors, counts = threading.Lock(), [], [0]

    def write() -> None:
        try:
            with backend_connection(settings) as conn:
                while not errors:
                    try:
                        statement, positions = work.get_nowait()
                    except queue.Empty:
                        return
                    found = _write_chunk(conn, statement, prepared.items, positions, key_field)
                    with lock:
                        for position in found:
                            matched[position] = 1
                        counts[0] += 1
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(min(writers, work.qsize()))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.statements = counts[0]
    if errors:
        raise errors[0]
    result.matched = sum(matched)
    result.missing = [
        item.key for item, hit in zip(prepared.items, matched, strict=True) if not hit
    ]
    return result


def _write_chunk(
    conn: Any,
    statement: sql.Composed,
    items: list[FieldUpdate],
    positions: list[int],
    key_field: str,
) -> list[int]:
    """One chunk in one transaction; the positions whose document was found and written."""
    with conn.transaction():
        _plan_settings(conn)
        rows = conn.execute(statement, _chunk_params(items, positions)).fetchall()
        hits: dict[int, bool] = {}
        for ordinal, key_ok in rows:
            if ordinal in hits:
                key = items[positions[ordinal - 1]].key
                raise BackendError(
                    f"{key_field}={key!r} matches more than one document: set_fields keys one "
                    "document per key (_id or a field with a unique index); this chunk was "
                    "rolled back"
                )
            hits[ordinal] = key_ok
    return [positions[ordinal - 1] for ordinal, key_ok in hits.items() if key_ok]


def _plan_settings(conn: Any) -> None:
    """For the transaction of one chunk. The key's GIN index is the only sane plan (see
    set_fields_statement) but its estimate for a joined key is rough (hundreds of rows a key):
    a sequential scan is priced out, and the JIT, which that estimate would start at 0.2-0.5 s a
    statement, stays off."""
    conn.execute("SET LOCAL enable_seqscan = off")
    conn.execute("SET LOCAL jit = off")


def _chunk_params(items: list[FieldUpdate], positions: list[int]) -> list[list[str]]:
    return [[items[p].key_json for p in positions], [items[p].values_json for p in positions]]


def explain_set_fields(
    settings: Settings,
    database: str,
    collection: str,
    key_field: str,
    updates: FieldUpdates | Iterable[tuple[Any, Mapping[str, Any]]],
) -> dict[str, Any]:
    """PostgreSQL's plan (EXPLAIN, nothing run) of the UPDATE set_fields sends for the first
    chunk of ``updates`` (at most SET_FIELDS_CHUNK keys), under the same settings."""
    prepared = (
        updates if isinstance(updates, FieldUpdates) else prepare_field_updates(key_field, updates)
    )
    if not prepared.items:
        raise FieldUpdateRefused("nothing to explain: no updates")
    shape = prepared.items[0].shape
    positions = [p for p, item in enumerate(prepared.items) if item.shape == shape]
    positions = positions[:SET_FIELDS_CHUNK]
    with backend_connection(settings) as conn, conn.transaction():
        table = sql.Identifier(database, backend_table(conn, database, collection))
        _plan_settings(conn)
        statement = sql.SQL("EXPLAIN (FORMAT JSON) ") + set_fields_statement(
            table, key_field, shape
        )
        [(plan,)] = conn.execute(statement, _chunk_params(prepared.items, positions)).fetchall()
    return plan[0]["Plan"]
