"""Benchmark: the document store on the embedded server (FerretDB on the embedded PostgreSQL).

    uv run python bench/mongo_bench.py --scale 1 [--runs 3] [--queries 10] [--budget 15]
        [--keyed 200] [--updates 5000] [--writers 1,2,4] [--standin-cap 25000] [--output FILE]

On the embedded profile the document store is FerretDB (started here if it is not running); with
MONGODB_URI set it is that server, and the PostgreSQL floors below are not measured. A document
database `bench_mongo_<pid>` is filled, then dropped at the end. Measured, in this order:

1. The document seed at the scale, with no cap (one Transaction document per payment): the
   seed's own document path (`document_plan`, `apply_specs`, `insert_many` of `DOC_BATCH`
   documents, unordered), without the per-batch bookkeeping row the seed writes in PostgreSQL.
   Documents/s per collection and in all (goal >= 20,000/s). References: the same documents
   generated and thrown away (generation alone), and the floor: the very rows FerretDB stored,
   copied out of its table beforehand and loaded again with COPY binary into a plain table
   (one jsonb column, no index) over one connection.
2. The brief's three queries (`mongo/queries`, through `run_query`), after the brief's sample
   records were added (so the finds find something), goal < 100 ms. Per run, up to --queries
   executions within --budget seconds (at least one); median and min/max over all. The plan is
   FerretDB's `explain` (PostgreSQL's plan: node types, whether the filter was pushed down).
   Floor: the same query as one SQL statement on FerretDB's own table (the filter as jsonb
   containment, the grouping as GROUP BY), the rows returned to Python; its results must match.
3. Keyed access on the Transaction collection: `find_one` by `_id` and by `transaction_id`,
   `update_one` by `transaction_id` (a new AnomalyScore), --keyed random keys per run (within
   the budget), goal < 5 ms median and p95; each with its `explain` plan (an update looks its
   document up by the same filter first). Floor: FerretDB's own pushed-down statement
   (`_jsonb -> $1 @> $2`) over psycopg; for the update, one UPDATE with that condition.
4. Bulk score updates by transaction id ($set AnomalyScore and isFraud), --updates distinct random
   keys per run and writer count, at most 40 updates per command in all in flight (FerretDB v1
   holds a PostgreSQL connection per update statement until the command ends: 40 for one writer,
   20 each for two, 10 each for four), goal >= 20,000 updates/s. Floor: the same updates as
   UPDATE statements over one psycopg connection, 40 per transaction. Then the platform's own
   way, `docstore.validation.set_fields`, on every Transaction document per run (new scores each
   run, end to end: its checks included): on the embedded FerretDB one UPDATE per 10,000 keys in
   its backend (the first run also turns AnomalyScore's stored type from null to double), update
   commands elsewhere; with the plan of its UPDATE.
5. The in-process stand-in (litemongo, still installed for this reference only) at its old
   25,000-document cap, filled from the same generator with the specs' indexes, in a temporary
   directory: its insert rate and the three queries as written (views resolved to their source
   collection), timed like 2.

Prints a markdown table and writes JSON (default bench/results/mongo-<UTC time>.json).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import queue
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import litemongo
from bson import ObjectId
from psycopg import sql
from pymongo import UpdateOne
from pymongo.errors import DuplicateKeyError

from stripe_platform.config import load_settings
from stripe_platform.docstore import validation
from stripe_platform.docstore.client import connect, server_kind
from stripe_platform.docstore.ferretdb import (
    MAX_UPDATES_PER_COMMAND,
    SET_FIELDS_CHUNK,
    SET_FIELDS_WRITERS,
    backend_connection,
    backend_table,
    explain_set_fields,
)
from stripe_platform.docstore.fields import DocumentFields
from stripe_platform.docstore.queries import (
    DocumentQuery,
    load_queries,
    run_query,
    without_elem_match,
)
from stripe_platform.docstore.specs import apply_specs, load_specs, view_sources
from stripe_platform.oltp import db
from stripe_platform.oltp.migrate import migrate
from stripe_platform.runtime import embedded
from stripe_platform.runtime.ferretdb import FERRETDB_VERSION
from stripe_platform.seed.dataset import build
from stripe_platform.seed.documents import oid
from stripe_platform.seed.load import DOC_BATCH, document_plan
from stripe_platform.seed.spec import make_spec
from stripe_platform.showcase.brief_examples import load_documents

RESULTS = Path(__file__).parent / "results"
END = dt.date(2026, 11, 1)
STANDIN_CAP = 25_000  # the per-collection cap the seed used on the stand-in before issue 17
GOALS = {"query_ms": 100.0, "seed_docs_per_s": 20_000.0, "keyed_ms": 5.0, "updates_per_s": 20_000.0}


# -- timing ----------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p95": ordered[max(0, round(0.95 * len(ordered)) - 1)],  # nearest rank
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def timed_runs(
    fn: Callable[[int], Any], runs: int, most: int, budget_s: float
) -> list[list[float]]:
    """Per run, up to `most` calls of fn(i) (ms each), stopping once `budget_s` has passed (at
    least one call per run)."""
    out = []
    for _ in range(runs):
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < most and (not times or time.perf_counter() < deadline):
            started = time.perf_counter()
            fn(len(times))
            times.append((time.perf_counter() - started) * 1000)
        out.append(times)
    return out


def summary(per_run: list[list[float]]) -> dict[str, Any]:
    return {
        **spread([t for run in per_run for t in run]),
        "per_run_median": [statistics.median(run) for run in per_run],
        "per_run_n": [len(run) for run in per_run],
    }


# -- FerretDB's tables in PostgreSQL ---------------------------------------------------------------
class Backend:
    """FerretDB's own storage of one document database: a PostgreSQL schema named after it, a
    table per collection (one `_jsonb` column)."""

    def __init__(self, settings, database: str) -> None:
        self.conn = backend_connection(settings)
        self.schema = database

    def table(self, collection: str) -> sql.Identifier:
        return sql.Identifier(self.schema, backend_table(self.conn, self.schema, collection))

    def close(self) -> None:
        self.conn.close()


# A new AnomalyScore written as FerretDB v1 writes a double: the value, and its type in the
# document's own type record (`$s`), which FerretDB reads back (an int stays an int: isFraud).
SET_SCORE = sql.SQL(  # not .format()ted itself: single braces
    "jsonb_set(jsonb_set(_jsonb, '{AnomalyScore}', %s::jsonb), '{$s,p,AnomalyScore,t}', '\"double\"')"
)


def stored(value: Any) -> str:
    """A filter value as FerretDB v1 stores it in `_jsonb` (JSON text): what its pushed-down
    containment compares with. Only the types the brief's queries and the keys use."""
    if isinstance(value, ObjectId):
        return json.dumps(str(value))
    if isinstance(value, dt.datetime):
        return json.dumps(int(value.timestamp() * 1000))
    if isinstance(value, str | int | float | bool) or value is None:
        return json.dumps(value)
    if isinstance(value, dict) and not any(k.startswith("$") for k in value):
        return "{" + ", ".join(f"{json.dumps(k)}: {stored(v)}" for k, v in value.items()) + "}"
    raise NotImplementedError(f"no SQL form for {value!r}")


