"""Benchmark: `dbt build` of the star schema on DuckDB, full and incremental, and the brief's three
OLAP queries.

    uv run python bench/transform_bench.py --scale 1 [--runs 3] [--database bench_transform]

On the embedded profile (STRIPE_PLATFORM_HOME as usual), in a database seeded at the given scale
(created and seeded unless it already holds that many transactions) and a DuckDB warehouse file of
its own under the platform home:
- sync both connections into the warehouse (reported for context);
- full build: `stripe-platform transform --full-refresh`, a warm-up then --runs times;
- incremental build: a warm-up then --runs times, each after `seed --minutes 30` and a sync of both
  connections (only the `transform` is timed);
- each of the brief's three queries: one warm-up, then 20 runs on one connection.
Wall times are of the whole `stripe-platform transform` process (Python and dbt imports included);
dbt's own run time is reported beside them. Prints a markdown table and writes
bench/results/transform-<UTC time>.json. Figures are medians with min/max.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from psycopg import sql

from stripe_platform.config import load_settings
from stripe_platform.docstore.client import connect as connect_docs
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import open_writer, run_sync
from stripe_platform.oltp import db, partitions
from stripe_platform.oltp.migrate import migrate
from stripe_platform.runtime import embedded
from stripe_platform.seed.dataset import build
from stripe_platform.seed.load import seed
from stripe_platform.seed.spec import make_spec
from stripe_platform.transform.analyses import available, run_analysis

RESULTS = Path(__file__).parent / "results"
CONNECTIONS = ("postgres-to-snowflake", "mongodb-to-snowflake")
QUERY_RUNS = 20


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def prepare(settings, scale: float) -> int:
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (settings.pg_database,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(settings.pg_database)))
    with db.connect(settings, autocommit=True) as conn:
        migrate(conn)
        partitions.maintain(
            conn,
            today=dt.date.today(),
            months_ahead=settings.partition_months_ahead,
            retention_months=settings.partition_retention_months,
        )
        have = conn.execute("SELECT count(*) FROM Transaction").fetchone()[0]
    wanted = int(scale * 1_000_000)
    if have < wanted * 0.99:
        print(f"seeding scale {scale} ({have:,} transactions present)", flush=True)
        seed(settings, build(make_spec(scale=scale, seed=42)), connect_docs(settings))
    with db.connect(settings) as conn:
        return conn.execute("SELECT count(*) FROM Transaction").fetchone()[0]


def sync_all(settings) -> float:
    catalog = load_catalog()
    started = time.perf_counter()
    for name in CONNECTIONS:
        connection = catalog.resolve(name)
        run_sync(settings, connection, open_writer(settings, connection))
    return time.perf_counter() - started


def cli(env: dict[str, str], *args: str) -> tuple[float, dict | None]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout) if "--json" in args else None
    return elapsed, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database", default="bench_transform")
    args = parser.parse_args()

    base = load_settings()
    if base.profile == "embedded":
        embedded.up(base)  # the seed writes documents too: the document server must run
    settings = base.model_copy(
        update={
            "pg_database": args.database,
            "mongodb_database": args.database,
            "warehouse_path": base.home_dir / f"{args.database}.duckdb",
        }
    )
    transactions = prepare(settings, args.scale)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_PLATFORM_")}
    env.update(
        STRIPE_PLATFORM_HOME=str(settings.home_dir),
        STRIPE_PLATFORM_PG_DATABASE=settings.pg_database,
        STRIPE_PLATFORM_MONGODB_DATABASE=settings.mongodb_database,
        STRIPE_PLATFORM_WAREHOUSE_PATH=str(settings.warehouse_file),
    )
    print(f"{transactions:,} transactions; syncing into {settings.warehouse_file}", flush=True)
    first_sync = sync_all(settings)

    # Round 0 of each loop is the warm-up: printed, left out of the figures.
    full, full_dbt = [], []
    for i in range(args.runs + 1):
        wall, report = cli(env, "transform", "--full-refresh", "--json")
        print(
            f"full build {i or 'warm-up'}: {wall:.1f}s (dbt {report['seconds']:.1f}s)", flush=True
        )
        if i:
            full.append(wall)
            full_dbt.append(report["seconds"])

    incremental, incremental_dbt, syncs = [], [], []
    for i in range(args.runs + 1):
        cli(env, "seed", "--minutes", "30", "--seed", str(100 + i))
        synced = sync_all(settings)
        wall, report = cli(env, "transform", "--json")
        print(
            f"incremental build {i or 'warm-up'}: {wall:.1f}s (dbt {report['seconds']:.1f}s)",
            flush=True,
        )
        if i:
            syncs.append(synced)
            incremental.append(wall)
            incremental_dbt.append(report["seconds"])

    queries = {}
    for name in available():
        run_analysis(settings, name)  # warm-up
        times = [run_analysis(settings, name).seconds * 1000 for _ in range(QUERY_RUNS)]
        queries[name] = spread(times)

    results = {
        "benchmark": "transform",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
        },
        "scale": args.scale,
        "transactions": transactions,
        "initial_sync_seconds": first_sync,
        "full_build_seconds": spread(full),
        "full_build_dbt_seconds": spread(full_dbt),
        "incremental_build_seconds": spread(incremental),
        "incremental_build_dbt_seconds": spread(incremental_dbt),
        "incremental_sync_seconds": spread(syncs),
        "query_ms": queries,
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"transform-{stamp}.json").write_text(json.dumps(results, indent=2))

    def fmt(s: dict[str, float], unit: str = "s", digits: int = 1) -> str:
        return f"{s['median']:.{digits}f} {unit} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f})"

    print(f"\n| measure (scale {args.scale}, {transactions:,} transactions) | median |")
    print("|---|---|")
    print(
        f"| dbt build, full (`transform --full-refresh`), wall | {fmt(results['full_build_seconds'])} |"
    )
    print(f"| dbt build, full, dbt's own time | {fmt(results['full_build_dbt_seconds'])} |")
    print(
        f"| dbt build, incremental after 30 min of activity, wall | {fmt(results['incremental_build_seconds'])} |"
    )
    print(
        f"| dbt build, incremental, dbt's own time | {fmt(results['incremental_build_dbt_seconds'])} |"
    )
    for name, s in queries.items():
        print(f"| query `{name}` | {fmt(s, 'ms', 2)} |")


if __name__ == "__main__":
    main()
