"""Benchmark: the audit trail, collector and rules (issue 22, docs/audit.md).

    uv run python bench/audit_bench.py [--scale 1] [--runs 3] [--records 1000000] [--output FILE]

One platform home of its own (a temporary one, its own embedded cluster on a free port), one
database. A section a measure, each a function ``measure_<what>(ctx, args) -> dict`` listed in
MEASURES; the JSON document has one key a section:

- ``verify`` (W1): ``audit verify`` over ``--records`` records (1,000,000 by default) of one
  stream, built fast (the hash chain computed here with the trail's own hash function, loaded with
  COPY, one signed checkpoint at the head), then verified ``--runs`` times. Goal: < 10 s.
- ``rules`` (W3): the detection rules over the busiest day of the seed's Log documents at
  ``--scale`` with the 15 days before as history, ``--runs`` times, then over all 90 days once
  (documents a second, precision/recall/false alerts). Goal: < 10 s for the day.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import sql

from stripe_platform.audit import trail
from stripe_platform.config import Settings, load_settings
from stripe_platform.oltp import db
from stripe_platform.oltp.migrate import migrate
from stripe_platform.runtime import embedded

DATABASE = "audit_bench"
VERIFY_GOAL_S = 10.0


@dataclass
class Context:
    settings: Settings  # pointed at DATABASE
    home: Path


# -- verify (W1) -----------------------------------------------------------------------------------
def build_trail(s: Settings, stream: str, count: int) -> float:
    """``count`` chained records of ``stream`` (payloads shaped like a collected log statement),
    COPYed in; returns the seconds it took."""
    started = time.perf_counter()
    at0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    prev = trail.ZERO_HASH
    with db.connect(s, with_key=False) as conn:
        with conn.cursor().copy(
            "COPY audit.trail_record (stream, seq, at, kind, source_key, payload, prev_hash, hash) "
            "FROM STDIN"
        ) as copy:
            for seq in range(1, count + 1):
                at = trail.format_at(at0 + dt.timedelta(milliseconds=37 * seq))
                source_key = f"postgres:postgresql-2026-01-01.json:{seq * 211}"
                payload = trail.canonical_payload(
                    {
                        "user": f"user_{seq % 97}",
                        "dbname": "stripe",
                        "session_id": f"{seq // 50:x}.{seq % 7}",
                        "error_severity": "LOG",
                        "message": f"statement: SELECT * FROM customer WHERE id = {seq % 5000}",
                    }
                )
                digest = trail.record_hash(prev, stream, seq, at, "statement", source_key, payload)
                copy.write_row((stream, seq, at, "statement", source_key, payload, prev, digest))
                prev = digest
        conn.execute(
            "INSERT INTO audit.trail_head (stream, seq, hash) VALUES (%s, %s, %s)",
            (stream, count, prev),
        )
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE audit.trail_record")
    trail.checkpoint(s, stream=stream)
    return time.perf_counter() - started


def measure_verify(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    s = ctx.settings
    build_s = build_trail(s, "postgres", args.records)
    print(f"verify: {args.records:,} records built and loaded in {build_s:.1f} s", flush=True)
    seconds = []
    for run in range(args.runs):
        started = time.perf_counter()
        report = trail.verify(s)
        seconds.append(time.perf_counter() - started)
        if not report.ok or report.records != args.records:
            raise RuntimeError(f"verify failed on an untouched trail: {report.as_dict()}")
        print(f"verify: run {run + 1}: {seconds[-1]:.2f} s", flush=True)
    median = statistics.median(seconds)
    return {
        "records": args.records,
        "build_seconds": build_s,
        "seconds": seconds,
        "median_seconds": median,
        "records_per_second": args.records / median,
        "goal_seconds": VERIFY_GOAL_S,
        "goal_met": median < VERIFY_GOAL_S,
    }


# -- rules (W3) ------------------------------------------------------------------------------------
RULES_GOAL_S = 10.0


def measure_rules(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """The detection rules (audit/detect.py) over the busiest day of the seed's Log documents at
    --scale, with the 15 days before as the baselines' history (what the hourly watch reads), then
    over the whole 90 days at once (throughput). No database: the seeded users are not roles."""
    import numpy as np

    from stripe_platform.audit import detect
    from stripe_platform.seed.logs import log_documents
    from stripe_platform.seed.spec import SeedSpec

    spec = SeedSpec(scale=args.scale, seed=42)
    docs = list(log_documents(spec, np.random.default_rng([spec.seed, 6])))
    by_day: dict[dt.date, list[dict]] = {}
    for d in docs:
        by_day.setdefault(d["session_start"].date(), []).append(d)
    day = max(by_day, key=lambda k: len(by_day[k]))
    history = [d for k, v in by_day.items() if day - dt.timedelta(days=16) <= k < day for d in v]
    rules = detect.load_rules()
    context = detect.load_context(ctx.settings, database=False)
    now = dt.datetime.now(dt.UTC)
    seconds, findings = [], []
    for run in range(args.runs):
        detect._statement_shape.cache_clear()  # each run parses its statements afresh
        started = time.perf_counter()
        findings = detect.detect(
            ctx.settings, by_day[day], now=now, history=history, rules=rules, context=context
        )
        seconds.append(time.perf_counter() - started)
        print(f"rules: run {run + 1}: {seconds[-1]:.3f} s over {len(by_day[day])} documents")
    started = time.perf_counter()
    everything = detect.detect(ctx.settings, docs, now=now, rules=rules, context=context)
    all_s = time.perf_counter() - started
    quality = detect.evaluate(docs, everything, rules)
    median = statistics.median(seconds)
    return {
        "day": day.isoformat(),
        "day_documents": len(by_day[day]),
        "history_documents": len(history),
        "rules": len(rules),
        "seconds": seconds,
        "median_seconds": median,
        "findings_that_day": len(findings),
        "all_days_documents": len(docs),
        "all_days_seconds": all_s,
        "all_days_documents_per_second": len(docs) / all_s,
        "precision": quality["overall"]["precision"],
        "recall": quality["overall"]["recall"],
        "false_alerts_per_day": quality["false_alerts"]["per_day"],
        "goal_seconds": RULES_GOAL_S,
        "goal_met": median < RULES_GOAL_S,
    }


# -- collect (W2) ----------------------------------------------------------------------------------
def write_logs(directory: Path, lines: int, day: int = 7) -> dict[str, Path]:
    """Synthetic logs shaped like the platform's: PostgreSQL jsonlog sessions (connection, a few
    statements with literals, an error now and then, disconnection) for 4/5 of ``lines``, the
    API's access log (three events a request) for the rest."""
    import random

    rng = random.Random(7)
    pg_dir, api_dir = directory / "pg", directory / "api"
    pg_dir.mkdir(parents=True)
    api_dir.mkdir(parents=True)
    t0 = dt.datetime(2026, 12, 7, 8, tzinfo=dt.UTC)
    pg_lines, n, session = [], 0, 0
    while n < lines * 4 // 5:
        session += 1
        pid = 1000 + session % 50000
        sid = f"6754{session:04x}.{pid:x}"
        base = {"user": f"user_{session % 40}", "dbname": "stripe", "pid": pid,
                "remote_host": f"10.0.{session % 7}.{session % 250}", "session_id": sid,
                "session_start": (t0 + dt.timedelta(seconds=session)).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "application_name": "psql", "backend_type": "client backend"}  # fmt: skip
        messages = ["connection authorized: user=x database=stripe"]
        for q in range(rng.randint(2, 8)):
            messages.append(f"statement: SELECT * FROM customer WHERE id = {rng.randint(1, 10**6)}"
                            f" AND email = 'user{q}@example.com'")  # fmt: skip
        messages.append("disconnection: session time: 0:00:01.000 user=x")
        for k, message in enumerate(messages):
            when = t0 + dt.timedelta(seconds=session, milliseconds=k)
            line = {"timestamp": when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC", **base,
                    "error_severity": "LOG", "state_code": "00000", "message": message}  # fmt: skip
            pg_lines.append(json.dumps(line, separators=(",", ":")))
            n += 1
    (pg_dir / f"postgresql-2026-12-{day:02d}.json").write_text("\n".join(pg_lines) + "\n")
    api_lines = []
    for i in range(lines - n):
        when = t0 + dt.timedelta(milliseconds=10 * i)
        api_lines.append(json.dumps({
            "time": when.isoformat(timespec="microseconds"), "v": 1,
            "kind": "request" if i % 3 == 2 else "authz", "user": f"api_user_{i % 30}",
            "source": "10.9.0.1", "resource": "/customers/12", "action": "GET",
            "outcome": "allow", "request_id": f"{i // 3:016x}", "pid": 4242,
            "detail": {"status": 200}}, separators=(",", ":")))  # fmt: skip
    (api_dir / f"api-2026-12-{day:02d}.jsonl").write_text("\n".join(api_lines) + "\n")
    return {"postgres": pg_dir, "api": api_dir}