def floor_statement(table: sql.Identifier, query: DocumentQuery) -> tuple[sql.Composed, list]:
    """The query as one SQL statement on FerretDB's table: what PostgreSQL alone takes."""
    if query.find is not None:
        where, params = [], []
        for key, wanted in query.find.items():
            if isinstance(wanted, dict) and set(wanted) == {"$elemMatch"}:
                # an array holding an element with these fields: containment of a one-item array
                wanted, form = wanted["$elemMatch"], "[{}]"
            else:
                form = "{}"
            where.append(sql.SQL("(_jsonb -> %s) @> %s::jsonb"))
            params += [key, form.format(stored(wanted))]
        statement = sql.SQL("SELECT _jsonb FROM {} WHERE {}").format(
            table, sql.SQL(" AND ").join(where)
        )
        return statement, params
    stages = {k: v for stage in query.aggregate or [] for k, v in stage.items()}
    group = stages.get("$group", {})
    if set(stages) - {"$group", "$sort", "$limit"} or set(group) - {"_id"} != {"count"}:
        raise NotImplementedError("only a $group count, sorted by it and limited")
    path = group["_id"].lstrip("$").split(".")
    statement = sql.SQL(
        "SELECT _jsonb #> %s AS _id, count(*) AS count FROM {} GROUP BY 1 ORDER BY 2 DESC LIMIT %s"
    ).format(table)
    return statement, [path, stages.get("$limit")]


