"""Benchmark: data-subject requests across every store (issue 23, docs/compliance.md).

    uv run python bench/privacy_bench.py [--scale 1] [--runs 3] [--only access,erase] [--output FILE]

One platform home of its own (a temporary one, its own embedded cluster and document server),
set up as users run it: `up`, `seed --scale S`, `sync` of the four connections (PostgreSQL and
documents to the lake and to the DuckDB warehouse), `transform` (dbt build); none of that is
timed. Then, a section a measure, each a function ``measure_<what>(ctx, args) -> dict`` listed in
MEASURES (the JSON document has one key a section):

- ``access``: an access request for one customer (``requests.submit`` + ``requests.run``: every
  store read, protected values decrypted, the JSON export written), ``--runs`` times, a different
  customer each run (the busiest ones: most transactions). Goal: < 5 s at scale 1.
- ``erase``: an erasure request for one customer (every store's step: PostgreSQL, documents,
  warehouse raw and marts, every lake file incl. superseded generations, logs, the key shredded),
  ``--runs`` times, another customer each run. Goal: < 30 s at scale 1.

Reference, measured in the same run (the load of a shared machine moves both alike): reading every
lake parquet file whole once, the scan floor the lake step cannot go below (it reads the columns
that tell whose a row is from every file, and rewrites only the files holding the subject's rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stripe_platform.config import Settings, load_settings

CONNECTIONS = ("postgres-to-s3", "mongodb-to-s3", "postgres-to-snowflake", "mongodb-to-snowflake")
CLI = [sys.executable, "-m", "stripe_platform.cli"]
ACCESS_GOAL_S = 5.0
ERASE_GOAL_S = 30.0


@dataclass
class Context:
    settings: Settings
    home: Path
    customers: list[int]  # the busiest customers first; each measure takes its own


def cli(home: Path, *args: str) -> str:
    env = dict(os.environ, STRIPE_PLATFORM_HOME=str(home), STRIPE_PLATFORM_PROFILE="embedded")
    for name in ("STRIPE_PLATFORM_LAKE_URI", "STRIPE_PLATFORM_WAREHOUSE_PATH", "MONGODB_URI"):
        env.pop(name, None)  # the home keeps its own lake, warehouse and documents
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"stripe-platform {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def prepare(home: Path, scale: float) -> dict[str, float]:
    """The platform as users run it, synced and built; the seconds of each stage (not goals)."""
    stages: dict[str, float] = {}
    for name, args in [
        ("up", ["up"]),
        ("seed", ["seed", "--scale", str(scale)]),
        *[(f"sync {c}", ["sync", c]) for c in CONNECTIONS],
        ("transform", ["transform"]),
    ]:
        started = time.perf_counter()
        cli(home, *args)
        stages[name] = time.perf_counter() - started
        print(f"setup: {name} {stages[name]:.1f} s", flush=True)
    return stages


def busiest_customers(s: Settings, n: int) -> list[int]:
    from stripe_platform.oltp import db

    with db.connect(s) as conn:
        rows = conn.execute(
            # Not one a request already named (a --prepared home measured before).
            "SELECT customerid FROM transaction WHERE customerid IS NOT NULL AND customerid "
            "NOT IN (SELECT customer_id FROM privacy.request) "
            "GROUP BY customerid ORDER BY count(*) DESC, customerid LIMIT %s",
            (n,),
        ).fetchall()
    return [r[0] for r in rows]


def lake_floor(s: Settings) -> dict[str, Any]:
    """Every lake parquet file read whole once: the floor of a search of the lake."""
    import pyarrow.parquet as pq

    from stripe_platform.lake.writer import LakeWriter

    writer = LakeWriter.from_settings(s)
    root = Path(writer.base)
    started = time.perf_counter()
    files = rows = size = 0
    for path in sorted(root.rglob("*.parquet")):
        rows += pq.read_table(path).num_rows
        files += 1
        size += path.stat().st_size
    return {"seconds": time.perf_counter() - started, "files": files, "rows": rows, "bytes": size}


def _request(ctx: Context, kind: str, customer: int) -> dict[str, Any]:
    from stripe_platform.compliance import requests

    started = time.perf_counter()
    request = requests.submit(
        ctx.settings, kind, customer, requested_by="bench", source="cli", identity="bench"
    )
    request = requests.run(ctx.settings, request.id)
    seconds = time.perf_counter() - started
    if request.state != "done":
        raise RuntimeError(
            f"{kind} request for customer {customer}: {request.state}: {request.error}"
        )
    steps = {
        step.store: {
            "done_after_seconds": (step.finished_at - request.received_at).total_seconds()
            if step.finished_at
            else None,
            "counts": step.counts,
        }
        for step in request.steps
    }
    out: dict[str, Any] = {"customer": customer, "seconds": seconds, "steps": steps}
    if kind == "access" and request.export_path:
        export = Path(request.export_path)
        out["export_bytes"] = export.stat().st_size
        out["items"] = len(json.loads(export.read_text())["items"])
        export.unlink()  # personal data: not left in the bench's home
    return out


def _measure(ctx: Context, args: argparse.Namespace, kind: str, goal: float) -> dict[str, Any]:
    runs, floors = [], []
    for run in range(args.runs):
        customer = ctx.customers.pop(0)
        floors.append(lake_floor(ctx.settings))
        runs.append(_request(ctx, kind, customer))
        print(
            f"{kind}: run {run + 1}: customer {customer} {runs[-1]['seconds']:.2f} s "
            f"(lake floor {floors[-1]['seconds']:.2f} s)",
            flush=True,
        )
    median = statistics.median(r["seconds"] for r in runs)
    floor = statistics.median(f["seconds"] for f in floors)
    return {
        "runs": runs,
        "seconds": [r["seconds"] for r in runs],
        "median_seconds": median,
        "lake_floor": floors[-1] | {"median_seconds": floor},
        "ratio_to_floor": median / floor if floor else None,
        "goal_seconds": goal,
        "goal_met": median < goal,
    }


def measure_access(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    return _measure(ctx, args, "access", ACCESS_GOAL_S)


def measure_erase(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    return _measure(ctx, args, "erase", ERASE_GOAL_S)


MEASURES = {"access": measure_access, "erase": measure_erase}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(MEASURES)}")
    parser.add_argument("--home", type=Path, help="platform home (default: a temporary one)")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    parser.add_argument(
        "--prepared",
        action="store_true",
        help="--home is already up, seeded, synced and built at --scale: measure only",
    )
    args = parser.parse_args(argv)
    if args.prepared and args.home is None:
        parser.error("--prepared needs --home")
    if args.runs < 1:
        parser.error("--runs takes at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [m.strip() for m in (args.only or ",".join(MEASURES)).split(",") if m.strip()]
    unknown = set(chosen) - set(MEASURES)
    if unknown:
        print(f"--only: unknown {', '.join(sorted(unknown))}; known: {', '.join(MEASURES)}")
        return 2
    home = args.home or Path(tempfile.mkdtemp(prefix="stripe-platform-privacy-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)  # the cluster runs as an unprivileged OS user under root
    result: dict[str, Any] = {
        "scale": args.scale,
        "runs": args.runs,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
    }
    try:
        result["setup_seconds"] = {} if args.prepared else prepare(home, args.scale)
        s = load_settings(home=home, profile="embedded")
        ctx = Context(s, home, busiest_customers(s, args.runs * len(chosen)))
        for name in chosen:
            result[name] = MEASURES[name](ctx, args)
        result["load_average_after"] = os.getloadavg()
    finally:
        subprocess.run(
            [*CLI, "down"],
            env=dict(os.environ, STRIPE_PLATFORM_HOME=str(home)),
            capture_output=True,
        )
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    text = json.dumps(result, indent=2, default=str)
    if args.output:
        args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
