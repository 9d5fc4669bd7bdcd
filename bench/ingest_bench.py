"""Benchmark: extracting Transaction from PostgreSQL, beside its floor and peers, and CDC.

    uv run python bench/ingest_bench.py --scale 1 [--runs 3] [--no-peer]

In one run on the embedded profile, in a database `bench_ingest` seeded at the given scale:
- floor: COPY (binary) of the table drained to nothing;
- peers doing the same extract into parquet: COPY csv -> pyarrow csv reader -> parquet; and, each
  in a virtualenv of its own (skipped with --no-peer or when they cannot be installed),
  connectorx over one connection and split over one connection per core (`partition_on` id), and
  DuckDB's postgres scanner (duckdb 1.5.5 with the extension's wheel from the package registry:
  duckdb 2.0, which the platform uses, has no offline build of it) with a thread per core;
- the platform's full-refresh sync (snapshot) of the transaction stream into the lake (parquet) and
  into DuckDB;
- CDC throughput, --runs rounds: changes/s of a sync into DuckDB after a 100,000-row UPDATE, beside
  the same changes read by its floor (the server's logical decoding alone: a second pgoutput slot
  over the same publication peeked with pg_logical_slot_peek_binary_changes and counted in SQL, no
  row sent) and by a peer (PostgreSQL's own pg_recvlogical streaming a third slot to /dev/null up
  to the UPDATE's end LSN); the reference slots are made before the UPDATE and dropped after;
- CDC latency, --runs rounds: commit-to-warehouse latency p50/p95/p99 of each round
  under a steady write load (`seed --tps 50`), once with back-to-back `Engine.sync` runs and once
  with the long-lived `engine.follow` loop. Latency is measured per source transaction from its
  commit timestamp (as pgoutput reports it) to the moment the destination committed the batch;
  the time from the payment's `createdat` is printed too (the load generator backdates it by up
  to 1 s, so it is not a commit-to-warehouse figure).
Prints a markdown table and writes bench/results/ingest-<UTC time>.json. Medians of --runs runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from stripe_platform.config import load_settings
from stripe_platform.docstore.client import connect as connect_docs
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import Engine, follow
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.lake.target import LakeRaw
from stripe_platform.lake.writer import LakeWriter
from stripe_platform.oltp import db
from stripe_platform.oltp.migrate import migrate
from stripe_platform.runtime import embedded
from stripe_platform.runtime.postgres import find_bindir
from stripe_platform.seed.dataset import build
from stripe_platform.seed.load import seed
from stripe_platform.seed.spec import make_spec
from stripe_platform.warehouse.duckdb import DuckDBRaw

DATABASE = "bench_ingest"
QUERY = "SELECT * FROM transaction"


def prepare_database(settings, scale: float):
    s = settings.model_copy(update={"pg_database": DATABASE, "mongodb_database": DATABASE})
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    spec = make_spec(scale=scale, end=dt.date(2026, 11, 1), max_documents=1000)
    with db.connect(s, autocommit=True) as conn:
        migrate(conn)
        seeded = [key for (key,) in conn.execute("SELECT run_key FROM platform.seed_run")]
    # The database is the benchmark's own: data of another scale (or anything else) is replaced,
    # the same run resumed.
    replace = seeded != [spec.run_key]
    print(
        f"seeding {spec.n_transactions:,} transactions "
        f"({'replacing what the database held' if replace else 'resumes if already there'}) ...",
        flush=True,
    )
    seed(s, build(spec), connect_docs(s), reset_first=replace)
    return s


CONDITIONS: list[dict] = []  # per timed step: this process's CPU seconds and the load average


def timed(fn, step: str = ""):
    """Wall seconds of fn(), recording beside it this process's CPU time (all its threads) and
    the 1-minute load average: on a shared 2-core machine other work shows up there."""
    cpu = time.process_time()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    CONDITIONS.append(
        {
            "step": step,
            "seconds": seconds,
            "process_cpu_s": time.process_time() - cpu,
            "load_1m": os.getloadavg()[0],
        }
    )
    return seconds, result


def floor_copy_binary(s) -> tuple[int, int]:
    rows = nbytes = 0
    with (
        db.connect(s) as conn,
        conn.cursor().copy(f"COPY ({QUERY}) TO STDOUT (FORMAT binary)") as copy,
    ):
        for chunk in copy:
            nbytes += len(chunk)
    with db.connect(s) as conn:
        rows = conn.execute("SELECT count(*) FROM transaction").fetchone()[0]
    return rows, nbytes


def peer_csv_arrow(s, out: Path) -> int:
    buf = io.BytesIO()
    with (
        db.connect(s) as conn,
        conn.cursor().copy(f"COPY ({QUERY}) TO STDOUT (FORMAT csv, HEADER)") as copy,
    ):
        for chunk in copy:
            buf.write(chunk)
    buf.seek(0)
    table = pacsv.read_csv(buf)
    pq.write_table(table, out)
    return table.num_rows


# Each peer script times its own connection and extract (its interpreter's start and imports
# excluded) and prints "<rows> <seconds>".
CONNECTORX = """
import sys, time, connectorx as cx, pyarrow.parquet as pq
url, query, out, partitions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
split = {"partition_on": "id", "partition_num": partitions} if partitions > 1 else {}
t = time.perf_counter()
table = cx.read_sql(url, query, return_type="arrow", **split)
pq.write_table(table, out)
print(table.num_rows, time.perf_counter() - t)
"""
DUCKDB_SCANNER = """
import os, sys, time, duckdb, duckdb_extension_postgres_scanner as ext
conninfo, table, out = sys.argv[1], sys.argv[2], sys.argv[3]
path = os.path.join(os.path.dirname(ext.__file__), "extensions", "v" + duckdb.__version__,
                    "postgres_scanner.duckdb_extension")