# -- explain ---------------------------------------------------------------------------------------
def plan_of(explained: dict[str, Any], kind: str) -> dict[str, Any]:
    """Node types of an `explain`, outermost first, and whether any reads an index."""
    nodes: list[str] = []
    if kind == "ferretdb":  # PostgreSQL's plan of the SQL FerretDB runs
        conditions: list[str] = []

        def walk(node: dict[str, Any]) -> None:
            index = f" on {node['Index Name']}" if node.get("Index Name") else ""
            nodes.append(f"{node['Node Type']}{index}")
            if node.get("Index Cond"):
                conditions.append(node["Index Cond"])
            for child in node.get("Plans", []):
                walk(child)

        walk(explained["queryPlanner"]["Plan"])
        return {
            "nodes": nodes,
            "index": any("Index" in n for n in nodes),
            "filter_pushdown": explained.get("filterPushdown"),
            "index_conditions": conditions,
        }

    def stages(stage: dict[str, Any]) -> None:  # MongoDB's winning plan
        index = f" on {stage['indexName']}" if stage.get("indexName") else ""
        nodes.append(f"{stage.get('stage', '?')}{index}")
        for child in [stage.get("inputStage"), *stage.get("inputStages", [])]:
            if child:
                stages(child)

    planner = explained.get("queryPlanner") or explained.get("stages", [{}])[0].get(
        "$cursor", {}
    ).get("queryPlanner", {})
    stages(planner.get("winningPlan", {}).get("queryPlan", planner.get("winningPlan", {})))
    return {
        "nodes": nodes,
        "index": any(n.startswith(("IXSCAN", "IDHACK", "EXPRESS")) for n in nodes),
    }


def scanned(
    backend: Backend, table: sql.Identifier, plan: dict[str, Any], total: int
) -> int | None:
    """Rows PostgreSQL reads from the table under the plan: all of them for a sequential scan,
    else those the index conditions select (counted with the plan's own conditions)."""
    nodes = plan.get("nodes") or []
    if any(n.startswith("Seq Scan") for n in nodes):
        return total
    conditions = plan.get("index_conditions") or []
    if not conditions or any(n.startswith("BitmapOr") for n in nodes):
        return None
    # The plan's conditions name the table itself (`<table>._jsonb`), as FROM here does.
    statement = sql.SQL("SELECT count(*) FROM {} WHERE ").format(table) + sql.SQL(" AND ").join(
        sql.SQL(c) for c in conditions
    )
    try:
        return backend.conn.execute(statement).fetchone()[0]
    except Exception:  # a condition this cannot replay: say nothing rather than guess
        return None


def explain(docdb: Any, command: dict[str, Any]) -> dict[str, Any]:
    try:
        return plan_of(docdb.command("explain", command), server_kind(docdb))
    except Exception as exc:  # an explain the server lacks is recorded, not fatal
        return {"nodes": [], "index": None, "error": f"{type(exc).__name__}: {exc}"[:300]}


def query_command(docdb: Any, query: DocumentQuery) -> dict[str, Any]:
    """The command run_query sends (on FerretDB: a view's source, $elemMatch rewritten)."""
    name, find, pipeline = query.collection, query.find, query.aggregate or []
    if server_kind(docdb) == "ferretdb":
        name = view_sources().get(name, name)
        find = without_elem_match(query.name, find) if find is not None else None
        pipeline = [
            {"$match": without_elem_match(query.name, s["$match"])} if "$match" in s else s
            for s in pipeline
        ]
    if find is not None:
        return {"find": name, "filter": find}
    return {"aggregate": name, "pipeline": pipeline, "cursor": {}}


# -- 1. the document seed --------------------------------------------------------------------------
def insert_all(collection: Any, docs: Iterable[dict[str, Any]], checked: bool = True) -> int:
    """The seed's writes: DOC_BATCH documents an insert_many, checked against the collection's
    validator first where the server does not enforce it (FerretDB)."""
    it, count = iter(docs), 0
    while batch := list(islice(it, DOC_BATCH)):
        if checked:
            validation.insert_many(collection, batch, ordered=False)
        else:
            collection.insert_many(batch, ordered=False)
        count += len(batch)
    return count


def generation_and_check(name: str, docs: Iterable[dict[str, Any]]) -> tuple[int, float, float]:
    """The same documents generated again and checked against the validator, nothing written:
    (documents, generation seconds, check seconds)."""
    it, count, generate_s, check_s = iter(docs), 0, 0.0, 0.0
    while True:
        started = time.perf_counter()
        batch = list(islice(it, DOC_BATCH))
        generate_s += time.perf_counter() - started
        if not batch:
            return count, generate_s, check_s
        started = time.perf_counter()
        validation.check_documents(name, batch)
        check_s += time.perf_counter() - started
        count += len(batch)


