"""Benchmark: the brief's three document-store queries (mongo/queries) on a seeded document store.

    uv run python bench/mongo_bench.py --scale 1 [--runs 3] [--queries 10] [--output FILE]

On the embedded profile the document store is the stand-in (litemongo under the platform home);
with MONGODB_URI set it is that server. A document database `bench_mongo_<pid>` is filled with the
seed's documents at the given scale (the same generator and the same per-collection cap as
`stripe-platform seed`) plus the brief's sample records in the queried collections (so the two
find queries have matches; a sample record clashing with a seeded one on a unique index is left
out), then dropped at the end.

Per query, after one warm-up: --runs runs of --queries executions each through
`stripe_platform.docstore.queries.run_query`; the figure is the median over all executions, with
min/max. The reference, measured in the same run, is a plain scan of the same collection: every
document read with `find({})` and the same predicate (or grouping) applied in Python, i.e. what the
query costs without any index or server-side evaluation. Prints a markdown table and writes JSON
(default bench/results/mongo-<UTC time>.json).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

from pymongo.errors import DuplicateKeyError

from stripe_platform.config import load_settings
from stripe_platform.docstore.client import connect, is_standin
from stripe_platform.docstore.queries import DocumentQuery, load_queries, run_query
from stripe_platform.docstore.specs import apply_specs, view_sources
from stripe_platform.seed.dataset import build
from stripe_platform.seed.load import document_plan
from stripe_platform.seed.spec import make_spec
from stripe_platform.showcase.brief_examples import load_documents

RESULTS = Path(__file__).parent / "results"
BATCH = 5_000


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fill(docdb: Any, scale: float, standin: bool) -> dict[str, dict[str, float]]:
    """The seed's documents at `scale` (capped like `seed` caps them on the stand-in)."""
    spec = make_spec(
        scale=scale, end=dt.date(2026, 11, 1), max_documents=25_000 if standin else None
    )
    data = build(spec)
    apply_specs(docdb)
    loaded = {}
    for name, _total, make in document_plan(data):
        started = time.perf_counter()
        it, rows = iter(make()), 0
        while batch := list(islice(it, BATCH)):
            docdb[name].insert_many(batch, ordered=False)
            rows += len(batch)
        seconds = time.perf_counter() - started
        loaded[name] = {"rows": rows, "seconds": seconds, "rows_per_s": rows / max(seconds, 1e-9)}
    add_brief_records(docdb)
    return loaded


def add_brief_records(docdb: Any) -> None:
    """The brief's own records in the queried collections, so the find queries find something.
    Loaded into a scratch database first: a sample document that collides with a seeded one on a
    unique index (a user name, say) is left out."""
    scratch = docdb.client[f"{docdb.name}_sample"]
    try:
        load_documents(scratch)
        for query in load_queries().values():
            name = view_sources().get(query.collection, query.collection)  # a view's collection
            for doc in scratch[name].find({}):
                with contextlib.suppress(DuplicateKeyError):
                    docdb[name].insert_one(doc)
    finally:
        docdb.client.drop_database(scratch.name)


def _matches(doc: dict[str, Any], query: dict[str, Any]) -> bool:
    """The subset of MongoDB's find semantics the brief's queries use: equality and $elemMatch."""
    for key, wanted in query.items():
        value = doc.get(key)
        if isinstance(wanted, dict) and "$elemMatch" in wanted:
            if not any(
                isinstance(item, dict) and _matches(item, wanted["$elemMatch"])
                for item in value or []
            ):
                return False
        elif value != wanted:
            return False
    return True


def _group(docs: list[dict[str, Any]], pipeline: list[dict[str, Any]]) -> list[tuple[Any, int]]:
    """The brief's aggregate: $group by a dotted path with a $sum of 1, sorted, limited."""
    group = next(stage["$group"] for stage in pipeline if "$group" in stage)
    limit = next((stage["$limit"] for stage in pipeline if "$limit" in stage), None)
    path = group["_id"].lstrip("$").split(".")
    counts: collections.Counter = collections.Counter()
    for doc in docs:
        value: Any = doc
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        counts[value] += 1
    return counts.most_common(limit)


def reference(docdb: Any, query: DocumentQuery) -> Callable[[], int]:
    """The same work as a plain scan: read every document of the collection, filter in Python."""
    name = view_sources().get(query.collection, query.collection) if is_standin(docdb) else None
    collection = docdb[name or query.collection]

    def scan() -> int:
        docs = list(collection.find({}))
        if query.find is not None:
            return sum(1 for d in docs if _matches(d, query.find))
        return len(_group(docs, query.aggregate or []))

    return scan


def timed_ms(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    out, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        out.append((time.perf_counter() - started) * 1000)
    return out, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--queries", type=int, default=10, help="executions per run and query")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    args = parser.parse_args()

    base = load_settings()
    settings = base.model_copy(update={"mongodb_database": f"bench_mongo_{os.getpid()}"})
    docdb = connect(settings)
    standin = is_standin(docdb)
    print(
        f"filling {settings.mongodb_database} at scale {args.scale} "
        f"({'stand-in' if standin else 'MongoDB'}) ...",
        flush=True,
    )
    try:
        loaded = fill(docdb, args.scale, standin)
        queries = {}
        for name, query in load_queries().items():
            scan = reference(docdb, query)
            run_query(docdb, query)  # warm-up
            scan()
            measured, ref = [], []
            for _ in range(args.runs):
                times, found = timed_ms(lambda q=query: run_query(docdb, q), args.queries)
                measured += times
                times, scanned = timed_ms(scan, max(1, args.queries // 5))
                ref += times
            collection = view_sources().get(query.collection, query.collection)
            queries[name] = {
                "shell": query.shell,
                "collection": query.collection,
                "documents_in_collection": docdb[
                    collection if standin else query.collection
                ].count_documents({}),
                "results": len(found),
                "reference_results": scanned,
                "ms": spread(measured),
                "reference_ms": spread(ref),
                "reference": "find({}) drained + the same predicate/grouping in Python",
            }
    finally:
        docdb.client.drop_database(settings.mongodb_database)

    results = {
        "benchmark": "mongo",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scale": args.scale,
        "runs": args.runs,
        "executions_per_run": args.queries,
        "backend": "litemongo stand-in" if standin else "MongoDB",
        "loaded": loaded,
        "queries": queries,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    out = args.output or RESULTS / f"mongo-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))

    print(f"\n## document queries at scale {args.scale} ({results['backend']})\n")
    print("| query | docs in collection | results | median ms (min, max) | plain scan ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, q in queries.items():
        m, r = q["ms"], q["reference_ms"]
        print(
            f"| `{name}` | {q['documents_in_collection']:,} | {q['results']} | "
            f"{m['median']:.2f} ({m['min']:.2f}, {m['max']:.2f}) | {r['median']:.2f} | "
            f"{m['median'] / r['median']:.2f}x |"
        )
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
