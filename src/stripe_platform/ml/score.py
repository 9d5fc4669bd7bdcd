"""Batch scoring with the champion (``models:/fraud@champion``): the platform's payments, or a file.

**The platform** (:func:`score_platform`, ``stripe-platform ml score``; the hourly
``ml_fraud_scoring`` DAG). Every payment the champion has not scored yet is scored once:

1. The payments without a ``FraudScore`` row for the champion's version are found in PostgreSQL;
   their history (from the earliest one less the feature horizon, :func:`~stripe_platform.ml.drift.
   feature_horizon`) is loaded (:func:`~stripe_platform.ml.contract.load_platform_transactions`)
   and their features computed point in time (:func:`~stripe_platform.ml.features.batch_features`).
2. Their scores go into ``FraudScore`` (sql/oltp/0009_fraud_scores.sql) in one transaction, keyed
   by (transaction, model name, model version): ``ON CONFLICT DO NOTHING`` makes a concurrent or
   repeated run harmless, and an advisory lock keeps two scorers from doing the work twice.
   ``IsFraud`` is the decision ``Score >= Threshold`` (the threshold the version records).
3. The rows whose document is not written yet (``DocumentWrittenAt IS NULL``: these rows are the
   outbox of the document writes) set ``AnomalyScore`` and ``isFraud`` in the ``Transaction``
   documents (the brief's shape, keyed by ``transaction_id``) through the platform's one way to
   set fields by key, ``docstore.validation.set_fields`` (every value checked against the
   collection's validator first; on the embedded FerretDB set-based UPDATEs of its backend table,
   elsewhere update commands, at most 40 a command on FerretDB), ``DOCUMENT_BATCH`` rows at a
   time, each batch marked written in PostgreSQL once it is. A run interrupted between the two
   writes that batch again (the same values); a payment without a document (the seed's documents
   may be a sample) is marked written with nothing to update.

Re-running scores nothing and writes nothing. A new champion version scores every payment again
(its own rows): the documents then carry the newest champion's scores, and ``FraudScore`` keeps
each version's, which the warehouse reads (FACT_FraudAnalysis: predicted beside confirmed fraud).

**A file** (:func:`score_file`, ``ml score --transactions FILE --output FILE``): a user's parquet
file in the transactions contract (label optional) is scored with the champion, every payment's
features computed from the file's own history; the output is one row per transaction id
(``transaction_id`` with the input's type, ``score``, ``is_fraud``), the model, feature version
and threshold in the parquet file's metadata, written whole (a temporary file renamed).

A champion whose recorded features differ from the code's refuses to load (FeatureMismatch); no
champion, an unreachable MLflow store, a bad file: a clear error, nothing written.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from stripe_platform.errors import PlatformError

if TYPE_CHECKING:
    from stripe_platform.config import Settings
    from stripe_platform.ml.registry import LoadedModel

THRESHOLD_TAG = "decision_threshold"
DEFAULT_THRESHOLD = 0.5  # without a recorded threshold: flagged when fraud is likelier than not
DOCUMENT_BATCH = 10_000  # pending rows written (then marked) at a time: one set_fields chunk
LOCK_KEY = 0x4652_4144  # "FRAD": the scorers' advisory lock
COLLECTION = "Transaction"


class ScoringError(PlatformError, ValueError):
    """Scoring cannot proceed (a bad output path, a model that gives no probability)."""


# -- the model ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scorer:
    """The champion, ready to score feature frames."""

    loaded: LoadedModel
    threshold: float

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> Scorer:
        threshold = float(loaded.tags.get(THRESHOLD_TAG, DEFAULT_THRESHOLD))
        if not 0 <= threshold <= 1:
            raise ScoringError(
                f"{loaded.model_name} version {loaded.version}: {THRESHOLD_TAG} {threshold} is "
                "not a probability"
            )
        return cls(loaded, threshold)

    @classmethod
    def champion(cls, settings: Settings) -> Scorer:
        """``models:/<ml_model_name>@champion``, refused when its recorded features differ from
        the code's (FeatureMismatch)."""
        from stripe_platform.ml import registry as reg

        registry = reg.Registry.from_settings(settings)
        registry.check()
        return cls.from_loaded(reg.load_champion(registry, settings.ml_model_name))

    @property
    def model_name(self) -> str:
        return self.loaded.model_name

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def feature_version(self) -> str:
        from stripe_platform.ml.registry import TAG_FEATURE_VERSION

        return self.loaded.tags.get(TAG_FEATURE_VERSION, "unknown")

    @property
    def label(self) -> str:
        return f"{self.model_name} version {self.version}"

    def scores(self, features: pd.DataFrame) -> np.ndarray:
        """Fraud probabilities (float64 in [0, 1]) for a frame with the model's feature columns."""
        from stripe_platform.ml.train import model_scores

        if features.empty:
            return np.empty(0, np.float64)
        out = model_scores(self.loaded, features)
        if len(out) != len(features) or not np.all((out >= 0) & (out <= 1)):
            raise ScoringError(f"{self.label} does not return one probability per payment")
        return out

    def decide(self, scores: np.ndarray) -> np.ndarray:
        return scores >= self.threshold