con = duckdb.connect(config={"allow_unsigned_extensions": "true", "threads": os.cpu_count()})
con.execute("SET enable_progress_bar = false")
con.execute(f"LOAD '{path}'")
t = time.perf_counter()
con.execute(f"ATTACH '{conninfo}' AS pg (TYPE postgres, READ_ONLY)")
con.execute(f"COPY (SELECT * FROM pg.public.{table}) TO '{out}' (FORMAT parquet)")
seconds = time.perf_counter() - t
print(con.execute(f"SELECT count(*) FROM '{out}'").fetchone()[0], seconds)
"""
PEER_PACKAGES = {
    "connectorx": ["connectorx", "pyarrow"],
    # the extension's wheel is built for one DuckDB release: pin both
    "duckdb": ["duckdb==1.5.5", "duckdb-extension-postgres-scanner==1.5.5"],
}


def uv_command() -> list[str]:
    """uv as the bootstrap chose it (scripts/bootstrap.sh's uv_cmd; the Makefile's UV): the one
    running us under `uv run` (it says which in $UV), else `uv` on PATH, else the copy installed
    with pip for the system's python3 (`python3 -m uv`)."""
    if os.environ.get("UV"):
        return [os.environ["UV"]]
    on_path = shutil.which("uv")
    return [on_path] if on_path else ["python3", "-m", "uv"]


def _peer_python(name: str) -> Path | str:
    """The interpreter of the peer's own virtualenv (made on first use), or why it is missing."""
    venv = Path(tempfile.gettempdir()) / f"stripe-platform-bench-{name}"
    python = venv / "bin" / "python"
    if not python.exists():
        uv = uv_command()
        for step in (
            ["venv", "-q", "-p", sys.executable, str(venv)],
            ["pip", "install", "-q", "-p", str(python), *PEER_PACKAGES[name]],
        ):
            try:
                done = subprocess.run([*uv, *step], capture_output=True, text=True, check=False)
            except OSError as exc:  # no uv at all: the peer is reported as not run
                return f"not run: {' '.join(uv)}: {exc}"[:160]
            if done.returncode:
                shutil.rmtree(venv, ignore_errors=True)
                return f"not run: could not install {name} ({done.stderr.strip()[:120]})"
    return python


