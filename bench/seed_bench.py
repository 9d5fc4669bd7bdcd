"""Benchmark: `seed` at a given scale into PostgreSQL, on the embedded profile, in a throwaway
database `bench_seed` so the user's data is untouched.

    uv run python bench/seed_bench.py --scale 1 [--runs 3] [--no-reference]

Each run, after the platform's seed (generation + load, as `stripe-platform seed` does it), loads
the very same generated rows again, per table, into an empty plain copy of the table (schema
`bench_floor`: same columns, the encrypted ones as the plain text the seed hands to the database,
no indexes, constraints, triggers or partitions), generation and encoding excluded:
- floor: psycopg COPY FROM STDIN (FORMAT binary) of the rows already encoded in PostgreSQL's
  binary COPY format, one connection, one COPY per table;
- peer: PostgreSQL's own `psql \\copy ... FROM 'file' (FORMAT csv)` of the rows already written
  to a CSV file (by the platform's own CSV encoding), one psql process per table (its start and
  TLS connection included).
`transaction` includes its state changes, as the platform's own figure does.

The seed's documents are not written here: the document seed (into the embedded document server)
is measured by mongo_bench.py, beside its own references.

Prints a markdown table (rows/s per table) and writes bench/results/seed-<UTC time>.json.
Goals: scale 1 into PostgreSQL in under 60 s on a 2-core machine (issue 3), under 45 s (issue 24).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from stripe_platform.config import load_settings
from stripe_platform.oltp import db
from stripe_platform.oltp.migrate import migrate
from stripe_platform.runtime.postgres import find_bindir
from stripe_platform.seed import load
from stripe_platform.seed.dataset import build
from stripe_platform.seed.load import seed
from stripe_platform.seed.spec import make_spec

DATABASE = "bench_seed"
FLOOR = "bench_floor"  # the schema of the empty plain copies the references load into
LOCATION_COLUMNS = ("id", "city", "region", "country", "countrycode", "latitude", "longitude")


class NoDocuments:
    """Stands in for the document store: any attribute, item or call, answering [] when called."""

    def __getitem__(self, name):
        return self

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return []


def fresh_database(settings) -> None:
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    with db.connect(settings, database=DATABASE, autocommit=True) as conn:
        migrate(conn)


def loaded_rows(data) -> dict[str, list[tuple[str, pa.Table]]]:
    """Per table of the platform's report: the target table(s) and the very Arrow rows the seed
    loads into them (as seed.load builds its batches; `transaction` takes its state changes)."""
    ent = data.entities
    locations = pa.table({k: [r[i] for r in ent.locations] for i, k in enumerate(LOCATION_COLUMNS)})
    changes = data.state_changes
    changes = changes.add_column(0, "id", pa.array(np.arange(1, changes.num_rows + 1)))
    return {
        "location": [("location", locations)],
        "merchant": [("merchant", ent.merchants)],
        "customer": [("customer", ent.customers)],
        "address": [("address", ent.addresses)],
        "device": [("device", ent.devices)],
        "paymentinstrument": [("paymentinstrument", ent.instruments)],
        "transaction": [
            ("transaction", data.transactions),
            ("transactionstatechanges", changes),
        ],
    }


def _plain_copy(conn, target: str, rows: pa.Table) -> sql.Composed:
    """An empty plain table shaped like `target` for `rows`; returns its COPY column target."""
    table = sql.Identifier(FLOOR, target)
    conn.execute(sql.SQL("CREATE TABLE {} (LIKE {})").format(table, sql.Identifier(target)))
    types = dict(
        conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s",
            (FLOOR, target),
        ).fetchall()
    )
    for column, kind in types.items():
        if column not in rows.column_names:  # filled by the database in the platform's path
            conn.execute(
                sql.SQL("ALTER TABLE {} ALTER {} DROP NOT NULL").format(
                    table, sql.Identifier(column)
                )
            )
        elif kind == "bytea" and pa.types.is_string(rows.schema.field(column).type):
            # encrypted by the database: the seed hands it the plain text
            conn.execute(
                sql.SQL("ALTER TABLE {} ALTER {} TYPE text").format(table, sql.Identifier(column))
            )
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in rows.column_names)
    return sql.SQL("{} ({})").format(table, columns)


def references(settings, data, work: Path) -> dict[str, dict]:
    """Per table: the same rows loaded by the floor (COPY binary) and the peer (psql \\copy csv)."""
    psql = find_bindir() / "psql"
    conninfo = db.conninfo(settings, with_key=False)
    csv_options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    out: dict[str, dict] = {}
    with db.connect(settings, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(FLOOR)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(FLOOR)))
        for entity, targets in loaded_rows(data).items():
            ref = out[entity] = {
                "rows": targets[0][1].num_rows,
                "all_rows": sum(rows.num_rows for _, rows in targets),
                "csv_bytes": 0,
                "binary_bytes": 0,
                "psql_s": 0.0,
                "floor_s": 0.0,
            }
            for target, rows in targets:
                into = _plain_copy(conn, target, rows)
                # peer: the rows as a CSV file (the platform's own encoding), then psql \copy
                path = work / f"{target}.csv"
                pacsv.write_csv(db._copy_ready(rows), path, csv_options)
                ref["csv_bytes"] += path.stat().st_size
                command = f"\\copy {into.as_string(conn)} FROM '{path}' (FORMAT csv)"
                started = time.perf_counter()
                subprocess.run(
                    [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo],
                    input=command,
                    text=True,
                    check=True,
                    timeout=3600,
                )
                ref["psql_s"] += time.perf_counter() - started
                path.unlink()
                # floor: the same rows in PostgreSQL's binary COPY format (encoded by the server,
                # outside the timer), loaded again into the emptied table
                encoded = io.BytesIO()
                with conn.cursor().copy(
                    sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(into)
                ) as copy:
                    for chunk in copy:
                        encoded.write(chunk)
                table = sql.Identifier(FLOOR, target)
                conn.execute(sql.SQL("TRUNCATE {}").format(table))
                payload = encoded.getbuffer()
                ref["binary_bytes"] += len(payload)
                started = time.perf_counter()
                with conn.cursor().copy(
                    sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(into)
                ) as copy:
                    for offset in range(0, len(payload), 1 << 20):
                        copy.write(payload[offset : offset + (1 << 20)])
                ref["floor_s"] += time.perf_counter() - started
                del payload
                count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
                if count[0] != rows.num_rows:
                    raise RuntimeError(f"{FLOOR}.{target}: {count[0]} rows, not {rows.num_rows}")
                conn.execute(sql.SQL("DROP TABLE {}").format(table))
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(FLOOR)))
    return out


def one_run(settings, scale: float, reference: bool = True) -> dict:
    fresh_database(settings)
    s = settings.model_copy(update={"pg_database": DATABASE})
    spec = make_spec(scale=scale, end=dt.date(2026, 11, 1))
    started = time.monotonic()
    data = build(spec)
    generated = time.monotonic() - started
    # PostgreSQL only: no documents are generated or written (mongo_bench measures those).
    with mock.patch.object(load, "document_plan", lambda data: []):
        report = seed(s, data, NoDocuments())
    refs = {}
    if reference:
        work = Path(tempfile.mkdtemp(prefix="seed-bench-"))
        work.chmod(0o755)
        try:
            refs = references(s, data, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "generate_s": generated,
        "oltp_phase_s": report.oltp_seconds,
        "oltp_total_s": generated + report.oltp_seconds,
        "tables": {
            k: {"rows": t.rows, "seconds": t.seconds, "rows_per_s": t.rows_per_second}
            for k, t in report.oltp.items()
        },
        "state_changes": data.state_changes.num_rows,
        "reference": refs,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the floor (COPY binary) and psql peer"
    )
    args = parser.parse_args()
    settings = load_settings()
    db.embedded_cluster(settings).up()
    runs = [one_run(settings, args.scale, not args.no_reference) for _ in range(args.runs)]
    median = statistics.median(r["oltp_total_s"] for r in runs)
    last = runs[-1]
    print(f"\n## seed at scale {args.scale} ({args.runs} run(s); median shown)\n")
    print(
        "| what | rows | seconds | rows/s | floor rows/s (COPY binary) | peer rows/s (psql \\copy) |"
        "\n|---|---:|---:|---:|---:|---:|"
    )
    print(
        f"| generate in memory | | {statistics.median(r['generate_s'] for r in runs):.1f} | | | |"
    )
    for table, t in last["tables"].items():
        extra = f" (+{last['state_changes']:,} state changes)" if table == "transaction" else ""
        ref = last["reference"].get(table)
        floor = f"{ref['rows'] / ref['floor_s']:,.0f}" if ref else ""
        peer = f"{ref['rows'] / ref['psql_s']:,.0f}" if ref else ""
        print(
            f"| PostgreSQL {table}{extra} | {t['rows']:,} | {t['seconds']:.1f} | "
            f"{t['rows_per_s']:,.0f} | {floor} | {peer} |"
        )
    phase = statistics.median(r["oltp_phase_s"] for r in runs)
    print(f"| PostgreSQL phase (partitions, batches, checks, ANALYZE) | | {phase:.1f} | | | |")
    print(
        f"| **generation + PostgreSQL** (min {min(r['oltp_total_s'] for r in runs):.1f}, "
        f"max {max(r['oltp_total_s'] for r in runs):.1f}) | | **{median:.1f}** | | | |"
    )
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