# -- a file --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileScores:
    source: str
    output: str
    rows: int
    flagged: int
    model_name: str
    model_version: str
    feature_version: str
    threshold: float
    notes: list[str]
    seconds_features: float
    seconds_scoring: float
    seconds_total: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _atomic_parquet(table: pa.Table, output: Path) -> None:
    import pyarrow.parquet as pq

    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    os.close(fd)
    try:
        pq.write_table(table, name)
        os.replace(name, output)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _check_output(source: Path, output: Path) -> None:
    if output.exists() and output.resolve() == source.resolve():
        raise ScoringError(f"--output {output}: the input file itself; name another file")
    if output.is_dir():
        raise ScoringError(f"--output {output}: is a directory, expected a file name")
    if not output.parent.is_dir():
        raise ScoringError(f"--output {output}: directory {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK):
        raise ScoringError(f"--output {output}: directory {output.parent} is not writable")


def score_transactions(scorer: Scorer, transactions: Any) -> tuple[np.ndarray, float, float]:
    """(scores in the table's row order, seconds for the features, seconds for the model)."""
    from stripe_platform.ml.features import FEATURE_NAMES, batch_features

    started = time.perf_counter()
    features = batch_features(transactions)[list(FEATURE_NAMES)]
    middle = time.perf_counter()
    scores = scorer.scores(features)
    return scores, middle - started, time.perf_counter() - middle


def score_file(
    settings: Settings, source: str | Path, output: str | Path, *, scorer: Scorer | None = None
) -> FileScores:
    """Score a user's parquet file with the champion; one row per transaction id in ``output``."""
    import pyarrow.parquet as pq

    from stripe_platform.ml.contract import read_transactions

    started = time.perf_counter()
    source, output = Path(source), Path(output)
    _check_output(source, output)
    transactions = read_transactions(source, require_labels=False)
    scorer = scorer or Scorer.champion(settings)
    scores, seconds_features, seconds_scoring = score_transactions(scorer, transactions)
    ids: pa.Array = transactions.table["transaction_id"].combine_chunks()
    original = pq.read_schema(source).field("transaction_id").type
    if pa.types.is_integer(original):  # give the ids back as the user wrote them
        ids = ids.cast(pa.int64())
    flagged = scorer.decide(scores)
    metadata = {
        "model_name": scorer.model_name,
        "model_version": scorer.version,
        "feature_version": scorer.feature_version,
        "decision_threshold": repr(scorer.threshold),
        "source": str(source),
        "scored_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    table = pa.table(
        {"transaction_id": ids, "score": pa.array(scores), "is_fraud": pa.array(flagged)}
    ).replace_schema_metadata({f"stripe_platform.{k}": v for k, v in metadata.items()})
    _atomic_parquet(table, output)
    return FileScores(
        source=str(source),
        output=str(output),
        rows=table.num_rows,
        flagged=int(flagged.sum()),
        model_name=scorer.model_name,
        model_version=scorer.version,
        feature_version=scorer.feature_version,
        threshold=scorer.threshold,
        notes=transactions.notes(),
        seconds_features=seconds_features,
        seconds_scoring=seconds_scoring,
        seconds_total=time.perf_counter() - started,
    )


# -- the platform --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlatformScores:
    model_name: str
    model_version: str
    threshold: float
    scored: int  # FraudScore rows this run inserted
    flagged: int  # of which IsFraud
    already_scored: int  # payments this version had scored before the run
    documents_updated: int  # Transaction documents whose score this run wrote
    documents_missing: int  # scored payments without a Transaction document
    document_statements: int  # UPDATEs on FerretDB's backend, update commands elsewhere
    seconds_features: float
    seconds_scoring: float
    seconds_rows: float
    seconds_documents: float
    seconds_total: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unscored(conn: Any, scorer: Scorer) -> tuple[dt.datetime | None, int, int]:
    """(the earliest payment this version has not scored, how many, how many it has)."""
    first, count = conn.execute(
        """SELECT min(t.DateTime), count(*) FROM Transaction t
           WHERE NOT EXISTS (SELECT FROM FraudScore s WHERE s.TransactionID = t.ID
                             AND s.ModelName = %s AND s.ModelVersion = %s)""",
        (scorer.model_name, int(scorer.version)),
    ).fetchone()
    (done,) = conn.execute(
        "SELECT count(*) FROM FraudScore WHERE ModelName = %s AND ModelVersion = %s",
        (scorer.model_name, int(scorer.version)),
    ).fetchone()
    return first, count, done


def _insert_scores(conn: Any, rows: pa.Table) -> tuple[int, int]:
    """The rows into FraudScore in one transaction; those already there are left alone.
    Returns (rows inserted, of which flagged)."""
    from stripe_platform.oltp import db

    columns = ", ".join(rows.column_names)
    with conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE fraudscore_new (LIKE FraudScore INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        db.copy_arrow(conn, "fraudscore_new", rows)
        inserted, flagged = conn.execute(
            f"""WITH inserted AS (
                    INSERT INTO FraudScore ({columns}) SELECT {columns} FROM fraudscore_new
                    ON CONFLICT (TransactionID, ModelName, ModelVersion) DO NOTHING
                    RETURNING IsFraud)
                SELECT count(*), count(*) FILTER (WHERE IsFraud) FROM inserted"""
        ).fetchone()
    return inserted, flagged


def _pending(conn: Any, scorer: Scorer) -> Iterator[list[tuple]]:
    """This version's rows whose document is not written yet, in batches (by transaction id)."""
    after = -1
    while True:
        rows = conn.execute(
            """SELECT TransactionID, Score, IsFraud FROM FraudScore
               WHERE ModelName = %s AND ModelVersion = %s AND DocumentWrittenAt IS NULL
                 AND TransactionID > %s
               ORDER BY TransactionID LIMIT %s""",
            (scorer.model_name, int(scorer.version), after, DOCUMENT_BATCH),
        ).fetchall()
        if not rows:
            return
        yield rows
        after = rows[-1][0]


def _write_documents(settings: Settings, conn: Any, scorer: Scorer) -> tuple[int, int, int]:
    """AnomalyScore and isFraud into the Transaction documents of the pending rows, a batch at a
    time (``docstore.validation.set_fields``), each batch marked written once it is. Returns
    (documents matched, payments without a document, statements sent)."""
    from stripe_platform.docstore import validation
    from stripe_platform.docstore.client import connect

    database = connect(settings)
    matched = missing = statements = 0
    try:
        for rows in _pending(conn, scorer):
            result = validation.set_fields(
                database,
                settings,
                COLLECTION,
                "transaction_id",
                [
                    (int(tid), {"AnomalyScore": float(score), "isFraud": int(bool(flag))})
                    for tid, score, flag in rows
                ],
            )
            conn.execute(
                """UPDATE FraudScore SET DocumentWrittenAt = CURRENT_TIMESTAMP
                   WHERE ModelName = %s AND ModelVersion = %s AND TransactionID = ANY(%s)""",
                (scorer.model_name, int(scorer.version), [int(r[0]) for r in rows]),
            )
            matched += result.matched
            missing += len(result.missing)
            statements += result.statements
    finally:
        database.client.close()
    return matched, missing, statements


def score_platform(settings: Settings, *, scorer: Scorer | None = None) -> PlatformScores:
    """Score every payment the champion has not scored, then write the pending documents."""
    from psycopg import sql

    from stripe_platform.ml.contract import load_platform_transactions
    from stripe_platform.ml.drift import feature_horizon
    from stripe_platform.oltp import db

    started = time.perf_counter()
    scorer = scorer or Scorer.champion(settings)
    if not scorer.version.isdigit():
        raise ScoringError(f"{scorer.label}: a registered version is a number")
    seconds_features = seconds_scoring = seconds_rows = 0.0
    scored = flagged = 0
    with db.connect(settings, autocommit=True, with_key=False) as conn:
        # One scorer at a time: a second run waits, then finds nothing left to score.
        conn.execute(sql.SQL("SELECT pg_advisory_lock({})").format(sql.Literal(LOCK_KEY)))
        try:
            first, count, done = _unscored(conn, scorer)
            if count:
                history = load_platform_transactions(
                    settings, start=first - feature_horizon(), require_labels=False
                )
                scores, seconds_features, seconds_scoring = score_transactions(scorer, history)
                table = history.table
                ids = table["transaction_id"].cast(pa.int64())
                scored_before = pa.array(
                    [
                        r[0]
                        for r in conn.execute(
                            "SELECT TransactionID FROM FraudScore WHERE ModelName = %s "
                            "AND ModelVersion = %s AND TransactionDateTime >= %s",
                            (scorer.model_name, int(scorer.version), first),
                        )
                    ],
                    pa.int64(),
                )
                wanted = pc.and_(
                    pc.greater_equal(table["timestamp"], pa.scalar(first, table["timestamp"].type)),
                    pc.invert(pc.is_in(ids, value_set=scored_before)),
                ).to_numpy(zero_copy_only=False)
                picked = scores[wanted]
                decisions = scorer.decide(picked)
                now = dt.datetime.now(dt.UTC)
                n = int(wanted.sum())
                rows = pa.table(
                    {
                        "transactionid": ids.filter(pa.array(wanted)),
                        "transactiondatetime": table["timestamp"].filter(pa.array(wanted)),
                        "modelname": pa.array([scorer.model_name] * n, pa.string()),
                        "modelversion": pa.array(np.full(n, int(scorer.version), np.int32)),
                        "featureversion": pa.array([scorer.feature_version] * n, pa.string()),
                        "score": pa.array(picked),
                        "threshold": pa.array(np.full(n, scorer.threshold)),
                        "isfraud": pa.array(decisions),
                        "scoredat": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                    }
                )
                middle = time.perf_counter()
                scored, flagged = _insert_scores(conn, rows)
                seconds_rows = time.perf_counter() - middle
            documents_started = time.perf_counter()
            matched, missing, statements = _write_documents(settings, conn, scorer)
            seconds_documents = time.perf_counter() - documents_started
        finally:
            conn.execute(sql.SQL("SELECT pg_advisory_unlock({})").format(sql.Literal(LOCK_KEY)))
    return PlatformScores(
        model_name=scorer.model_name,
        model_version=scorer.version,
        threshold=scorer.threshold,
        scored=scored,
        flagged=flagged,
        already_scored=done,
        documents_updated=matched,
        documents_missing=missing,
        document_statements=statements,
        seconds_features=seconds_features,
        seconds_scoring=seconds_scoring,
        seconds_rows=seconds_rows,
        seconds_documents=seconds_documents,
        seconds_total=time.perf_counter() - started,
    )