def _run_peer(name: str, script: str, *args: str) -> tuple[float, int] | str:
    python = _peer_python(name)
    if isinstance(python, str):
        return python
    run = subprocess.run(
        [str(python), "-c", script, *args], capture_output=True, text=True, check=False
    )
    if run.returncode:
        return f"not run: {run.stderr.strip().splitlines()[-1][:160] if run.stderr else 'failed'}"
    rows, seconds = run.stdout.splitlines()[-1].split()
    return float(seconds), int(rows)


def peer_connectorx(s, out: Path, partitions: int = 1) -> tuple[float, int] | str:
    info = conninfo_to_dict(db.conninfo(s, with_key=False))
    url = (
        f"postgresql://{info['user']}:{info['password']}@{info['host']}:{info['port']}/{info['dbname']}"
        "?sslmode=require"
    )
    return _run_peer("connectorx", CONNECTORX, url, QUERY, str(out), str(partitions))


def peer_duckdb_scanner(s, out: Path) -> tuple[float, int] | str:
    info = conninfo_to_dict(db.conninfo(s, with_key=False))
    keep = {k: info[k] for k in ("host", "port", "user", "password", "dbname")}
    conninfo = make_conninfo(**keep, sslmode="require")
    return _run_peer("duckdb", DUCKDB_SCANNER, conninfo, "transaction", str(out))


def only_transaction(catalog, name: str):
    """The connection, resolved, syncing its Transaction stream only."""
    connection = catalog.resolve(name)
    return dataclasses.replace(connection, streams=(connection.stream("transaction"),))


def platform_snapshot(s, connection, writer) -> tuple[float, int]:
    with db.connect(s, autocommit=True) as conn:
        cdc.drop_slot(conn, connection.slot(conn.info.dbname))
    seconds, report = timed(
        lambda: Engine(s, connection, writer).sync(), f"snapshot {connection.name}"
    )
    return seconds, report.streams["transaction"].rows


CDC_ROWS = 100_000  # rows of the UPDATE whose changes one CDC round syncs


def _peek_floor(s, slot: str, publication: str, end: str) -> tuple[int, int]:
    """The server's logical decoding alone: pgoutput over `slot` up to `end`, counted in SQL and
    drained with nothing decoded client-side. Returns (row changes, bytes of pgoutput)."""
    with db.connect(s, autocommit=True) as conn:
        changes, nbytes = conn.execute(
            "SELECT count(*) FILTER (WHERE get_byte(data, 0) IN (73, 85, 68)), "  # I, U, D
            "coalesce(sum(length(data)), 0) FROM pg_logical_slot_peek_binary_changes("
            "%s, %s::pg_lsn, NULL, 'proto_version', '1', 'publication_names', %s)",
            (slot, end, publication),
        ).fetchone()
    return changes, nbytes


def _recvlogical(s, slot: str, publication: str, end: str) -> float | str:
    """PostgreSQL's own pg_recvlogical streaming the slot's pgoutput to /dev/null, up to `end`
    (wall time of the process: start, TLS connection and stream)."""
    try:
        binary = find_bindir() / "pg_recvlogical"
    except Exception as exc:  # no PostgreSQL binaries: reported in the result
        return f"not run: {exc}"[:160]
    if not binary.is_file():
        return f"not run: no {binary}"
    command = [
        str(binary),
        *("-d", db.conninfo(s, with_key=False), "--slot", slot, "--start"),
        *("--endpos", end, "--no-loop", "-f", "/dev/null"),
        *("-o", "proto_version=1", "-o", f"publication_names={publication}"),
    ]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.perf_counter() - started
    if run.returncode:
        return f"not run: pg_recvlogical exit {run.returncode}: {run.stderr.strip()[-160:]}"
    return seconds


