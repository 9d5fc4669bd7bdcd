"""Benchmark: the fraud stream's commit-to-score latency under a sustained write load, embedded
CDC and Debezium + Kafka, beside the embedded CDC alone; and online/offline feature parity.

    uv run python bench/stream_bench.py [--scale 0.05] [--runs 1] [--rates 200,1000]
        [--seconds 60] [--drain-seconds 120] [--no-kafka] [--output FILE] [--keep-home]

In a platform home of its own (bench/realtime_setup.py: `seed --scale S`, `ml train`: a real
champion), for each path (the embedded engine's replication slot, then Debezium + Kafka when the
Kafka stack starts):

1. `stripe-platform stream fraud --source embedded|kafka` is started and awaited until its status
   file says `running` (model loaded, window state warmed); then a warm-up, `seed --tps 20` for
   5 s scored to the end, left out of the figures (Debezium creates a table's topic at its first
   change, and the consumer finds it within its metadata refresh: measured warm, both paths).
2. For each rate of --rates, `stripe-platform seed --tps R --duration S` (each second one
   PostgreSQL transaction of about R new payments, most of them settled in it, plus a few status
   changes of older ones) while the stream scores. When the load ends, the backlog: payments of
   the window with no score yet, and the slot's lag; then up to --drain-seconds for the stream to
   score them all (the time it took is reported).
3. Latency, from the scored-events table FraudScoreEvent of the changes committed in the window:
   commit-to-score = ScoredAt - CommitTime (CommitTime: the source transaction's commit time as
   the source reports it; ScoredAt: the server's clock_timestamp() as the score row is inserted,
   in the statement before its commit), p50/p95/p99 over every scored change; and
   commit-to-document (DocumentWrittenAt, set once the Transaction document carries the score).
   Goal: p95 < 100 ms at 1,000/s on the embedded path. Throughput: payments committed and changes
   scored per second of load.
4. The reference, in the same window: the embedded CDC alone (streaming.embedded.EmbeddedSource on
   a temporary slot of its own over the same publication, in this process, polling and
   discarding): commit-to-visible latency of the same payment changes. It reads the same WAL at
   the same time as the stream (the two decode concurrently).

Parity (embedded path): the reference consumer also hands its payments, in stream order, to a
feature thread running the stream's own feature code (streaming.normalize.Normalizer and
streaming.state.LiveFeatureState, warmed from the database after its slot was made, as the
stream warms); after the run, each payment's first feature vector is compared with
ml.features.batch_features over the same payments (and the history before them) read back with
ml.contract.load_platform_transactions: mismatching payments (goal 0). And the stream's own output:
the Score of each payment's first FraudScoreEvent row beside the champion's score of its batch
features.

--runs repeats the windows of each rate. Prints a markdown table and writes JSON (default
bench/results/stream-<UTC time>.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below
from realtime_setup import BenchHome, load_average, percentiles, stop

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GOALS = {"p95_ms": 100.0, "rate": 1000.0, "parity_mismatches": 0}
READY_TIMEOUT_S = 300.0
REFERENCE_SLOT = "bench_stream_reference"
WARMUP_RATE, WARMUP_SECONDS = 20.0, 5.0  # a short load before the windows, not in the figures
NOT_MEASURED = "not measured"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.05, help="the bench home's seed scale")
    parser.add_argument("--runs", type=int, default=1, help="windows of each rate")
    parser.add_argument("--rates", default="200,1000", help="payments/s of `seed --tps`")
    parser.add_argument("--seconds", type=float, default=60.0, help="each window's load")
    parser.add_argument("--drain-seconds", type=float, default=120.0, help="wait for the backlog")
    parser.add_argument("--no-kafka", action="store_true", help="the embedded path only")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    parser.add_argument("--keep-home", action="store_true", help="keep the bench home (logs)")
    args = parser.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates {args.rates!r}: comma-separated numbers")
    if args.runs < 1 or not args.rates or min(args.rates) <= 0 or args.seconds <= 0:
        parser.error("--runs >= 1, --rates and --seconds > 0")
    return args


# -- the reference: the embedded CDC alone, and the stream's feature code beside it --------------
class Reference:
    """A temporary slot of its own, polled in a thread: commit-to-visible of every payment change
    (the time ``poll`` returned it); with ``features``, a second thread runs the stream's
    normalizer and feature state over the same events (off the polling thread, so the reference
    is not slowed by it) and keeps each payment's first feature vector."""

    def __init__(self, settings, *, features: bool) -> None:
        from stripe_platform.streaming.embedded import EmbeddedSource

        self.settings = settings
        self.source = EmbeddedSource(settings, slot=REFERENCE_SLOT, temporary=True)
        self.visible: list[tuple[float, float]] = []  # (commit epoch s, visible epoch s)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.first_features: dict[str, np.ndarray] = {}
        self.rejected = 0
        self._queue: queue.Queue | None = None
        self._threads = [threading.Thread(target=self._poll, name="bench-reference")]
        if features:
            from stripe_platform.streaming.normalize import Normalizer
            from stripe_platform.streaming.state import LiveFeatureState

            # After the slot exists, as the stream does: nothing committed meanwhile is missed.
            self.normalizer = Normalizer(settings)
            self.state = LiveFeatureState.warm(settings)
            self._queue = queue.Queue()
            self._threads.append(threading.Thread(target=self._features, name="bench-features"))

    def start(self) -> Reference:
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self._queue is not None:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=120)
        self.source.close()  # the temporary slot goes with its session
        if self._queue is not None:
            self.normalizer.close()
        if self.error is not None:
            raise RuntimeError(f"the reference consumer failed: {self.error!r}") from self.error

    def _poll(self) -> None:
        try:
            while not self.stop.is_set():
                poll = self.source.poll(5000, 0.25)
                seen = time.time()
                for e in poll.events:
                    if e.table == "transaction" and e.op != "delete":
                        self.visible.append((e.commit_time.timestamp(), seen))
                if poll.events and self._queue is not None:
                    self._queue.put(poll.events)
                if poll.events or poll.rejected:
                    self.source.checkpoint()
        except BaseException as exc:  # reported by close()
            self.error = exc

    def _features(self) -> None:
        from stripe_platform.ml.contract import TransactionRecord
        from stripe_platform.streaming.changes import Rejected

        assert self._queue is not None
        try:
            while (events := self._queue.get()) is not None:
                items = []
                for e in events:
                    if e.op == "delete":
                        continue
                    out = self.normalizer.normalize(e)
                    if isinstance(out, Rejected):
                        self.rejected += 1
                    elif out is not None:
                        items.append(out)
                vectors = self.state.apply(items) if items else []
                payments = [x for x in items if isinstance(x, TransactionRecord)]
                for record, vector in zip(payments, vectors, strict=True):
                    self.first_features.setdefault(record.transaction_id, vector)
        except BaseException as exc:  # reported by close()
            self.error = exc

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Commit-to-visible (ms) of the payment changes committed in [start, end]."""
        return percentiles(
            [
                (seen - commit) * 1000
                for commit, seen in list(self.visible)
                if start <= commit <= end
            ]
        )


# -- one path -----------------------------------------------------------------------------------
def server_now(conn) -> float:
    return conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]


def wait_running(home: BenchHome, proc, log: Path) -> float:
    """Seconds until the stream's status file says `running` (an observed event, not a delay)."""
    from stripe_platform.streaming.scorer import read_status

    settings = home.settings()
    started = time.perf_counter()
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"`stream fraud` exited ({proc.returncode}): {tail(log)}")
        status = read_status(settings) or {}
        if status.get("state") == "running" and status.get("pid") == proc.pid:
            return time.perf_counter() - started
        if status.get("state") == "failed" and status.get("pid") == proc.pid:
            raise RuntimeError(f"`stream fraud` failed: {status.get('error')}")
        time.sleep(0.2)
    raise RuntimeError(f"`stream fraud` not running after {READY_TIMEOUT_S:.0f} s: {tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


UNSCORED = """
SELECT count(*) FROM Transaction t
WHERE t.ID > %(first)s AND t.ID <= %(last)s
  AND NOT EXISTS (SELECT FROM FraudScoreEvent e WHERE e.TransactionID = t.ID AND e.Source = %(source)s)
"""

SCORED = """
SELECT e.TransactionID, e.LSN,
       1000 * extract(epoch FROM e.ScoredAt - e.CommitTime)::float8,
       e.CommitToScoreMs,
       1000 * extract(epoch FROM e.DocumentWrittenAt - e.CommitTime)::float8,
       extract(epoch FROM e.CommitTime)::float8, extract(epoch FROM e.ScoredAt)::float8
FROM FraudScoreEvent e
WHERE e.Source = %(source)s AND e.CommitTime >= to_timestamp(%(start)s)
  AND e.CommitTime <= to_timestamp(%(end)s)
"""


def window(
    home: BenchHome,
    conn,
    stream,
    reference: Reference,
    source: str,
    rate: float,
    seconds: float,
    drain_seconds: float,
    number: int,
) -> dict[str, Any]:
    """One window of `seed --tps rate` while the stream scores; its figures."""
    from stripe_platform.streaming.scorer import read_status

    tag = "debezium" if source == "kafka" else "embedded"
    settings = home.settings()
    first_id = conn.execute("SELECT coalesce(max(ID), 0) FROM Transaction").fetchone()[0]
    start = server_now(conn)
    load_start = load_average()
    began = time.perf_counter()
    home.run(
        "seed",
        *("--tps", f"{rate:g}", "--duration", f"{seconds:g}", "--seed", str(1000 + number)),
        timeout=seconds + 600,
    )
    load_s = time.perf_counter() - began
    end = server_now(conn)
    last_id = conn.execute("SELECT coalesce(max(ID), 0) FROM Transaction").fetchone()[0]
    ids = {"first": first_id, "last": last_id, "source": tag}
    backlog = conn.execute(UNSCORED, ids).fetchone()[0]
    status = read_status(settings) or {}
    lag = {k: status.get(k) for k in ("slot_lag_bytes", "consumer_lag_messages", "position")}
    drained, left = 0.0, backlog
    waited = time.perf_counter()
    while left and time.perf_counter() - waited < drain_seconds:
        if stream.poll() is not None:
            raise RuntimeError(f"`stream fraud` exited ({stream.returncode}) while draining")
        time.sleep(0.25)
        left = conn.execute(UNSCORED, ids).fetchone()[0]
    drained = time.perf_counter() - waited
    rows = conn.execute(SCORED, {"source": tag, "start": start, "end": end}).fetchall()
    payments = last_id - first_id
    tids = {r[0] for r in rows}
    scored_span = (max(r[6] for r in rows) - min(r[5] for r in rows)) if rows else 0.0
    documents = [r[4] for r in rows if r[4] is not None]
    result = {
        "source": tag,
        "rate": rate,
        "seconds": seconds,
        "load_wall_s": load_s,
        "payments_committed": payments,
        # the load runs for `seconds` after its start-up (process, connections, population)
        "committed_per_s": payments / seconds,
        "first_id": first_id,
        "last_id": last_id,
        "changes_scored": len(rows),
        "payments_scored": len(tids),
        "scored_per_s": len(rows) / scored_span if scored_span else 0.0,
        "backlog_at_end": backlog,
        "lag_at_end": lag,
        "drain_s": drained if backlog else 0.0,
        "unscored_after_drain": left,
        "commit_to_score_ms": percentiles([r[2] for r in rows]),
        "commit_to_score_ms_column": percentiles([r[3] for r in rows]),
        "commit_to_document_ms": percentiles(documents),
        "documents_pending": len(rows) - len(documents),
        "reference_commit_to_visible_ms": reference.window(start, end),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }
    c, ref = result["commit_to_score_ms"], result["reference_commit_to_visible_ms"]
    print(
        f"{tag} at {rate:g}/s: {payments:,} payments committed ({result['committed_per_s']:,.0f}/s),"
        f" {len(rows):,} changes scored; commit-to-score p50/p95/p99 "
        f"{c['p50'] or 0:.1f}/{c['p95'] or 0:.1f}/{c['p99'] or 0:.1f} ms; reference commit-to-"
        f"visible p50/p95/p99 {ref['p50'] or 0:.1f}/{ref['p95'] or 0:.1f}/{ref['p99'] or 0:.1f}"
        f" ms; backlog at end {backlog:,} payments (drained in {result['drain_s']:.1f} s, "
        f"{left:,} left); load {load_average()[0]}",
        flush=True,
    )
    return result


def measure_path(
    home: BenchHome, source: str, args: argparse.Namespace, *, parity: bool
) -> tuple[dict[str, Any], Reference | None]:
    """The stream on one source over every window; the reference beside it."""
    from stripe_platform.oltp import db

    settings = home.settings()
    reference = Reference(settings, features=parity).start()
    log = home.logs / f"stream-{source}.log"
    stream = home.start("stream", "fraud", "--source", source, log=log.name)
    windows: list[dict[str, Any]] = []
    try:
        ready = wait_running(home, stream, log)
        print(f"stream fraud --source {source} running after {ready:.1f} s", flush=True)
        with db.connect(settings, autocommit=True, with_key=False) as conn:
            # A short load first, left out of the figures: Debezium creates a table's topic at
            # its first change and the consumer finds it within its metadata refresh; the
            # embedded path gets the same, so both are measured warm.
            warmup = window(
                home,
                conn,
                stream,
                reference,
                source,
                WARMUP_RATE,
                WARMUP_SECONDS,
                args.drain_seconds,
                900 + (100 if source == "kafka" else 0),
            )
            number = 0
            for _ in range(args.runs):
                for rate in args.rates:
                    number += 1
                    windows.append(
                        window(
                            home,
                            conn,
                            stream,
                            reference,
                            source,
                            rate,
                            args.seconds,
                            args.drain_seconds,
                            number + (100 if source == "kafka" else 0),
                        )
                    )
    finally:
        exit_code = stop(stream)
        try:
            reference.close()
        finally:
            if not parity:
                reference = None
    return {
        "ready_s": ready,
        "warmup": warmup,
        "windows": windows,
        "exit": exit_code,
        "log": tail(log, 5),
    }, reference


# -- Kafka ----------------------------------------------------------------------------------------
def kafka_path(home: BenchHome, args: argparse.Namespace) -> dict[str, Any]:
    """The same windows through Debezium + Kafka (the embedded Kafka stack of the bench home, a
    connector on its database), or why they were not measured."""
    try:
        from stripe_platform.runtime import kafka
    except ImportError as exc:
        return {
            "measured": False,
            "reason": f"{NOT_MEASURED}: the Kafka runtime is missing ({exc})",
        }
    settings = home.settings()
    stack = kafka.KafkaStack(home.path)
    began = time.perf_counter()
    try:
        try:
            stack.up()
            attached = kafka.attach(settings, stack)
        except Exception as exc:  # no Java, no jars, a start that failed: said, not faked
            return {
                "measured": False,
                "reason": f"{NOT_MEASURED}: the Kafka stack did not start: "
                f"{type(exc).__name__}: {str(exc)[:300]}",
            }
        started = time.perf_counter() - began
        print(f"Kafka + Connect + Debezium up in {started:.1f} s", flush=True)
        home.env["STRIPE_PLATFORM_KAFKA_BOOTSTRAP_SERVERS"] = attached.bootstrap_servers
        measured, _ = measure_path(home, "kafka", args, parity=False)
        return {
            "measured": True,
            "stack_start_s": started,
            "versions": {
                "kafka": kafka.KAFKA_VERSION,
                "connect": kafka.CONNECT_VERSION,
                "debezium": kafka.DEBEZIUM_VERSION,
            },
            **measured,
        }
    except Exception as exc:  # a window that failed on this path: said in the table
        return {
            "measured": False,
            "reason": f"{NOT_MEASURED}: the Kafka path failed: {type(exc).__name__}: "
            f"{str(exc)[:300]}",
        }
    finally:
        stack.down()


# -- parity ---------------------------------------------------------------------------------------
def parity(home: BenchHome, reference: Reference, start: float, first_id: int) -> dict[str, Any]:
    """The stream's feature code's first vector of each payment of the run (ids above
    ``first_id``) vs batch_features on the same payments; the stream's own scores vs the
    champion's on the batch features. Older payments changed during the run (a refund, a late
    settlement) are compared apart: the stream scores them again with today's window state."""
    from stripe_platform.ml.contract import load_platform_transactions
    from stripe_platform.ml.drift import feature_horizon
    from stripe_platform.ml.features import FEATURE_NAMES, batch_features
    from stripe_platform.ml.registry import Registry, load_champion
    from stripe_platform.ml.score import Scorer
    from stripe_platform.oltp import db

    settings = home.settings()
    began = dt.datetime.fromtimestamp(start, dt.UTC)
    # From the oldest payment the run changed, its own history before it included.
    with db.connect(settings, autocommit=True, with_key=False) as conn:
        oldest = (
            conn.execute(
                "SELECT min(TransactionDateTime) FROM FraudScoreEvent WHERE Source = 'embedded'"
            ).fetchone()[0]
            or began
        )
    history = load_platform_transactions(
        settings,
        start=min(oldest, began) - feature_horizon() - dt.timedelta(hours=2),
        require_labels=False,
    )
    frame = batch_features(history)
    matrix = frame[list(FEATURE_NAMES)].to_numpy()
    ids = history.table["transaction_id"].to_pylist()
    index = {tid: i for i, tid in enumerate(ids)}

    def compare(tids: list[str]) -> dict[str, Any]:
        if not tids:
            return {"payments_compared": 0, "mismatched_payments": 0, "mismatched_values": 0}
        online = np.vstack([reference.first_features[t] for t in tids])
        offline = matrix[[index[t] for t in tids]]
        same = np.isclose(online, offline, rtol=1e-9, atol=1e-9, equal_nan=True)
        bad = np.flatnonzero(~same.all(axis=1))
        examples = []
        for k in bad[:3]:
            cols = np.flatnonzero(~same[k])[:4]
            examples.append(
                {
                    "transaction_id": tids[k],
                    "online_vs_batch": {
                        FEATURE_NAMES[c]: [float(online[k, c]), float(offline[k, c])] for c in cols
                    },
                }
            )
        return {
            "payments_compared": len(tids),
            "mismatched_payments": len(bad),
            "mismatched_values": int((~same).sum()),
            "examples": examples,
        }

    known = [t for t in reference.first_features if t in index]
    new = [t for t in known if int(t) > first_id]
    older = [t for t in known if int(t) <= first_id]
    result: dict[str, Any] = {
        "features": len(FEATURE_NAMES),
        "run": compare(new),
        "older_changed": compare(older),
        "online_only": len(reference.first_features) - len(known),
        "rejected_by_normalizer": reference.rejected,
    }

    # The stream's own scores (its first score of each payment of the run) beside the champion's
    # on the batch features: a score that differs means features that differed in the stream.
    registry = Registry.from_settings(settings)
    scorer = Scorer.from_loaded(load_champion(registry, settings.ml_model_name))
    with db.connect(settings, autocommit=True, with_key=False) as conn:
        # The run's payments: the score of each one's first change (its insert). Older payments
        # changed during the run: the score of each one's first change in the run.
        stream_scores = dict(
            conn.execute(
                """SELECT DISTINCT ON (TransactionID) TransactionID::text, Score
                   FROM FraudScoreEvent WHERE Source = 'embedded' AND TransactionID > %s
                   ORDER BY TransactionID, LSN""",
                (first_id,),
            ).fetchall()
        )
        older_scores = dict(
            conn.execute(
                """SELECT DISTINCT ON (TransactionID) TransactionID::text, Score
                   FROM FraudScoreEvent WHERE Source = 'embedded' AND TransactionID <= %s
                     AND CommitTime >= to_timestamp(%s)
                   ORDER BY TransactionID, LSN""",
                (first_id, start),
            ).fetchall()
        )

    def scores(stored: dict[str, float]) -> dict[str, Any]:
        common = [t for t in stored if t in index]
        if not common:
            return {"payments_compared": 0, "mismatched": 0}
        batch = np.asarray(scorer.scores(frame.iloc[[index[t] for t in common]]), float)
        mine = np.array([stored[t] for t in common], float)
        differ = ~np.isclose(mine, batch, rtol=1e-9, atol=1e-12)
        return {
            "payments_compared": len(common),
            "mismatched": int(differ.sum()),
            "max_abs_difference": float(np.abs(mine - batch).max()),
            "model_version": scorer.version,
        }

    result["scores"] = scores(stream_scores)
    result["scores_older_changed"] = scores(older_scores)
    run, sc = result["run"], result["scores"]
    print(
        f"parity: {run['mismatched_payments']} of {run['payments_compared']:,} payments of the "
        f"run differ in features (the stream's code vs batch_features); the stream's scores: "
        f"{sc['mismatched']} of {sc['payments_compared']:,} differ from the batch features' "
        f"scores; older payments changed in the run: "
        f"{result['older_changed']['mismatched_payments']} of "
        f"{result['older_changed']['payments_compared']:,} differ in features, the stream's "
        f"scores of {result['scores_older_changed']['mismatched']} of "
        f"{result['scores_older_changed']['payments_compared']:,}",
        flush=True,
    )
    return result


# -- the run --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begun = time.perf_counter()
    load_start = load_average()
    home = BenchHome("stream-bench", scale=args.scale)
    results: dict[str, Any] = {
        "benchmark": "stream",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "goals": GOALS,
        "rates": args.rates,
        "seconds": args.seconds,
        "runs": args.runs,
        "load": "stripe-platform seed --tps R --duration S (one PostgreSQL transaction a second)",
        "scored_at": "FraudScoreEvent.ScoredAt: DEFAULT clock_timestamp(), set as the row is "
        "inserted (the INSERT statement, before its commit)",
    }
    try:
        print(f"bench home {home.path}: seed --scale {args.scale}, ml train ...", flush=True)
        results["home"] = home.prepare()
        print(
            f"seeded in {results['home']['seed_s']:.1f} s, trained v"
            f"{results['home']['model']['version']} in {results['home']['train_s']:.1f} s",
            flush=True,
        )
        from stripe_platform.oltp import db

        with db.connect(home.settings(), autocommit=True, with_key=False) as conn:
            start = server_now(conn)
        embedded, reference = measure_path(home, "embedded", args, parity=True)
        results["embedded"] = {"measured": True, **embedded}
        assert reference is not None
        first_id = min(w["first_id"] for w in [embedded["warmup"], *embedded["windows"]])
        results["parity"] = parity(home, reference, start, first_id)
        if args.no_kafka:
            results["kafka"] = {"measured": False, "reason": f"{NOT_MEASURED}: --no-kafka"}
        else:
            results["kafka"] = kafka_path(home, args)
    finally:
        home.close(keep=args.keep_home)
    results["wall_s"] = time.perf_counter() - begun
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": load_start,
        "load_average_at_end": load_average(),
    }
    out = args.output or RESULTS / f"stream-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report_table(results))
    print(f"\nwritten {out}")
    return 0


