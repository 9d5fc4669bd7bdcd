"""Train the fraud model, evaluate it beside the rules baseline, register it, and gate promotion.

One entry point, :func:`train_fraud` (``stripe-platform ml train``, the demo, the Airflow DAG, the
Kubernetes Job): load labelled transactions (the platform's PostgreSQL, or a user's parquet
file), split them by time (:mod:`~stripe_platform.ml.split`), compute the one feature definition
point in time over the history (:func:`~stripe_platform.ml.features.batch_features`), fit
LightGBM on the training period's labels known at the test start, score the held-back test period
with the candidate, the current champion and the rules baseline (:mod:`~stripe_platform.ml.rules`),
log one MLflow run (params, metrics, the model, the feature list and version, the data snapshot
id), register a version, and move ``champion`` to it only when it beats the champion on the same
held-back payments (:func:`~stripe_platform.ml.registry.decide` on average precision).

The gate compares on payments neither model trained on: when the champion's training reached into
the candidate's test period (it was trained later, or on a later split), only the test payments
after the champion's training end count, for both; when none are left (or they hold no fraud) the
candidate is not promoted. A champion recorded with other features than the code computes cannot
be scored: any candidate replaces it.

Every check on the data (the contract, the split) and on the store (reachable) happens before the
first write to MLflow: bad input registers nothing. :func:`evaluate_champion` (``ml evaluate``)
scores the champion and the rules on a split's test period without training.

**Why LightGBM** (gradient-boosted trees) and not XGBoost or a neural network: it trains on a
million payments in about 1.5-2 minutes on 2 shared cores (measured: fit 78-104 s at scale 1,
bench/results/ml-*.json; histogram-based, leaf-wise growth); it takes
missing values as they are (NaN is the features' "cannot be known": no device, no history) and
learns where they go at each split instead of needing an imputation that both engines would have
to repeat; and it handles the class imbalance (about 0.5% fraud) through ``scale_pos_weight`` or
``is_unbalance`` when wanted. The default leaves the weights alone: average precision, the gate's
metric, depends on the order of scores only, and reweighting did not improve it on the seed's data
(it makes scores less like probabilities). Trees also need no feature scaling, so the online state
feeds the model the very values it computes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from stripe_platform.ml import rules
from stripe_platform.ml.contract import Transactions, load_platform_transactions, read_transactions
from stripe_platform.ml.evaluate import DEFAULT_ALERT_BUDGET, DEFAULT_K, Metrics, evaluate
from stripe_platform.ml.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    FeatureMismatch,
    batch_features,
)
from stripe_platform.ml.registry import (
    LoadedModel,
    Registry,
    decide,
    load_champion,
    load_version,
)
from stripe_platform.ml.split import Split, SplitSpec, split

if TYPE_CHECKING:
    import lightgbm as lgb

    from stripe_platform.config import Settings

GATE_METRIC = "average_precision"
NUM_BOOST_ROUND = 300
# Below this many rows LightGBM runs on one thread. Its OpenMP threads wait for each other at
# every split; on shared cores a descheduled one stalls the rest, and small data has too little
# work per iteration to pay for that: 41,386 rows, 300 rounds on 2 busy cores (load 5-6) fit in
# 12-14 s on 2 threads and 1.2-1.4 s on one (0.7 s vs 1.2 s on idle cores); the model is the
# same (``deterministic``).
SINGLE_THREAD_ROWS = 200_000
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "seed": 42,
    "deterministic": True,
    "force_row_wise": True,
    "verbosity": -1,
}


# -- data ----------------------------------------------------------------------------------------
def load_transactions(
    settings: Settings,
    transactions: Transactions | str | Path | None = None,
    *,
    require_labels: bool = True,
) -> Transactions:
    """Canonical transactions: given, read from a parquet file, or the platform's own. The
    platform's own are its customers' payments: only those of customers who consent to
    ``ml_training`` now (issue 23, compliance/consent.py) train or evaluate a model."""
    if isinstance(transactions, Transactions):
        return transactions
    if transactions is not None:
        return read_transactions(transactions, require_labels=require_labels)
    return load_platform_transactions(
        settings, require_labels=require_labels, purpose="ml_training"
    )


def snapshot_id(transactions: Transactions) -> str:
    """Identifies the data a model saw: a hash of the canonical table's content (its Arrow IPC
    stream, so the same payments and labels read from anywhere give the same id)."""
    digest = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, transactions.table.schema) as writer:
        writer.write_table(transactions.table)
    digest.update(sink.getvalue())
    return f"sha256:{digest.hexdigest()[:24]}"


@dataclass(frozen=True)
class Prepared:
    """Transactions split by time with the features of every row up to the test end."""

    transactions: Transactions
    split: Split
    features: pd.DataFrame  # row i = the table's row i, for rows before split.test_end

    def rows(self, which: np.ndarray) -> pd.DataFrame:
        return self.features.iloc[which]

    def column(self, name: str, which: np.ndarray) -> np.ndarray:
        return self.transactions.table[name].take(pa.array(which)).to_numpy(zero_copy_only=False)

    def metrics(
        self,
        scores: np.ndarray,
        which: np.ndarray | None = None,
        *,
        alert_budget: float = DEFAULT_ALERT_BUDGET,
        k: int = DEFAULT_K,
    ) -> Metrics:
        """Metrics of ``scores`` (one per test row, or per row of ``which`` when given: a subset
        of the test rows) against the test labels."""
        test = self.split.test_rows
        labels = self.split.test_labels
        if which is not None:
            position = np.searchsorted(test, which)
            labels = labels[position]
        else:
            which = test
        return evaluate(
            labels,
            scores,
            customers=self.column("customer_id", which),
            timestamps=self.column("timestamp", which),
            alert_budget=alert_budget,
            k=k,
        )


def prepare(transactions: Transactions, spec: SplitSpec | None = None) -> Prepared:
    s = split(transactions, spec)
    table = transactions.table
    history = int(s.test_rows[-1]) + 1  # later payments change no feature of these rows
    features = batch_features(table.slice(0, history))
    return Prepared(transactions, s, features)


# -- the model -------------------------------------------------------------------------------------
def threads(rows: int) -> int:
    """LightGBM threads for ``rows`` rows (training or predicting): see SINGLE_THREAD_ROWS."""
    return 1 if rows < SINGLE_THREAD_ROWS else os.cpu_count() or 1


def fit(
    features: pd.DataFrame,
    labels: np.ndarray,
    *,
    params: dict[str, Any] | None = None,
    num_boost_round: int = NUM_BOOST_ROUND,
) -> lgb.Booster:
    import lightgbm as lgb

    params = {**DEFAULT_PARAMS, "num_threads": threads(len(features)), **(params or {})}
    data = lgb.Dataset(features, label=labels, feature_name=list(features.columns))
    return lgb.train(params, data, num_boost_round=num_boost_round)


def model_scores(model: LoadedModel, features: pd.DataFrame) -> np.ndarray:
    """A registered model's fraud scores for ``features`` (the columns it recorded, in order)."""
    frame = features[model.feature_names]
    raw = model.raw
    # The booster itself: MLflow's pyfunc wrapper adds a schema check per call and nothing else.
    if type(raw).__module__.startswith("lightgbm"):
        return _predict(raw, frame).reshape(-1)
    return np.asarray(model.model.predict(frame), np.float64).reshape(-1)


