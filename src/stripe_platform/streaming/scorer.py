"""The stream scorer (``stripe-platform stream fraud``): every new or changed payment scored by the
champion as it commits.

One loop over a :class:`~stripe_platform.streaming.changes.ChangeSource` (the embedded engine's
replication slot, or Debezium's topics on Kafka), each batch of change events in turn:

1. **Rows to payments.** ``transaction`` changes become payments, ``transactionstatechanges`` rows
   that report fraud become label events (:class:`~stripe_platform.streaming.normalize.Normalizer`).
   A change the scorer cannot use (an unknown table, a missing column, a bad value, an undecodable
   message) is counted by reason, logged and skipped: never fatal, and the position moves past it.
2. **Features and scores.** The window state (:class:`~stripe_platform.streaming.state.
   LiveFeatureState`, warmed from the recent history at start) gives each payment its features,
   computed before the payment itself is ingested; a later change that leaves every input as it
   was (a status change) reuses the features its payment had when it came (``FEATURE_CACHE``
   latest payments). One vectorised model call scores the batch.
3. **FraudScoreEvent** (sql/oltp/0010_fraud_score_events.sql): one INSERT per batch, keyed by
   (transaction id, LSN of the change), ``ON CONFLICT DO NOTHING``: a change delivered again after
   a crash inserts nothing, and its stored score is the one used below. These rows are also the
   outbox of the document writes (``DocumentWrittenAt`` NULL until written).
4. **Alerts**: the scores at or above ``settings.stream_alert_threshold`` not alerted yet go to
   the platform's alert sink (:func:`~stripe_platform.orchestration.alerts.send_alert`: the log,
   and the webhook when one is set), one alert per batch, then ``AlertedAt`` is set: a replay does
   not alert twice. A payment already alerted for an earlier change is not alerted again.
5. **Checkpoint**: only now does the source move its durable position.

**The Transaction documents** (``AnomalyScore``, ``isFraud``) are written by a thread of its own
from the outbox (:class:`DocumentWriter`, woken by every batch): one ``docstore.validation.
set_fields`` a round for the newest pending score of each payment, then the rows marked written.
A ``set_fields`` costs connections and checks whatever its size, so the scoring loop does not pay
it per batch, and a document store that is away delays the documents, not the scores. A document
that is not there yet (the seed writes a payment's document after its transaction commits) is
tried again for ``DOCUMENT_GRACE``, then given up (marked written with nothing to update, as
``ml score`` does for a payment without a document). A clean stop writes what is pending first.

``kill -9`` anywhere: the changes after the last checkpoint come again, the rows already inserted
stay, their alerts still pending are sent then, and the documents still pending are written from
the outbox by the next run: every payment scored exactly once in effect, its document carrying
its newest score, none lost. (An alert sent in the instant before its ``AlertedAt`` was written is
sent again: at least once, by design of any outbox.)

The champion is followed by a thread that checks the alias every ``MODEL_CHECK_SECONDS``: a new
champion scores the next batch, no restart; an unreachable registry or a version whose features
differ keeps the last good model (the status says why).

The status file ``<home>/stream/fraud/status.json`` is rewritten atomically about once a second:
state, heartbeat, model, position and lag (slot lag bytes or consumer lag, commit-to-score
p50/p95/p99/max over the last ``LATENCY_WINDOW`` payments), counts. Commit-to-score is measured in
PostgreSQL as the score row is written (``clock_timestamp() - CommitTime``), against the commit
time the source reports (the server's own clock).
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stripe_platform.streaming import StreamError
from stripe_platform.streaming.changes import ChangeSource, Poll, Rejected, RowEvent

if TYPE_CHECKING:
    from stripe_platform.config import Settings
    from stripe_platform.ml.score import Scorer

log = logging.getLogger("stripe_platform.stream")

SERVICE = "fraud-stream"
COLLECTION = "Transaction"
STATUS_SECONDS = 1.0  # status file rewrite (and idle checkpoint) period
MODEL_CHECK_SECONDS = 5.0  # how often the champion alias is read
LATENCY_WINDOW = 1_000  # payments the commit-to-score percentiles cover
POLL_TIMEOUT = 0.25  # longest wait for changes: the heartbeat stays about once a second
DOCUMENT_SECONDS = 0.2  # the document writer's longest wait (it is woken by each batch too)
DOCUMENT_RETRY = 1.0  # a payment whose document is not there yet is tried again after this
DOCUMENT_GRACE = dt.timedelta(seconds=30)  # a payment's document may come after its commit
DOCUMENT_LIMIT = 10_000  # pending rows written at a time (one set_fields chunk)
ALERT_NAMED = 20  # payments named in an alert's text (all are in its "payments" field)
FEATURE_CACHE = 20_000  # payments whose features a later change of theirs reuses
IDLE_GIVE_UP = 30.0  # until_idle: quiet this long with the source still behind, stop anyway
STATES = ("starting", "warming", "running", "stopped", "failed")


# -- the status file -------------------------------------------------------------------------------
def status_path(settings: Settings) -> Path:
    return settings.home_dir / "stream" / "fraud" / "status.json"


def read_status(settings: Settings) -> dict[str, Any] | None:
    """The last status the stream wrote, or None when it never ran under this home."""
    path = status_path(settings)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StreamError(f"stream status {path}: cannot be read: {exc}") from None
    try:
        status = json.loads(text)
    except ValueError as exc:
        raise StreamError(
            f"stream status {path}: not JSON ({exc}); the stream rewrites it"
        ) from None
    if not isinstance(status, dict):
        raise StreamError(f"stream status {path}: not a JSON object")
    return status


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, default=str)
        os.replace(name, path)  # readers see the old file or the new one, never a torn one
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _percentiles(values: Iterable[float]) -> dict[str, float | int | None]:
    array = np.fromiter(values, np.float64)
    if not len(array):
        return {"p50": None, "p95": None, "p99": None, "max": None, "count": 0}
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "max": round(float(array.max()), 3),
        "count": len(array),
    }


# -- the sources -----------------------------------------------------------------------------------
def open_source(settings: Settings, name: str | None = None) -> ChangeSource:
    """The change source named (``embedded`` or ``kafka``; default ``settings.stream_backend``)."""
    name = name or settings.stream_backend
    if name == "embedded":
        from stripe_platform.streaming.embedded import EmbeddedSource

        return EmbeddedSource(settings)
    if name == "kafka":
        from stripe_platform.streaming.kafka import KafkaSource

        return KafkaSource(settings)
    raise StreamError(f"stream source {name!r}: expected 'embedded' or 'kafka'")


# -- the model -------------------------------------------------------------------------------------
class Champion:
    """The champion, followed: :meth:`check` (a thread calls it every ``MODEL_CHECK_SECONDS``)
    loads a new version once the alias moves; a failure keeps the last good model."""

    def __init__(self, settings: Settings, scorer: Scorer | None = None) -> None:
        from stripe_platform.ml import registry as reg
        from stripe_platform.ml.score import Scorer

        self.settings = settings
        self.registry = reg.Registry.from_settings(settings)
        if scorer is None:
            self.registry.check()
            scorer = Scorer.from_loaded(reg.load_champion(self.registry, settings.ml_model_name))
        self.current: Scorer = scorer
        self.error: str | None = None
        self.switches = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Load the champion if the alias moved; True when the model changed."""
        from stripe_platform.ml import registry as reg
        from stripe_platform.ml.score import Scorer

        try:
            version = self.registry.require_champion(self.settings.ml_model_name)
            if str(version.version) == self.current.version:
                self.error = None
                return False
            scorer = Scorer.from_loaded(reg.load_version(self.registry, version))
        except Exception as exc:  # any failure: keep scoring with the last good model
            error = f"keeping {self.current.label}: {type(exc).__name__}: {exc}"
            if error != self.error:
                log.warning("champion check failed, %s", error)
            self.error = error
            return False
        log.info("champion moved: %s -> %s", self.current.label, scorer.label)
        self.current, self.error = scorer, None  # one reference swap: a batch uses one model
        self.switches += 1
        return True

    def warm_up(self) -> None:
        """One prediction before the first payment: the model's first call costs imports and
        set-up that would otherwise land on the first payments' commit-to-score."""
        import pandas as pd

        from stripe_platform.ml.features import FEATURE_NAMES

        names = list(FEATURE_NAMES)
        self.current.scores(pd.DataFrame(np.zeros((1, len(names))), columns=names))

    def follow(self, seconds: float = MODEL_CHECK_SECONDS) -> None:
        def watch() -> None:
            while not self._stop.wait(seconds):
                self.check()

        self._thread = threading.Thread(target=watch, name="fraud-stream-champion", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


# -- one run ----------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    source: str
    state: str
    model_name: str | None = None
    model_version: str | None = None
    scored: int = 0  # FraudScoreEvent rows this run inserted
    flagged: int = 0  # of which IsFraud
    replayed: int = 0  # changes scored before (delivered again after a restart)
    alerts: int = 0  # alerts sent (each names one or more payments)
    alerted_payments: int = 0
    labels: int = 0  # fraud reports applied to the window state
    ignored: int = 0  # deletes and state changes that report no fraud
    skipped: dict[str, int] = field(default_factory=dict)  # rejected changes by reason
    dead_lettered: int = 0
    documents_written: int = 0
    documents_missing: int = 0  # payments whose document never came (given up)
    batches: int = 0
    model_switches: int = 0
    position: str | None = None
    commit_to_score_ms: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # Where the scoring loop's working time went: normalize, features, model, insert, alerts,
    # checkpoint (not the source's reads, which include waiting; the document writer runs beside).
    seconds_by_stage: dict[str, float] = field(default_factory=dict)

    def timed(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds_by_stage[stage] = self.seconds_by_stage.get(stage, 0.0) + now - since
        return now

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_INSERT = """
WITH batch AS (
    SELECT * FROM unnest(%(tid)s::bigint[], %(lsn)s::bigint[], %(ts)s::timestamptz[],
                         %(commit)s::timestamptz[], %(score)s::float8[], %(flag)s::boolean[])
        AS b(tid, lsn, ts, commit_time, score, flag)
), inserted AS (
    INSERT INTO FraudScoreEvent (TransactionID, LSN, TransactionDateTime, CommitTime, ModelName,
        ModelVersion, FeatureVersion, Score, Threshold, IsFraud, Source, CommitToScoreMs)
    SELECT tid, lsn, ts, commit_time, %(model)s, %(version)s, %(features)s, score, %(threshold)s,
           flag, %(source)s, 1000 * extract(epoch FROM clock_timestamp() - commit_time)
    FROM batch
    ON CONFLICT (TransactionID, LSN) DO NOTHING
    RETURNING TransactionID, LSN, Score, IsFraud, CommitToScoreMs
)
SELECT TransactionID, LSN, Score, IsFraud, CommitToScoreMs, true, true, true FROM inserted
UNION ALL
-- Rows of this batch scored before (a replay): the main query does not see the rows the CTE
-- inserts, so these are exactly the others, with what is still to do for them.
SELECT e.TransactionID, e.LSN, e.Score, e.IsFraud, e.CommitToScoreMs, false,
       e.DocumentWrittenAt IS NULL, e.AlertedAt IS NULL
FROM FraudScoreEvent e JOIN batch b ON e.TransactionID = b.tid AND e.LSN = b.lsn
"""
# The rows of each payment up to the change whose score its document now carries.
_MARK_WRITTEN = """
UPDATE FraudScoreEvent e SET DocumentWrittenAt = clock_timestamp()
FROM unnest(%s::bigint[], %s::bigint[]) AS w(tid, lsn)
WHERE e.TransactionID = w.tid AND e.LSN <= w.lsn AND e.DocumentWrittenAt IS NULL
"""
_MARK_ALERTED = """
UPDATE FraudScoreEvent e SET AlertedAt = clock_timestamp()
FROM unnest(%s::bigint[], %s::bigint[]) AS a(tid, lsn)
WHERE e.TransactionID = a.tid AND e.LSN = a.lsn
"""
# The newest pending score of each payment (but those whose document was just found missing).
_PENDING = """
SELECT DISTINCT ON (TransactionID) TransactionID, LSN, Score, IsFraud, ScoredAt
FROM FraudScoreEvent
WHERE DocumentWrittenAt IS NULL AND NOT TransactionID = ANY(%s::bigint[])
ORDER BY TransactionID, LSN DESC
LIMIT %s
"""


def _array(elements: Iterable[str]) -> str:
    """An array literal of elements that need no quoting (numbers, ISO timestamps, t/f): one
    string per column, parsed by the server, instead of a Python object per value to adapt."""
    return "{" + ",".join(elements) + "}"


@dataclass(frozen=True, slots=True)
class _Row:
    """A score of this batch as stored (a replayed change keeps its first score)."""

    tid: int
    lsn: int
    score: float
    is_fraud: bool
    ms: float
    new: bool
    document_pending: bool
    alert_pending: bool


class DocumentWriter:
    """The scores into the Transaction documents (``AnomalyScore``, ``isFraud``), from the outbox:
    the FraudScoreEvent rows whose ``DocumentWrittenAt`` is NULL, the newest of each payment, in
    a thread of its own woken by every batch. One ``set_fields`` costs connections and checks
    (~0.1 s on a busy machine) whatever its size: paid once a round, never by the scoring loop.
    Rows are marked written once the documents carry them; a payment whose document is not there
    yet is tried again every ``DOCUMENT_RETRY`` s, and given up after ``DOCUMENT_GRACE`` (marked
    written with nothing to update). A failure (the document store away) is logged and retried:
    the outbox keeps the rows, across restarts too."""

    def __init__(self, settings: Settings, summary: RunSummary) -> None:
        self.settings = settings
        self.summary = summary
        self.error: str | None = None
        self._conn: Any = None
        self._docdb: Any = None
        self._waiting: dict[int, float] = {}  # payment -> when its document was found missing
        self._lock = threading.Lock()  # one round at a time: the thread's, or the last one
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fraud-stream-documents")
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(DOCUMENT_SECONDS)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.flush()
            except Exception as exc:  # the rows stay in the outbox: the next round tries again
                self._reset(exc)

    def _reset(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if error != self.error:
            log.warning("document write failed (retried): %s", error)
        self.error = error
        self._close_connections()

    def _connections(self) -> tuple[Any, Any]:
        from stripe_platform.docstore.client import connect as connect_documents
        from stripe_platform.oltp import db

        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.settings, autocommit=True, with_key=False)
        if self._docdb is None:
            self._docdb = connect_documents(self.settings)
        return self._conn, self._docdb

    def flush(self) -> int:
        """One round: the pending documents written (or found missing); how many tried."""
        from stripe_platform.docstore import validation

        with self._lock:
            conn, docdb = self._connections()
            now = time.monotonic()
            waiting = [tid for tid, seen in self._waiting.items() if now - seen < DOCUMENT_RETRY]
            rows = conn.execute(
                _PENDING, (_array(str(tid) for tid in waiting), DOCUMENT_LIMIT)
            ).fetchall()
            if not rows:
                return 0
            result = validation.set_fields(
                docdb,
                self.settings,
                COLLECTION,
                "transaction_id",
                [
                    (tid, {"AnomalyScore": float(score), "isFraud": int(bool(flag))})
                    for tid, _, score, flag, _ in rows
                ],
                writers=1,  # one chunk: a second connection would only cost its connect
            )
            missing = set(result.missing)
            oldest = _now() - DOCUMENT_GRACE
            given_up = {tid for tid, _, _, _, at in rows if tid in missing and at < oldest}
            done = [(tid, lsn) for tid, lsn, *_ in rows if tid not in missing or tid in given_up]
            if done:
                conn.execute(
                    _MARK_WRITTEN,
                    (_array(str(t) for t, _ in done), _array(str(lsn) for _, lsn in done)),
                )
            for tid, _ in done:
                self._waiting.pop(tid, None)
            for tid in missing - given_up:
                self._waiting[tid] = now
            self.summary.documents_written += len(rows) - len(missing)
            self.summary.documents_missing += len(given_up)
            self.error = None
            return len(rows)

    def close(self, *, flush: bool) -> None:
        """Stop the thread; ``flush``: one last round first (what this run scored, written)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if flush:
            try:
                self.flush()
            except Exception as exc:  # kept in the outbox for the next run
                self._reset(exc)
        self._close_connections()

    def _close_connections(self) -> None:
        conn, docdb, self._conn, self._docdb = self._conn, self._docdb, None, None
        if conn is not None:
            conn.close()
        if docdb is not None:
            docdb.client.close()


class _Stream:
    def __init__(
        self,
        settings: Settings,
        source: ChangeSource,
        champion: Champion,
        summary: RunSummary,
        started_at: dt.datetime,
    ) -> None:
        self.settings = settings
        self.source = source
        self.champion = champion
        self.summary = summary
        self.started_at = started_at
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        # The features of the latest payments by their inputs, for their later changes.
        self.recent: collections.OrderedDict[Any, np.ndarray] = collections.OrderedDict()
        self.lag: Any = None
        self.state = "starting"
        self.error: str | None = None
        self.conn: Any = None
        self.writer: DocumentWriter = None  # type: ignore[assignment]
        self.normalizer: Any = None
        self.features: Any = None
        self._next_status = 0.0

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        scorer = self.champion.current if self.champion is not None else None
        lag = self.lag
        summary = self.summary
        return {
            "service": SERVICE,
            "source": summary.source,
            "pid": os.getpid(),
            "started_at": self.started_at.isoformat(),
            "heartbeat_at": _now().isoformat(),
            "state": self.state,
            "error": self.error,
            "model": None
            if scorer is None
            else {
                "name": scorer.model_name,
                "version": scorer.version,
                "threshold": scorer.threshold,
                "feature_version": scorer.feature_version,
                "error": self.champion.error,
            },
            "alert_threshold": self.settings.stream_alert_threshold,
            "position": getattr(lag, "position", None),
            "slot_lag_bytes": getattr(lag, "slot_lag_bytes", None),
            "consumer_lag_messages": getattr(lag, "consumer_lag_messages", None),
            "commit_to_score_ms": _percentiles(self.latencies),
            "scored": summary.scored,
            "flagged": summary.flagged,
            "replayed": summary.replayed,
            "alerts": summary.alerts,
            "labels": summary.labels,
            "skipped": dict(summary.skipped),
            "dead_lettered": summary.dead_lettered,
            "documents_written": summary.documents_written,
            "documents_missing": summary.documents_missing,
            "documents_error": self.writer.error if self.writer is not None else None,
            "batches": summary.batches,
            "seconds_by_stage": {k: round(v, 3) for k, v in summary.seconds_by_stage.items()},
        }

    def write_status(self, state: str | None = None, *, refresh_lag: bool = True) -> None:
        if state is not None:
            self.state = state
        if refresh_lag and self.source is not None and self.state == "running":
            self.lag = self.source.lag()
        _write_atomically(status_path(self.settings), self.status())
        self._next_status = time.monotonic() + STATUS_SECONDS

    # -- one batch -----------------------------------------------------------------------------
    def reject(self, rejected: Rejected) -> None:
        skipped = self.summary.skipped
        skipped[rejected.reason] = skipped.get(rejected.reason, 0) + 1
        if rejected.reason == "undecodable" and rejected.source == "debezium":
            self.summary.dead_lettered += 1  # the Kafka source put it on the dead-letter topic
        log.warning(
            "skipped a change (%s) at %s: %s", rejected.reason, rejected.where, rejected.detail
        )

    def handle(self, poll: Poll) -> None:
        from stripe_platform.ml.contract import TransactionRecord

        summary, clock = self.summary, time.perf_counter()
        for rejected in poll.rejected:
            self.reject(rejected)
        items: list[Any] = []  # payments whose features are to compute, and labels: in order
        payments: list[tuple[RowEvent, TransactionRecord]] = []
        known: list[np.ndarray | int] = []  # each payment's vector, or its row among items'
        computing: dict[TransactionRecord, int] = {}
        recent = self.recent
        for event in poll.events:
            if event.op == "delete":  # a deleted payment or state change has nothing to score
                self.summary.ignored += 1
                continue
            out = self.normalizer.normalize(event)  # another table: rejected as unknown
            if isinstance(out, Rejected):
                self.reject(out)
            elif out is None:
                self.summary.ignored += 1
            elif isinstance(out, TransactionRecord):
                payments.append((event, out))
                # A change that leaves every input of the features as it was (a status change)
                # has the features the payment had when it came: computed then, point in time.
                vector = recent.get(out)
                if vector is not None:
                    recent.move_to_end(out)
                    known.append(vector)
                elif out in computing:
                    known.append(computing[out])
                else:
                    computing[out] = len(computing)
                    known.append(computing[out])
                    items.append(out)
            else:
                items.append(out)
                self.summary.labels += 1
        clock = summary.timed("normalize", clock)
        computed = self.features.apply(items) if items else None
        if computed is not None and len(computing):
            for record, row in computing.items():
                recent[record] = computed[row]
            while len(recent) > FEATURE_CACHE:
                recent.popitem(last=False)
        if payments:
            vectors = np.vstack([computed[k] if isinstance(k, int) else k for k in known])
            summary.timed("features", clock)
            self.score(payments, vectors)
        self.summary.batches += 1

    def score(self, payments: Sequence[tuple[RowEvent, Any]], vectors: Any) -> None:
        import pandas as pd

        from stripe_platform.ml.features import FEATURE_NAMES

        summary, clock = self.summary, time.perf_counter()
        scorer = self.champion.current  # one model for the whole batch
        matrix = np.asarray(vectors, np.float64).reshape(len(payments), len(FEATURE_NAMES))
        scores = scorer.scores(pd.DataFrame(matrix, columns=list(FEATURE_NAMES)))
        flags = scorer.decide(scores)
        clock = summary.timed("model", clock)
        rows = [
            _Row(*r)
            for r in self.conn.execute(
                _INSERT,
                {
                    "tid": _array(str(int(record.transaction_id)) for _, record in payments),
                    "lsn": _array(str(event.lsn) for event, _ in payments),
                    "ts": _array(record.timestamp.isoformat() for _, record in payments),
                    "commit": _array(event.commit_time.isoformat() for event, _ in payments),
                    "score": _array(map(repr, scores.tolist())),  # repr: the exact double
                    "flag": _array("t" if flag else "f" for flag in flags.tolist()),
                    "model": scorer.model_name,
                    "version": int(scorer.version),
                    "features": scorer.feature_version,
                    "threshold": scorer.threshold,
                    "source": self.source.name,
                },
            ).fetchall()
        ]
        clock = summary.timed("insert", clock)
        for row in rows:
            if row.new:
                summary.scored += 1
                summary.flagged += row.is_fraud
                self.latencies.append(row.ms)
            else:
                summary.replayed += 1
        self.writer.wake()  # the documents of these rows (and of any left by a crash)
        self.alert([r for r in rows if r.alert_pending], scorer)
        summary.timed("alerts", clock)

    def alert(self, rows: Sequence[_Row], scorer: Scorer) -> None:
        from stripe_platform.orchestration.alerts import send_alert

        threshold = self.settings.stream_alert_threshold
        candidates = [r for r in rows if r.score >= threshold]
        if not candidates:
            return
        # A payment alerted for an earlier change is not alerted again for a later one.
        before = {
            tid
            for (tid,) in self.conn.execute(
                "SELECT DISTINCT TransactionID FROM FraudScoreEvent "
                "WHERE TransactionID = ANY(%s) AND AlertedAt IS NOT NULL",
                ([r.tid for r in candidates],),
            )
        }
        newest: dict[int, _Row] = {}
        for row in candidates:
            if row.tid not in before and (row.tid not in newest or row.lsn > newest[row.tid].lsn):
                newest[row.tid] = row
        if not newest:
            return
        payments = sorted(newest.values(), key=lambda r: -r.score)
        named = ", ".join(f"{r.tid} ({r.score:.4g})" for r in payments[:ALERT_NAMED])
        more = f" and {len(payments) - ALERT_NAMED} more" if len(payments) > ALERT_NAMED else ""
        send_alert(
            {
                "event": "fraud_alert",
                "service": SERVICE,
                "source": self.source.name,
                "model_name": scorer.model_name,
                "model_version": scorer.version,
                "alert_threshold": threshold,
                "payments": [
                    {"transaction_id": r.tid, "lsn": r.lsn, "score": r.score} for r in payments
                ],
                "text": f"[stripe-platform] fraud stream: {len(payments)} payment(s) scored >= "
                f"{threshold:g}: {named}{more}",
            },
            self.settings,
        )
        marked = [r for r in candidates if r.tid in newest]
        self.conn.execute(_MARK_ALERTED, ([r.tid for r in marked], [r.lsn for r in marked]))
        self.summary.alerts += 1
        self.summary.alerted_payments += len(payments)

    # -- the loop ------------------------------------------------------------------------------
    def wal_now(self) -> int | None:
        """The WAL written so far (the embedded source: what ``until_idle`` must reach)."""
        if self.source.name != "embedded":
            return None
        (lsn,) = self.conn.execute("SELECT (pg_current_wal_flush_lsn() - '0/0')::int8").fetchone()
        return int(lsn)

    def idle(self, target: int | None) -> bool:
        """Nothing committed before the run started is left: the durable position reached the
        WAL of that moment (a slot), or no message is behind (a consumer group)."""
        self.lag = lag = self.source.lag()
        if lag.consumer_lag_messages is not None:
            return lag.consumer_lag_messages == 0
        if target is not None and lag.position is not None:
            from stripe_platform.ingestion.postgres.pgoutput import parse_lsn

            return parse_lsn(lag.position) >= target
        return True

    def loop(self, stop: threading.Event, *, until_idle: bool, max_batch: int) -> None:
        target = self.wal_now() if until_idle else None
        quiet_since: float | None = None
        summary = self.summary
        while not stop.is_set():
            poll = self.source.poll(max_batch, POLL_TIMEOUT)
            busy = bool(poll.events or poll.rejected)
            if busy:
                self.handle(poll)
            now = time.monotonic()
            # Durable: move the source on (after an idle poll too, so that WAL nobody needs is
            # released), then tell the world.
            if busy or until_idle or now >= self._next_status:
                clock = time.perf_counter()
                self.source.checkpoint()
                summary.timed("checkpoint", clock)
            if now >= self._next_status:
                self.write_status()
            if not until_idle or busy or not poll.caught_up:
                quiet_since = None
                continue
            quiet_since = quiet_since or now
            if self.idle(target):
                return
            if now - quiet_since > IDLE_GIVE_UP:
                log.warning(
                    "until idle: no change for %.0f s but the source reports more behind (%s); "
                    "stopping",
                    IDLE_GIVE_UP,
                    self.lag,
                )
                return


def run(
    settings: Settings,
    source: ChangeSource | None = None,
    *,
    stop: threading.Event | None = None,
    until_idle: bool = False,
    max_batch: int = 2000,
    scorer: Scorer | None = None,
    model_check_seconds: float = MODEL_CHECK_SECONDS,
) -> RunSummary:
    """Score the change stream until ``stop`` is set (or, ``until_idle``, until the source has
    nothing more). ``source`` defaults to ``settings.stream_backend``'s (opened and closed here);
    ``scorer`` to the champion (followed as the alias moves either way)."""
    from stripe_platform.oltp import db
    from stripe_platform.streaming.normalize import Normalizer
    from stripe_platform.streaming.state import LiveFeatureState

    if max_batch < 1:
        raise StreamError("max_batch must be at least 1")
    stop = stop or threading.Event()
    started, clock = _now(), time.monotonic()
    own_source = source is None
    summary = RunSummary(
        source=source.name if source is not None else settings.stream_backend, state="starting"
    )
    stream = _Stream(settings, source, None, summary, started)  # type: ignore[arg-type]
    stream.writer = DocumentWriter(settings, summary)
    stream.write_status("starting")
    try:
        if source is None:
            source = stream.source = open_source(settings)
            summary.source = source.name
        stream.champion = Champion(settings, scorer)
        stream.write_status("warming")
        # After the source exists: a payment committed while the state warms is either in the
        # history read or among the changes to come (or both: then it is not ingested twice).
        stream.normalizer = Normalizer(settings)
        stream.features = LiveFeatureState.warm(settings)
        warmed = stream.features.warmed
        stream.conn = db.connect(settings, autocommit=True, with_key=False)
        stream.writer.start()  # documents left pending by an earlier run first
        stream.champion.warm_up()
        stream.champion.follow(model_check_seconds)
        stream.write_status("running")
        log.info(
            "fraud stream running: source %s, %d payments of history, %s (threshold %g), "
            "alerts at >= %g",
            source.name,
            warmed,
            stream.champion.current.label,
            stream.champion.current.threshold,
            settings.stream_alert_threshold,
        )
        stream.loop(stop, until_idle=until_idle, max_batch=max_batch)
        stream.writer.close(flush=True)  # what this run scored, in the documents before it ends
        stream.write_status("stopped")
        summary.state = "stopped"
    except BaseException as exc:
        stream.writer.close(flush=False)
        stream.error = f"{type(exc).__name__}: {exc}"
        summary.state = "failed"
        try:
            stream.write_status("failed", refresh_lag=False)
        except OSError:
            log.exception("the stream's status could not be written")
        raise
    finally:
        if stream.champion is not None:
            stream.champion.close()
            summary.model_name = stream.champion.current.model_name
            summary.model_version = stream.champion.current.version
            summary.model_switches = stream.champion.switches
        summary.position = getattr(stream.lag, "position", None)
        summary.commit_to_score_ms = _percentiles(stream.latencies)
        summary.seconds = time.monotonic() - clock
        if stream.conn is not None:
            stream.conn.close()
        if stream.normalizer is not None:
            stream.normalizer.close()
        if own_source and source is not None:
            source.close()
    return summary
