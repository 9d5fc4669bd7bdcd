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
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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