def cdc_round(s, connection, writer, number: int) -> dict:
    """One CDC throughput round: reference slots made, a CDC_ROWS-row UPDATE committed, then the
    same changes read by the floor (SQL peek of a second pgoutput slot), the peer (pg_recvlogical
    on a third) and the platform (`Engine.sync` into the warehouse, its own slot)."""
    publication = connection.publication
    floor_slot = f"bench_cdc_floor_{os.getpid()}_{number}"
    peer_slot = f"bench_cdc_recvlogical_{os.getpid()}_{number}"
    with db.connect(s, autocommit=True) as conn:
        for slot in (floor_slot, peer_slot):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    try:
        with db.connect(s, autocommit=True) as conn:
            conn.execute("SET synchronous_commit = on")  # decoding reads flushed WAL only
            conn.execute("UPDATE transaction SET updatedat = now() WHERE id <= %s", (CDC_ROWS,))
            end = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        floor_s, (floor_changes, pgoutput_bytes) = timed(
            lambda: _peek_floor(s, floor_slot, publication, end), "cdc floor"
        )
        peer = _recvlogical(s, peer_slot, publication, end)
        seconds, report = timed(lambda: Engine(s, connection, writer).sync(), "cdc throughput")
        checkpoint = _checkpoint(writer)
    finally:
        with db.connect(s, autocommit=True) as conn:
            for slot in (floor_slot, peer_slot):
                cdc.drop_slot(conn, slot)
    stream = report.streams.get("transaction")
    return {
        "changes": stream.rows if stream else 0,
        "seconds": seconds,
        "floor_changes": floor_changes,
        "floor_seconds": floor_s,
        "pgoutput_bytes": pgoutput_bytes,
        "recvlogical_seconds": peer,
        "checkpoint_seconds": checkpoint,
    }


def _checkpoint(writer) -> float:
    """Seconds of a DuckDB CHECKPOINT right after a sync: the work its write-ahead log defers
    (the raw writer checkpoints at 1 GB of log, or on closing), reported beside the sync."""
    return timed(lambda: writer.conn.execute("CHECKPOINT"), "checkpoint")[0]


def _load(s, seconds: float, tps: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "STRIPE_PLATFORM_HOME": str(s.home_dir),
        "STRIPE_PLATFORM_PG_DATABASE": DATABASE,
        "STRIPE_PLATFORM_MONGODB_DATABASE": DATABASE,
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stripe_platform.cli",
            "seed",
            "--tps",
            str(tps),
            "--duration",
            str(seconds),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )


class TimingWriter:
    """Wraps a raw writer: when a batch's write (data + state) has committed, records for each
    changed row in it the time from its transaction's commit (``_ab_cdc_updated_at`` is the commit
    timestamp pgoutput reports) to now, and for new payments the time from their ``createdat``."""

    def __init__(self, inner, since: dt.datetime) -> None:
        self.inner = inner
        self.since = since
        self.commit: list[float] = []  # one per changed row
        self.created: list[float] = []  # one per new payment
        self.transactions: set[dt.datetime] = set()  # distinct commit times

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, stream, batch, **kwargs):
        result = self.inner.write(stream, batch, **kwargs)
        landed = dt.datetime.now(dt.UTC)
        if "_ab_cdc_updated_at" in batch.column_names:
            for committed in batch.column("_ab_cdc_updated_at").to_pylist():
                if committed is not None and committed >= self.since:
                    self.commit.append((landed - committed).total_seconds())
                    self.transactions.add(committed)
        if stream.name == "postgres_transaction" and "createdat" in batch.column_names:
            for created in batch.column("createdat").to_pylist():
                if created is not None and created >= self.since:
                    self.created.append((landed - created).total_seconds())
        return result


def cdc_latency_sync_loop(
    s, connection, writer, seconds: float = 20.0, tps: int = 50
) -> TimingWriter:
    """The former method: back-to-back `Engine.sync` runs while the load runs."""
    timing = TimingWriter(writer, dt.datetime.now(dt.UTC))
    load = _load(s, seconds, tps)
    while load.poll() is None:
        Engine(s, connection, timing).sync()
    return timing


