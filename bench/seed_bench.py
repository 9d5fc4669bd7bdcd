"""Benchmark: `seed` at a given scale into PostgreSQL (and the document store), on the embedded
profile, in a throwaway database `bench_seed` so the user's data is untouched.

    uv run python bench/seed_bench.py --scale 1 [--runs 3] [--no-documents]

Prints a markdown table (rows/s per table) and writes bench/results/seed-<UTC time>.json.
Goal (issue 3): scale 1 into PostgreSQL in under 60 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

from psycopg import sql

from stripe_platform.config import load_settings
from stripe_platform.docstore.client import connect as connect_docs
from stripe_platform.oltp import db
from stripe_platform.oltp.migrate import migrate
from stripe_platform.seed.dataset import build
from stripe_platform.seed.load import seed
from stripe_platform.seed.spec import make_spec

DATABASE = "bench_seed"


class NoDocuments:
    """Stands in for the document store when only PostgreSQL is measured."""

    def __getitem__(self, name):
        return self

    def __getattr__(self, name):
        return lambda *args, **kwargs: []


def fresh_database(settings) -> None:
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    with db.connect(settings, database=DATABASE, autocommit=True) as conn:
        migrate(conn)


def one_run(settings, scale: float, documents: bool, number: int) -> dict:
    fresh_database(settings)
    docs_db = f"{DATABASE}_{os.getpid()}_{number}"  # an empty document database per run
    s = settings.model_copy(update={"pg_database": DATABASE, "mongodb_database": docs_db})
    docs = connect_docs(s) if documents else NoDocuments()
    spec = make_spec(scale=scale, end=dt.date(2026, 11, 1))
    started = time.monotonic()
    data = build(spec)
    generated = time.monotonic() - started
    report = seed(s, data, docs)
    if documents:
        docs.client.drop_database(docs_db)
    return {
        "generate_s": generated,
        "oltp_phase_s": report.oltp_seconds,
        "oltp_total_s": generated + report.oltp_seconds,
        "tables": {
            k: {"rows": t.rows, "seconds": t.seconds, "rows_per_s": t.rows_per_second}
            for k, t in report.oltp.items()
        },
        "state_changes": data.state_changes.num_rows,
        "documents": {
            k: {"rows": t.rows, "seconds": t.seconds, "rows_per_s": t.rows_per_second}
            for k, t in report.documents.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-documents", action="store_true")
    args = parser.parse_args()
    settings = load_settings()
    db.embedded_cluster(settings).up()
    runs = [one_run(settings, args.scale, not args.no_documents, n) for n in range(args.runs)]
    median = statistics.median(r["oltp_total_s"] for r in runs)
    last = runs[-1]
    print(f"\n## seed at scale {args.scale} ({args.runs} run(s); median shown)\n")
    print("| what | rows | seconds | rows/s |\n|---|---:|---:|---:|")
    print(f"| generate in memory | | {statistics.median(r['generate_s'] for r in runs):.1f} | |")
    for table, t in last["tables"].items():
        extra = f" (+{last['state_changes']:,} state changes)" if table == "transaction" else ""
        print(
            f"| PostgreSQL {table}{extra} | {t['rows']:,} | {t['seconds']:.1f} | {t['rows_per_s']:,.0f} |"
        )
    phase = statistics.median(r["oltp_phase_s"] for r in runs)
    print(f"| PostgreSQL phase (partitions, batches, checks, ANALYZE) | | {phase:.1f} | |")
    print(
        f"| **generation + PostgreSQL** (min {min(r['oltp_total_s'] for r in runs):.1f}, "
        f"max {max(r['oltp_total_s'] for r in runs):.1f}) | | **{median:.1f}** | |"
    )
    for name, t in last["documents"].items() if not args.no_documents else ():
        print(f"| documents {name} | {t['rows']:,} | {t['seconds']:.1f} | {t['rows_per_s']:,.0f} |")
    out = Path(__file__).parent / "results" / f"seed-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "seed",
                "scale": args.scale,
                "runs": runs,
                "median_oltp_total_s": median,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
            },
            indent=2,
        )
    )
    print(f"\nwritten {out}")
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE))
        )


if __name__ == "__main__":
    main()