def fill(docdb: Any, settings: Any, data: Any) -> dict[str, Any]:
    started = time.perf_counter()
    apply_specs(docdb, settings)
    out: dict[str, Any] = {"apply_specs_s": time.perf_counter() - started, "collections": {}}
    fields = DocumentFields(settings)  # as the seed writes them: protected fields encrypted
    for name, _total, make in document_plan(data):
        started = time.perf_counter()
        count = insert_all(docdb[name], fields.encrypting(name, make()))
        seconds = time.perf_counter() - started
        generated, generate_s, check_s = generation_and_check(name, make())
        out["collections"][name] = {
            "documents": count,
            "seconds": seconds,
            "docs_per_s": count / max(seconds, 1e-9),
            "generate_s": generate_s,
            "check_s": check_s,
            "checked_by_application": validation.enforced_by_application(docdb),
        }
        if generated != count:
            raise RuntimeError(f"{name}: {count} documents inserted, {generated} generated again")
    return out


def seed_floor(backend: Backend, seeded: dict[str, Any], work: Path) -> None:
    """Per collection: FerretDB's stored rows copied out (untimed), then loaded again with COPY
    binary into a plain one-column table (timed)."""
    conn = backend.conn
    scratch = f"{backend.schema}_floor"
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(scratch)))
    try:
        for name, entry in seeded["collections"].items():
            source = backend.table(name)
            entry["stored_bytes"] = conn.execute(
                "SELECT pg_total_relation_size(%s::regclass)", (source.as_string(conn),)
            ).fetchone()[0]
            path = work / f"{name}.copy"
            with (
                path.open("wb") as sink,
                conn.cursor().copy(
                    sql.SQL("COPY (SELECT _jsonb FROM {}) TO STDOUT (FORMAT binary)").format(source)
                ) as copy,
            ):
                for chunk in copy:
                    sink.write(chunk)
            target = sql.Identifier(scratch, name.lower())
            conn.execute(sql.SQL("CREATE TABLE {} (_jsonb jsonb)").format(target))
            started = time.perf_counter()
            with (
                path.open("rb") as source_file,
                conn.cursor().copy(
                    sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(target)
                ) as copy,
            ):
                while chunk := source_file.read(1 << 20):
                    copy.write(chunk)
            entry["floor_s"] = time.perf_counter() - started
            entry["copy_bytes"] = path.stat().st_size
            path.unlink()
            loaded = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()[0]
            if loaded != entry["documents"]:
                raise RuntimeError(f"floor: {name} has {loaded} rows, not {entry['documents']}")
            conn.execute(sql.SQL("DROP TABLE {}").format(target))
    finally:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(scratch)))


def brief_records(client: Any, scratch: str) -> dict[str, list[dict[str, Any]]]:
    """The brief's own records of the queried collections, as the platform loads them (into a
    scratch database of the server, dropped again)."""
    try:
        load_documents(client[scratch], load_settings())
        names = {view_sources().get(q.collection, q.collection) for q in load_queries().values()}
        return {name: list(client[scratch][name].find({})) for name in sorted(names)}
    finally:
        client.drop_database(scratch)