def report_table(r: dict[str, Any]) -> str:
    def ms(p: dict[str, Any]) -> str:
        if not p.get("n"):
            return "none"
        return f"{p['p50']:.1f} / {p['p95']:.1f} / {p['p99']:.1f} ms"

    lines = [
        "\n## fraud stream: commit-to-score under `seed --tps`\n",
        "| path | rate | committed/s | p50 / p95 / p99 | reference: embedded CDC alone | "
        "backlog at end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in ("embedded", "kafka"):
        path = r.get(key) or {}
        if not path.get("measured"):
            lines.append(f"| {key} | | | {path.get('reason', NOT_MEASURED)} | | |")
            continue
        for w in path["windows"]:
            lines.append(
                f"| {w['source']} | {w['rate']:g}/s | {w['committed_per_s']:,.0f} | "
                f"{ms(w['commit_to_score_ms'])} | {ms(w['reference_commit_to_visible_ms'])} | "
                f"{w['backlog_at_end']:,} (drained in {w['drain_s']:.1f} s) |"
            )
    p = r.get("parity")
    if p:
        lines.append(
            f"\nparity: {p['run']['mismatched_payments']} of {p['run']['payments_compared']:,} "
            f"payments differ (goal 0); the stream's scores: {p['scores']['mismatched']} of "
            f"{p['scores']['payments_compared']:,} differ"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