def read_raw(paths: list[Path], parse: bool) -> int:
    """The floor: every line of the files read (and, with ``parse``, decoded as JSON)."""
    count = 0
    for path in paths:
        with path.open("rb") as f:
            for line in f:
                if parse:
                    json.loads(line)
                count += 1
    return count


def measure_collect(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """``audit collect`` over --collect-lines synthetic log lines (each run: files of another day,
    so new trail records; the collector's state reset; a new document database and lake): lines/s
    into Log, the trail and the lake, beside the floor of reading the same files raw (lines only,
    then lines parsed as JSON)."""
    from stripe_platform.audit import collector
    from stripe_platform.docstore import client as docstore

    lines = args.collect_lines
    directory = ctx.home / "collect-bench"
    shutil.rmtree(directory, ignore_errors=True)
    raw_s, parsed_s, runs = [], [], []
    for run in range(args.runs):
        dirs = write_logs(directory / f"run{run}", lines, day=1 + run)
        sources = [
            collector.LogSource("postgres", dirs["postgres"], "postgresql-*.json"),
            collector.LogSource("api", dirs["api"], "api-*.jsonl"),
        ]
        files = [p for d in dirs.values() for p in sorted(d.iterdir())]
        size = sum(p.stat().st_size for p in files)
        started = time.perf_counter()
        assert read_raw(files, parse=False) == lines
        raw_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        read_raw(files, parse=True)
        parsed_s.append(time.perf_counter() - started)
        s = ctx.settings.model_copy(
            update={
                "mongodb_database": f"collect_bench_{run}",
                "lake_uri": str(directory / f"lake{run}"),
            }
        )
        with db.connect(s, autocommit=True, with_key=False) as conn:
            for table in ("collector_file", "collector_source", "collector_session"):
                conn.execute(f"DELETE FROM audit.{table}")
        started = time.perf_counter()
        result = collector.collect(s, log_sources=sources)
        seconds = time.perf_counter() - started
        if result.lines_read != lines or result.quarantined:
            raise RuntimeError(f"collect read {result.as_dict()}, expected {lines} good lines")
        runs.append({**result.as_dict(), "wall_seconds": seconds})
        print(f"collect: run {run + 1}: {lines / seconds:,.0f} lines/s "
              f"({result.documents_written} documents, {result.trail_records} trail records "
              f"written), raw read {lines / raw_s[-1]:,.0f} lines/s, "
              f"raw + JSON {lines / parsed_s[-1]:,.0f} lines/s", flush=True)  # fmt: skip
        database = docstore.connect(s)
        database.client.drop_database(database.name)
        database.client.close()
    median = statistics.median(r["wall_seconds"] for r in runs)
    return {
        "lines": lines,
        "bytes": size,
        "runs": runs,
        "median_seconds": median,
        "lines_per_second": lines / median,
        "megabytes_per_second": size / median / 1e6,
        "raw_read_lines_per_second": lines / statistics.median(raw_s),
        "raw_json_lines_per_second": lines / statistics.median(parsed_s),
    }


# The sections, in order: W2 (collector) and W3 (rules) add theirs here.
MEASURES = {"verify": measure_verify, "rules": measure_rules, "collect": measure_collect}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--records", type=int, default=1_000_000, help="trail records to verify")
    parser.add_argument(
        "--collect-lines", type=int, default=100_000, help="log lines the collector reads"
    )
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(MEASURES)}")
    parser.add_argument("--home", type=Path, help="platform home (default: a temporary one)")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.records < 1:
        parser.error("--runs and --records take at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [m.strip() for m in (args.only or ",".join(MEASURES)).split(",") if m.strip()]
    unknown = set(chosen) - set(MEASURES)
    if unknown:
        print(f"--only: unknown {', '.join(sorted(unknown))}; known: {', '.join(MEASURES)}")
        return 2
    home = args.home or Path(tempfile.mkdtemp(prefix="stripe-platform-audit-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)  # the cluster runs as an unprivileged OS user under root
    base = load_settings(home=home, pg_fsync=True, profile="embedded", pg_port=None)
    embedded.up(base)
    s = base.model_copy(update={"pg_database": DATABASE})
    result: dict[str, Any] = {"scale": args.scale, "runs": args.runs}
    try:
        with db.connect(base, database="postgres", autocommit=True, with_key=False) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DATABASE)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        with db.connect(s, autocommit=True, with_key=False) as conn:
            migrate(conn)
        ctx = Context(s, home)
        for name in chosen:
            result[name] = MEASURES[name](ctx, args)
    finally:
        embedded.down(base)
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    text = json.dumps(result, indent=2, default=str)
    if args.output:
        args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