def add_records(docdb: Any, records: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """Add the brief's records so the find queries find something; one that collides with a
    seeded document on a unique index (a user name, say) is left out. Returns the count added."""
    added: dict[str, int] = collections.Counter()
    for name, docs in records.items():
        for doc in docs:
            with contextlib.suppress(DuplicateKeyError):
                docdb[name].insert_one(doc)
                added[name] += 1
    return dict(added)


# -- 2. the brief's queries ------------------------------------------------------------------------
def measure_queries(
    docdb: Any, backend: Backend | None, counts: dict[str, int], args: argparse.Namespace
) -> dict[str, Any]:
    kind = server_kind(docdb)
    out = {}
    for name, query in load_queries().items():
        found = run_query(docdb, query)  # warm-up
        per_run = timed_runs(
            lambda _i, q=query: run_query(docdb, q), args.runs, args.queries, args.budget
        )
        command = query_command(docdb, query)
        collection = command.get("find") or command["aggregate"]
        entry: dict[str, Any] = {
            "shell": query.shell,
            "collection": query.collection,
            "reads": collection,
            "documents_in_collection": counts.get(collection),
            "results": len(found),
            "ms": summary(per_run),
            "plan": explain(docdb, command),
            "server": kind,
        }
        if backend is not None:
            entry["floor"] = sql_floor(backend, collection, query, found, args)
            entry["scanned"] = scanned(
                backend, backend.table(collection), entry["plan"], counts.get(collection, 0)
            )
        out[name] = entry
    return out


def sql_floor(
    backend: Backend, collection: str, query: DocumentQuery, found: list, args: argparse.Namespace
) -> dict[str, Any]:
    try:
        statement, params = floor_statement(backend.table(collection), query)
    except NotImplementedError as exc:
        return {"skipped": str(exc)}
    rows = backend.conn.execute(statement, params).fetchall()  # warm-up
    per_run = timed_runs(
        lambda _i: backend.conn.execute(statement, params).fetchall(),
        args.runs,
        args.queries,
        args.budget,
    )
    if query.find is not None:
        same = len(rows) == len(found)
    else:
        same = sorted(r[1] for r in rows) == sorted(d.get("count") for d in found)
    return {
        "sql": statement.as_string(backend.conn),
        "results": len(rows),
        "same_results": same,
        "ms": summary(per_run),
    }


# -- 3. keyed access -------------------------------------------------------------------------------
def measure_keyed(
    docdb: Any, backend: Backend | None, ids: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    collection = docdb["Transaction"]
    rng = random.Random(17)
    keys = [rng.choice(ids) for _ in range(args.runs * args.keyed + 3)]  # the last 3: warm-up
    scores = [rng.random() for _ in keys]

    def find_by_id(i: int) -> None:
        assert collection.find_one({"_id": oid("Transaction", keys[i])}) is not None

    def find_by_transaction_id(i: int) -> None:
        assert collection.find_one({"transaction_id": keys[i]}) is not None

    def update_by_transaction_id(i: int) -> None:
        done = collection.update_one(
            {"transaction_id": keys[i]}, {"$set": {"AnomalyScore": scores[i]}}
        )
        assert done.matched_count == 1

    ops = {
        "find_one_by_id": (find_by_id, "_id", lambda k: oid("Transaction", k)),
        "find_one_by_transaction_id": (find_by_transaction_id, "transaction_id", int),
        "update_one_by_transaction_id": (update_by_transaction_id, "transaction_id", int),
    }
    out: dict[str, Any] = {"collection": "Transaction", "documents": len(ids), "ops": {}}
    table = backend.table("Transaction") if backend is not None else None
    for name, (fn, field, value) in ops.items():
        for i in range(len(keys) - 3, len(keys)):
            fn(i)
        offset = iter(range(0, len(keys), args.keyed))
        per_run = []
        for _ in range(args.runs):
            start = next(offset)
            per_run += timed_runs(lambda i, s=start, f=fn: f(s + i), 1, args.keyed, args.budget)
        entry: dict[str, Any] = {
            "ms": summary(per_run),
            "plan": explain(
                docdb, {"find": "Transaction", "filter": {field: value(keys[0])}, "limit": 1}
            ),
        }
        if table is not None:
            entry["floor"] = keyed_floor(backend, table, name, field, keys, args)
            entry["scanned"] = scanned(backend, table, entry["plan"], len(ids))
        out["ops"][name] = entry
    return out


def keyed_floor(
    backend: Backend,
    table: sql.Identifier,
    name: str,
    field: str,
    keys: list[int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """FerretDB's own pushed-down condition over psycopg (the field a bind parameter, as
    FerretDB sends it); for the update, one UPDATE with that condition writing a new score."""
    conn = backend.conn
    if name.startswith("update"):
        statement = sql.SQL("UPDATE {} SET _jsonb = {} WHERE (_jsonb -> %s) @> %s::jsonb").format(
            table, SET_SCORE
        )

        def params(i: int) -> list:
            return [json.dumps(0.5 + i / 1e6), field, stored(keys[i])]
    else:
        statement = sql.SQL("SELECT _jsonb FROM {} WHERE (_jsonb -> %s) @> %s::jsonb").format(table)

        def params(i: int) -> list:
            key = oid("Transaction", keys[i]) if field == "_id" else keys[i]
            return [field, stored(key)]

    def run(i: int) -> None:
        cursor = conn.execute(statement, params(i))
        assert (cursor.rowcount if name.startswith("update") else len(cursor.fetchall())) == 1

    per_run = []
    for n in range(args.runs):
        per_run += timed_runs(lambda i, s=n * args.keyed: run(s + i), 1, args.keyed, args.budget)
    return {"ms": summary(per_run), "sql": statement.as_string(conn)}


# -- 4. bulk score updates -------------------------------------------------------------------------
def bulk_update(
    collection: Any, chunks: list[list[tuple[int, float, int]]], writers: int, budget_s: float
) -> dict:
    """Chunks of (transaction_id, score, is_fraud) as update commands, by `writers` threads
    taking the next chunk until none is left or the budget has passed."""
    work: queue.SimpleQueue = queue.SimpleQueue()
    for chunk in chunks:
        work.put(chunk)
    done, errors, lock = [0], [], threading.Lock()
    deadline = time.perf_counter() + budget_s

    def writer() -> None:
        while time.perf_counter() < deadline:
            try:
                chunk = work.get_nowait()
            except queue.Empty:
                return
            try:
                # the platform's score write; a chunk of at most MAX_UPDATES_PER_COMMAND goes
                # as one command
                counts = validation.bulk_write(
                    collection,
                    [
                        UpdateOne(
                            {"transaction_id": k}, {"$set": {"AnomalyScore": s, "isFraud": f}}
                        )
                        for k, s, f in chunk
                    ],
                    ordered=False,
                )
            except Exception as exc:
                errors.append(exc)
                return
            with lock:
                done[0] += counts.matched

    started = time.perf_counter()
    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return {"updates": done[0], "seconds": seconds, "updates_per_s": done[0] / seconds}


def measure_bulk(
    docdb: Any, backend: Backend | None, ids: list[int], args: argparse.Namespace, settings: Any
) -> dict[str, Any]:
    collection = docdb["Transaction"]
    rng = random.Random(18)
    n = min(args.updates, len(ids))
    out: dict[str, Any] = {"updates_per_run": n, "writers": {}}
    warm = [(k, 0.0, 0) for k in rng.sample(ids, min(10, len(ids)))]
    bulk_update(collection, [warm], 1, args.budget)
    last: list[tuple[int, float, int]] = []
    for writers in args.writers:
        per_command = max(1, MAX_UPDATES_PER_COMMAND // writers)
        runs = []
        for _ in range(args.runs):
            last = [(k, rng.random(), int(rng.random() < 0.005)) for k in rng.sample(ids, n)]
            chunks = [last[i : i + per_command] for i in range(0, n, per_command)]
            runs.append(bulk_update(collection, chunks, writers, args.budget))
        out["writers"][str(writers)] = {"per_command": per_command, "runs": runs}
    if backend is not None:
        out["floor"] = bulk_floor(backend, last, args)
        out["set_based_floor"] = bulk_floor_set_based(backend, last, args)
    out["set_fields"] = bulk_set_fields(docdb, settings, ids, args)
    return out


def bulk_set_fields(docdb: Any, settings: Any, ids: list[int], args) -> dict[str, Any]:
    """validation.set_fields on every Transaction document, new scores each run, timed end to
    end (the key, type and validator checks included)."""
    rng = random.Random(19)
    runs, result = [], None
    for _ in range(args.runs):
        updates = [
            (k, {"AnomalyScore": rng.random(), "isFraud": int(rng.random() < 0.005)}) for k in ids
        ]
        started = time.perf_counter()
        result = validation.set_fields(docdb, settings, "Transaction", "transaction_id", updates)
        seconds = time.perf_counter() - started
        if result.matched != len(ids) or result.missing:
            raise RuntimeError(f"set_fields: {result.matched} of {len(ids)} matched")
        runs.append(
            {
                "updates": result.matched,
                "seconds": seconds,
                "updates_per_s": result.matched / seconds,
            }
        )
    out: dict[str, Any] = {
        "path": result.path,
        "statements_per_run": result.statements,
        "chunk": SET_FIELDS_CHUNK,
        "writers": SET_FIELDS_WRITERS,
        "runs": runs,
    }
    if result.path == "backend":
        plan = explain_set_fields(settings, docdb.name, "Transaction", "transaction_id", updates)
        out["plan"] = plan_of({"queryPlanner": {"Plan": plan}}, "ferretdb")
    return out


def bulk_floor(backend: Backend, updates: list[tuple[int, float, int]], args) -> dict[str, Any]:
    """The last run's updates again as UPDATE statements over one psycopg connection,
    MAX_UPDATES_PER_COMMAND per transaction."""
    statement = sql.SQL(
        "UPDATE {} SET _jsonb = jsonb_set({}, '{{isFraud}}', %s::jsonb) "
        "WHERE (_jsonb -> 'transaction_id') @> %s::jsonb"
    ).format(backend.table("Transaction"), SET_SCORE)
    conn = backend.conn
    done, started = 0, time.perf_counter()
    deadline = started + args.budget
    for i in range(0, len(updates), MAX_UPDATES_PER_COMMAND):
        if time.perf_counter() > deadline:
            break
        chunk = updates[i : i + MAX_UPDATES_PER_COMMAND]
        with conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(
                statement, [(json.dumps(s + 0.25), json.dumps(f), stored(k)) for k, s, f in chunk]
            )
        done += len(chunk)
    seconds = time.perf_counter() - started
    return {
        "updates": done,
        "seconds": seconds,
        "updates_per_s": done / seconds,
        "per_transaction": MAX_UPDATES_PER_COMMAND,
        "sql": statement.as_string(conn),
    }


SET_BASED_BATCH = 1_000


def bulk_floor_set_based(
    backend: Backend, updates: list[tuple[int, float, int]], args
) -> dict[str, Any]:
    """PostgreSQL's best case for the same updates: one UPDATE per SET_BASED_BATCH, joined to the
    new scores on FerretDB's own btree index of transaction_id (equality, not containment)."""
    statement = sql.SQL(
        "UPDATE {t} SET _jsonb = jsonb_set(jsonb_set(jsonb_set(_jsonb, '{{AnomalyScore}}', "
        "to_jsonb(u.score)), '{{$s,p,AnomalyScore,t}}', '\"double\"'), '{{isFraud}}', "
        "to_jsonb(u.fraud)) FROM unnest(%s::bigint[], %s::float8[], %s::int[]) AS u(id, score, fraud) "
        "WHERE ({t}._jsonb -> 'transaction_id') = to_jsonb(u.id)"
    ).format(t=backend.table("Transaction"))
    conn = backend.conn
    done, started = 0, time.perf_counter()
    deadline = started + args.budget
    for i in range(0, len(updates), SET_BASED_BATCH):
        if time.perf_counter() > deadline:
            break
        chunk = updates[i : i + SET_BASED_BATCH]
        ids, scores, fraud = zip(*((k, s + 0.5, f) for k, s, f in chunk), strict=True)
        cursor = conn.execute(statement, [list(ids), list(scores), list(fraud)])
        if cursor.rowcount != len(chunk):
            raise RuntimeError(f"set-based floor: {cursor.rowcount} rows updated of {len(chunk)}")
        done += len(chunk)
    seconds = time.perf_counter() - started
    return {
        "updates": done,
        "seconds": seconds,
        "updates_per_s": done / seconds,
        "per_statement": SET_BASED_BATCH,
        "sql": statement.as_string(conn),
    }


# -- 5. the stand-in at its cap --------------------------------------------------------------------
def standin(
    scale: float, cap: int, records: dict[str, list[dict[str, Any]]], args: argparse.Namespace
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="mongo-bench-standin-"))
    try:
        client = litemongo.connect(str(work / "store"), tz_aware=True)
        docdb = client["bench"]
        for spec in load_specs():
            for index in spec.indexes:
                docdb[spec.collection].create_index(
                    list(index.keys.items()), name=index.name, unique=index.unique
                )
        data = build(make_spec(scale=scale, end=END, max_documents=cap))
        loaded = {}
        for name, _total, make in document_plan(data):
            started = time.perf_counter()
            count = insert_all(docdb[name], make(), checked=False)  # as the seed wrote it then
            seconds = time.perf_counter() - started
            loaded[name] = {"documents": count, "seconds": seconds, "docs_per_s": count / seconds}
        added = add_records(docdb, records)
        queries = {}
        for name, query in load_queries().items():
            collection = docdb[view_sources().get(query.collection, query.collection)]

            def run(_i: int, q: DocumentQuery = query, c: Any = collection) -> list:
                return list(c.find(q.find) if q.find is not None else c.aggregate(q.aggregate))

            found = run(0)  # warm-up
            per_run = timed_runs(run, args.runs, args.queries, args.budget)
            queries[name] = {
                "documents_in_collection": loaded[collection.name]["documents"]
                + added.get(collection.name, 0),
                "results": len(found),
                "ms": summary(per_run),
            }
        return {
            "version": importlib.metadata.version("litemongo"),
            "cap": cap,
            "loaded": loaded,
            "queries": queries,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the run ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--queries", type=int, default=10, help="most executions per run and query")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds per run and measure")
    parser.add_argument("--keyed", type=int, default=200, help="keyed operations per run and kind")
    parser.add_argument("--updates", type=int, default=5_000, help="bulk updates per run")
    parser.add_argument(
        "--writers",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 2, 4],
        help="concurrent bulk writers to try, comma-separated",
    )
    parser.add_argument("--standin-cap", type=int, default=STANDIN_CAP)
    parser.add_argument("--no-standin", action="store_true", help="skip the stand-in reference")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    if min(args.runs, args.queries, args.keyed, args.updates, *args.writers) < 1:
        parser.error("--runs, --queries, --keyed, --updates and --writers must be >= 1")
    if any(w > MAX_UPDATES_PER_COMMAND for w in args.writers):
        parser.error(f"--writers: at most {MAX_UPDATES_PER_COMMAND}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base = load_settings()
    settings = base.model_copy(update={"mongodb_database": f"bench_mongo_{os.getpid()}"})
    if settings.mongodb_uri is None:
        embedded.up(settings)  # idempotent: run_all has started it already
    # The documents' field keys live in the OLTP database's key store (sql/oltp/0012).
    with db.connect(settings, autocommit=True, with_key=False) as conn:
        migrate(conn)
    docdb = connect(settings)
    kind = server_kind(docdb)
    info = docdb.client.admin.command("buildInfo")
    backend_name = (
        f"FerretDB {FERRETDB_VERSION} on PostgreSQL"
        if kind == "ferretdb"
        else f"MongoDB {info['version']}"
    )
    print(
        f"filling {settings.mongodb_database} at scale {args.scale} ({backend_name}) ...",
        flush=True,
    )
    backend = Backend(settings, settings.mongodb_database) if kind == "ferretdb" else None
    work = Path(tempfile.mkdtemp(prefix="mongo-bench-"))
    try:
        data = build(make_spec(scale=args.scale, end=END))
        seeded = fill(docdb, settings, data)
        if backend is not None:
            seed_floor(backend, seeded, work)
        total = sum(c["documents"] for c in seeded["collections"].values())
        seconds = sum(c["seconds"] for c in seeded["collections"].values())
        seeded["all"] = {"documents": total, "seconds": seconds, "docs_per_s": total / seconds}
        for key in ("generate_s", "check_s", "floor_s"):
            if all(key in c for c in seeded["collections"].values()):
                seeded["all"][key] = sum(c[key] for c in seeded["collections"].values())
        print(f"seeded {total:,} documents in {seconds:.1f} s", flush=True)

        records = brief_records(docdb.client, f"{settings.mongodb_database}_sample")
        added = add_records(docdb, records)
        counts = {
            name: c["documents"] + added.get(name, 0) for name, c in seeded["collections"].items()
        }
        print("queries ...", flush=True)
        queries = measure_queries(docdb, backend, counts, args)
        ids = data.transactions.column("id").to_pylist()
        print("keyed access ...", flush=True)
        keyed = measure_keyed(docdb, backend, ids, args)
        print("bulk score updates ...", flush=True)
        bulk = measure_bulk(docdb, backend, ids, args, settings)
    finally:
        if backend is not None:
            backend.close()
        docdb.client.drop_database(settings.mongodb_database)
        docdb.client.close()
        shutil.rmtree(work, ignore_errors=True)
    reference = None
    if not args.no_standin:
        print(f"stand-in (litemongo) at its {args.standin_cap:,}-document cap ...", flush=True)
        reference = standin(args.scale, args.standin_cap, records, args)

    results = {
        "benchmark": "mongo",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scale": args.scale,
        "runs": args.runs,
        "executions_per_run": args.queries,
        "budget_s": args.budget,
        "server": kind,
        "backend": backend_name,
        "goals": GOALS,
        "seed": seeded,
        "queries": queries,
        "keyed": keyed,
        "bulk": bulk,
        "standin": reference,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    out = args.output or RESULTS / f"mongo-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(report(results))
    print(f"\nwritten {out}")


def report(r: dict[str, Any]) -> str:
    """A short markdown table of the headline figures (run_all builds the full rows)."""
    lines = [
        f"\n## document store at scale {r['scale']} ({r['backend']})\n",
        "| measure | median | goal |",
        "|---|---:|---:|",
    ]
    for name, c in [*r["seed"]["collections"].items(), ("all", r["seed"]["all"])]:
        lines.append(f"| seed {name} ({c['documents']:,} docs) | {c['docs_per_s']:,.0f} docs/s | |")
    for name, q in r["queries"].items():
        lines.append(f"| query `{name}` → {q['results']} | {q['ms']['median']:.2f} ms | < 100 ms |")
    for name, k in r["keyed"]["ops"].items():
        lines.append(
            f"| {name} ({' > '.join(k['plan']['nodes'])}) | {k['ms']['median']:.2f} ms "
            f"(p95 {k['ms']['p95']:.2f}) | < 5 ms |"
        )
    for writers, w in r["bulk"]["writers"].items():
        rate = statistics.median(x["updates_per_s"] for x in w["runs"])
        lines.append(f"| bulk updates, {writers} writer(s) | {rate:,.0f} /s | >= 20,000 /s |")
    if r["bulk"].get("set_fields"):
        done = r["bulk"]["set_fields"]
        rate = statistics.median(x["updates_per_s"] for x in done["runs"])
        lines.append(f"| set_fields ({done['path']}) | {rate:,.0f} /s | >= 20,000 /s |")
    for name, q in (r["standin"] or {}).get("queries", {}).items():
        lines.append(f"| stand-in query `{name}` → {q['results']} | {q['ms']['median']:.2f} ms | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