def _predict(booster: lgb.Booster, features: pd.DataFrame) -> np.ndarray:
    return np.asarray(booster.predict(features, num_threads=threads(len(features))), np.float64)


# -- reports ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model_name: str
    version: str
    run_id: str
    model_uri: str
    promoted: bool  # the champion alias now points at this version
    passed_gate: bool  # it beat the champion (promoted unless train_fraud(promote=False))
    gate_reason: str
    source: str
    rows: int
    snapshot_id: str
    split: dict[str, Any]
    metrics: dict[str, Any]
    rules_metrics: dict[str, Any]
    champion_version: str | None
    champion_metrics: dict[str, Any] | None  # on the gate's payments
    gate_metrics: dict[str, Any] | None  # the candidate on the gate's payments
    seconds: float
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "feature_version": FEATURE_VERSION,
            "ap_ratio": _ratio(self.metrics, self.rules_metrics),
        }


@dataclass
class EvaluationResult:
    model_name: str
    version: str
    source: str
    rows: int
    split: dict[str, Any]
    metrics: dict[str, Any]
    rules_metrics: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ap_ratio": _ratio(self.metrics, self.rules_metrics)}


def _ratio(model: dict[str, Any], baseline: dict[str, Any]) -> float | None:
    base = baseline["average_precision"]
    return model["average_precision"] / base if base else None


def _trained_until(tags: dict[str, str]) -> dt.datetime | None:
    value = tags.get("train_end")
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC) if value else None


def _unseen_rows(prepared: Prepared, champion_tags: dict[str, str]) -> tuple[np.ndarray, str]:
    """The test rows the champion did not train on, and a note when that is not all of them."""
    test = prepared.split.test_rows
    until = _trained_until(champion_tags)
    if until is None or until <= prepared.split.test_start:
        return test, ""
    ts = prepared.column("timestamp", test)
    keep = test[ts >= np.datetime64(until.replace(tzinfo=None), "us")]
    return keep, (
        f"the champion trained on payments up to {until.date()}: the gate compares on the "
        f"{len(keep)} test payments after that"
    )