def cdc_latency_follow(
    s, connection, writer, seconds: float = 20.0, tps: int = 50, interval: float = 0.1
) -> TimingWriter:
    """`engine.follow`: one long-lived CDC loop polling the slot every `interval` seconds."""
    timing = TimingWriter(writer, dt.datetime.now(dt.UTC))
    stop = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            follow(s, connection, stop, interval, writer=timing)
        except BaseException as exc:  # reported below
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    load = _load(s, seconds, tps)
    load.wait()
    time.sleep(1.0)  # the last transactions land
    stop.set()
    thread.join()
    if failed:
        raise failed[0]
    return timing


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def percentiles(timing: TimingWriter, what: str) -> dict:
    """p50/p95/p99 of one round's latencies from the commit or from `createdat`."""
    values = timing.commit if what == "commit" else timing.created
    return {
        "n": len(values),
        "transactions": len(timing.transactions),
        "p50": pct(values, 0.5),
        "p95": pct(values, 0.95),
        "p99": pct(values, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()
    settings = load_settings()
    embedded.up(settings)
    s = prepare_database(settings, args.scale)
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    catalog = load_catalog()
    results: dict[str, list] = {
        k: []
        for k in (
            "floor",
            "csv_arrow",
            "connectorx",
            "connectorx_partitioned",
            "duckdb_scanner",
            "lake",
            "duckdb",
            "duckdb_checkpoint",
        )
    }
    rows = nbytes = 0
    for _ in range(args.runs):
        t, (rows, nbytes) = timed(lambda: floor_copy_binary(s), "floor")
        results["floor"].append(t)
        results["csv_arrow"].append(
            timed(lambda: peer_csv_arrow(s, work / "peer.parquet"), "csv_arrow")[0]
        )
        if not args.no_peer:
            for key, measure in (
                ("connectorx", lambda: peer_connectorx(s, work / "cx.parquet")),
                (
                    "connectorx_partitioned",
                    lambda: peer_connectorx(s, work / "cx.parquet", os.cpu_count() or 2),
                ),
                ("duckdb_scanner", lambda: peer_duckdb_scanner(s, work / "scanner.parquet")),
            ):
                done = measure()
                results[key].append(done[0] if isinstance(done, tuple) else done)
        lake = LakeRaw(LakeWriter(str(work / "lake")), "postgres")
        results["lake"].append(
            platform_snapshot(s, only_transaction(catalog, "postgres-to-s3"), lake)[0]
        )
        shutil.rmtree(work / "lake", ignore_errors=True)
        (work / "w.duckdb").unlink(missing_ok=True)
        warehouse = DuckDBRaw(duckdb.connect(str(work / "w.duckdb")))
        results["duckdb"].append(
            platform_snapshot(s, only_transaction(catalog, "postgres-to-snowflake"), warehouse)[0]
        )
        results["duckdb_checkpoint"].append(_checkpoint(warehouse))
    wh = only_transaction(catalog, "postgres-to-snowflake")
    rounds = [cdc_round(s, wh, warehouse, n) for n in range(args.runs)]
    latency = [
        {
            "sync_loop": cdc_latency_sync_loop(s, wh, warehouse),
            "follow": cdc_latency_follow(s, wh, warehouse),
        }
        for _ in range(args.runs)
    ]

    def line(name: str, key: str) -> str:
        values = [v for v in results[key] if isinstance(v, float)]
        if not values:
            return f"| {name} | {results[key][0] if results[key] else 'not run'} | | | |"
        med = statistics.median(values)
        return (
            f"| {name} | {rows / med:,.0f} | {nbytes / med / 1e6:,.0f} | {med:.2f} "
            f"(min {min(values):.2f}, max {max(values):.2f}) | {results['floor'][0] and med / statistics.median(results['floor']):.1f}x floor |"
        )

    print(
        f"\n## extract of transaction ({rows:,} rows, {nbytes / 1e6:,.0f} MB as COPY binary), "
        f"{args.runs} run(s)\n"
    )
    print("| what | rows/s | MB/s | seconds | vs floor |\n|---|---:|---:|---:|---:|")
    print(line("floor: COPY binary drained", "floor"))
    print(line("peer: COPY csv -> pyarrow -> parquet", "csv_arrow"))
    print(line("peer: connectorx -> parquet (own venv)", "connectorx"))
    print(line("peer: connectorx, a partition per core -> parquet", "connectorx_partitioned"))
    print(line("peer: DuckDB postgres scanner -> parquet (own venv)", "duckdb_scanner"))
    print(line("platform: snapshot sync -> lake parquet", "lake"))
    print(line("platform: snapshot sync -> DuckDB raw", "duckdb"))
    print(
        f"\n(DuckDB raw: a CHECKPOINT right after the snapshot took a median "
        f"{statistics.median(results['duckdb_checkpoint']):.2f} s more, not in the figures: the "
        "raw writer checkpoints at 1 GB of write-ahead log or on closing)"
    )
    print(
        f"\nCDC of an UPDATE of the rows with id <= {CDC_ROWS:,}, {args.runs} round(s), per round: "
        "changes/s of the "
        "platform (Engine.sync into DuckDB), the floor (pgoutput peeked and counted in SQL) and the "
        "peer (pg_recvlogical to /dev/null)\n"
    )
    print(
        "| round | changes | platform | platform + CHECKPOINT | floor | pg_recvlogical |\n"
        "|---:|---:|---:|---:|---:|---:|"
    )
    for n, r in enumerate(rounds):
        peer = r["recvlogical_seconds"]
        peer = f"{r['floor_changes'] / peer:,.0f}" if isinstance(peer, float) else peer
        with_checkpoint = r["changes"] / (r["seconds"] + r["checkpoint_seconds"])
        print(
            f"| {n} | {r['changes']:,} | {r['changes'] / r['seconds']:,.0f} | "
            f"{with_checkpoint:,.0f} | {r['floor_changes'] / r['floor_seconds']:,.0f} | {peer} |"
        )
    print(
        f"\nCDC latency under 50 tps (seed --tps 50 for 20 s), per changed row, {args.runs} "
        "round(s):\n"
    )
    print(
        "| round | loop | measured from | rows (transactions) | p50 s | p95 s | p99 s |\n"
        "|---:|---|---|---:|---:|---:|---:|"
    )
    for n, timings in enumerate(latency):
        for name, timing in (
            ("back-to-back Engine.sync", timings["sync_loop"]),
            ("engine.follow, 0.1 s poll", timings["follow"]),
        ):
            for what in ("commit", "created"):
                figure = percentiles(timing, what)
                print(
                    f"| {n} | {name} | {what} | {figure['n']} ({figure['transactions']}) | "
                    f"{figure['p50']:.2f} | {figure['p95']:.2f} | {figure['p99']:.2f} |"
                )
    print(
        "\n(createdat is set by the load generator up to 1 s before its transaction even starts; "
        "commit is the source commit time pgoutput reports: the commit-to-warehouse figure.)"
    )
    out = (
        Path(__file__).parent / "results" / f"ingest-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    )
    out.write_text(
        json.dumps(
            {
                "benchmark": "ingest",
                "scale": args.scale,
                "rows": rows,
                "copy_binary_bytes": nbytes,
                "seconds": results,
                "cdc": {
                    "update_rows": CDC_ROWS,
                    "publication": wh.publication,
                    "rounds": rounds,
                    # one list per figure, a value per round (the first is the warm-up under run_all)
                    "changes": [r["changes"] for r in rounds],
                    "seconds": [r["seconds"] for r in rounds],
                    "floor_changes": [r["floor_changes"] for r in rounds],
                    "floor_seconds": [r["floor_seconds"] for r in rounds],
                    "recvlogical_seconds": [r["recvlogical_seconds"] for r in rounds],
                    "checkpoint_seconds": [r["checkpoint_seconds"] for r in rounds],
                },
                # per loop and origin, one figure per round (the first is the warm-up under run_all)
                "latency_s": {
                    f"{loop}_{what}{'at' if what == 'created' else ''}": {
                        "runs": [percentiles(timings[loop], what) for timings in latency]
                    }
                    for loop in ("sync_loop", "follow")
                    for what in ("commit", "created")
                },
                "load_average_at_end": os.getloadavg(),
                "conditions": CONDITIONS,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nwritten {out}")
    with db.connect(s, autocommit=True) as conn:
        for name in ("postgres-to-s3", "postgres-to-snowflake"):
            cdc.drop_slot(conn, catalog.resolve(name).slot(conn.info.dbname))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