def _metric_items(prefix: str, metrics: Metrics | dict[str, Any] | None) -> dict[str, float]:
    """The float metrics, named for MLflow (none when there are no metrics)."""
    if metrics is None:
        return {}
    values = metrics.as_dict() if isinstance(metrics, Metrics) else metrics
    return {f"{prefix}{k}": float(v) for k, v in values.items() if isinstance(v, float)}


# -- the entry points --------------------------------------------------------------------------------
def train_fraud(
    settings: Settings,
    *,
    transactions: Transactions | str | Path | None = None,
    split: SplitSpec | None = None,
    model_name: str | None = None,
    params: dict[str, Any] | None = None,
    num_boost_round: int = NUM_BOOST_ROUND,
    feature_columns: list[str] | None = None,
    registry: Registry | None = None,
    promote: bool = True,
) -> TrainResult:
    """Train, evaluate, log, register and gate the fraud model (see the module's docstring).

    ``transactions``: canonical transactions, a parquet file's path, or None for the platform's
    PostgreSQL. ``model_name``: default ``settings.ml_model_name``. ``feature_columns`` trains on
    a subset of the features (the others are given to the model as missing; for experiments).
    ``promote=False`` decides the gate (``passed_gate``) but leaves the alias where it is, for a
    caller that moves it later (the DAG's promote task). Raises before writing anything on bad data, an impossible split or an unreachable store.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 3)
        return now

    registry = registry or Registry.from_settings(settings)
    name = model_name or settings.ml_model_name
    registry.check()
    t = lap("registry_check", started)
    data = load_transactions(settings, transactions)
    t = lap("load", t)
    prepared = prepare(data, split)
    t = lap("features", t)
    s = prepared.split

    train_x = prepared.rows(s.train_rows)
    if feature_columns is not None:
        unknown = sorted(set(feature_columns) - set(FEATURE_NAMES))
        if unknown:
            raise FeatureMismatch(f"unknown feature(s) {unknown}; known: {list(FEATURE_NAMES)}")
        train_x = train_x.copy()
        train_x.loc[:, [c for c in FEATURE_NAMES if c not in feature_columns]] = np.nan
    booster = fit(train_x, s.train_labels, params=params, num_boost_round=num_boost_round)
    t = lap("fit", t)

    test_x = prepared.rows(s.test_rows)
    candidate = prepared.metrics(_predict(booster, test_x))
    baseline = prepared.metrics(rules.rules_score(test_x))
    t = lap("evaluate", t)

    notes = list(data.notes())
    if s.labels_not_yet_known:
        notes.append(
            f"{s.labels_not_yet_known} training fraud(s) reported after {s.test_start.date()} "
            "counted as legitimate (not known when the model would go live)"
        )
    # The gate: the champion, scored on the same held-back payments.
    champion_version = registry.champion(name)
    champion_metrics = gate_metrics = None
    champion_ap: float | None = None
    comparable = True
    if champion_version is not None:
        try:
            champion = load_version(registry, champion_version)
        except FeatureMismatch as exc:
            notes.append(f"champion version {champion_version.version} cannot be scored: {exc}")
        else:
            rows, note = _unseen_rows(prepared, champion.tags)
            if note:
                notes.append(note)
            labels = s.test_labels[np.searchsorted(s.test_rows, rows)]
            if len(rows) and labels.any() and not labels.all():
                features = prepared.rows(rows)
                champ = prepared.metrics(model_scores(champion, features), rows)
                mine = prepared.metrics(_predict(booster, features), rows)
                champion_metrics, gate_metrics = champ.as_dict(), mine.as_dict()
                champion_ap = champ.average_precision
            else:
                comparable = False
    t = lap("gate", t)

    if comparable:
        candidate_ap = (
            gate_metrics[GATE_METRIC] if gate_metrics is not None else candidate.average_precision
        )
        decision = decide(
            candidate_ap,
            champion_ap,
            metric=GATE_METRIC,
            champion_version=None if champion_version is None else str(champion_version.version),
        )
        passed, reason = decision.promote, decision.reason
    else:
        passed = False
        reason = (
            f"no test payment after champion version {champion_version.version}'s training "
            "holds both a fraud and a legitimate payment: nothing to compare on, the champion "
            "stays"
        )

    snapshot = snapshot_id(data)
    table = data.table
    max_ts = table["timestamp"][-1].as_py()
    period = s.as_dict()
    version_tags = {
        "data_snapshot": snapshot,
        "train_start": period["train_start"],
        "train_end": period["train_end"],
        "test_start": period["test_start"],
        "test_end": period["test_end"],
        GATE_METRIC: f"{candidate.average_precision:.6f}",
    }
    registered = registry.log_and_register(
        name,
        log_model=lambda: _log_booster(booster, test_x.head(5)),
        params={
            **DEFAULT_PARAMS,
            **(params or {}),
            "num_boost_round": num_boost_round,
            **{f"split_{k}": v for k, v in period.items() if not k.endswith(("rows", "known"))},
            "feature_columns": "all" if feature_columns is None else ",".join(feature_columns),
        },
        metrics={
            **_metric_items("test_", candidate),
            **_metric_items("rules_", baseline),
            **_metric_items("champion_", champion_metrics),
            **_metric_items("gate_candidate_", gate_metrics),
            "train_rows": len(s.train_rows),
            "train_positives": int(s.train_labels.sum()),
            "test_rows": len(s.test_rows),
            "test_positives": int(s.test_labels.sum()),
        },
        tags={
            "data_snapshot": snapshot,
            "data_source": data.source,
            "data_rows": str(data.num_rows),
            "data_max_timestamp": max_ts.isoformat(),
            "model_kind": "lightgbm",
        },
        documents={
            "features": {"version": FEATURE_VERSION, "names": list(FEATURE_NAMES)},
            "split": period,
            "rules": rules.describe(),
            "evaluation": {
                "candidate": candidate.as_dict(),
                "rules": baseline.as_dict(),
                "champion": champion_metrics,
                "gate_candidate": gate_metrics,
            },
        },
        version_tags=version_tags,
        feature_version=FEATURE_VERSION,
        feature_names=FEATURE_NAMES,
    )
    t = lap("register", t)
    promoted = passed and promote
    if promoted:
        registry.promote(name, registered.version)
    verdict = (
        "promoted"
        if promoted
        else "passed, promotion left to the caller"
        if passed
        else ("not promoted")
    )
    registry.set_version_tag(name, registered.version, "gate", f"{verdict}: {reason}")
    lap("promote", t)
    return TrainResult(
        model_name=name,
        version=registered.version,
        run_id=registered.run_id,
        model_uri=f"models:/{name}/{registered.version}",
        promoted=promoted,
        passed_gate=passed,
        gate_reason=reason,
        source=data.source,
        rows=data.num_rows,
        snapshot_id=snapshot,
        split=period,
        metrics=candidate.as_dict(),
        rules_metrics=baseline.as_dict(),
        champion_version=None if champion_version is None else str(champion_version.version),
        champion_metrics=champion_metrics,
        gate_metrics=gate_metrics,
        seconds=round(time.perf_counter() - started, 3),
        timings=timings,
        notes=notes,
    )


def _log_booster(booster: lgb.Booster, example: pd.DataFrame) -> Any:
    import lightgbm
    import mlflow.lightgbm
    from mlflow.models import infer_signature

    signature = infer_signature(example, booster.predict(example))
    # Pinned requirements: MLflow would otherwise infer them by importing the environment (slow).
    # Its notes on how it wrote the environment files (no pip version, a uv project) say nothing
    # to a user training a model: quiet for this call.
    chatty = [logging.getLogger(n) for n in ("mlflow.utils.environment", "mlflow.utils.uv_utils")]
    levels = [logger.level for logger in chatty]
    for logger in chatty:
        logger.setLevel(logging.ERROR)
    try:
        return mlflow.lightgbm.log_model(
            booster,
            name="model",
            signature=signature,
            pip_requirements=[f"lightgbm=={lightgbm.__version__}", f"mlflow=={mlflow.__version__}"],
        )
    finally:
        for logger, level in zip(chatty, levels, strict=True):
            logger.setLevel(level)


def evaluate_champion(
    settings: Settings,
    *,
    transactions: Transactions | str | Path | None = None,
    split: SplitSpec | None = None,
    model_name: str | None = None,
    registry: Registry | None = None,
) -> EvaluationResult:
    """The champion's metrics beside the rules' on ``split``'s test period (no training)."""
    registry = registry or Registry.from_settings(settings)
    name = model_name or settings.ml_model_name
    registry.check()
    champion = load_champion(registry, name)
    data = load_transactions(settings, transactions)
    prepared = prepare(data, split)
    test_x = prepared.rows(prepared.split.test_rows)
    notes = list(data.notes())
    until = _trained_until(champion.tags)
    if until is not None and until > prepared.split.test_start:
        notes.append(
            f"the champion trained on payments up to {until.date()}, inside this test period "
            f"(from {prepared.split.test_start.date()}): its metrics here are optimistic"
        )
    return EvaluationResult(
        model_name=name,
        version=champion.version,
        source=data.source,
        rows=data.num_rows,
        split=prepared.split.as_dict(),
        metrics=prepared.metrics(model_scores(champion, test_x)).as_dict(),
        rules_metrics=prepared.metrics(rules.rules_score(test_x)).as_dict(),
        notes=notes,
    )


__all__ = [
    "GATE_METRIC",
    "EvaluationResult",
    "Prepared",
    "TrainResult",
    "evaluate_champion",
    "fit",
    "load_transactions",
    "model_scores",
    "prepare",
    "snapshot_id",
    "train_fraud",
]
