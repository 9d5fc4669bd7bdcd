"""Data drift: has the latest window of payments moved away from what the champion learned from?

Evidently (0.7.x, pinned in pyproject.toml: its API changed between minors) is used behind this
one module: nothing else imports it. :func:`compare` hands Evidently two frames of the model's
features (``FEATURE_NAMES``): the **reference**, the champion's training payments, and the
**current** window, the latest ``window_days`` (7 by default) of the platform's payments, each
computed point in time by the one feature definition (:func:`~stripe_platform.ml.features.
batch_features`) from its own history. Evidently picks a test per feature from its values and the
sample size (Wasserstein distance for numeric features, Jensen-Shannon for those with few values,
Kolmogorov-Smirnov or chi-squared on small samples) and says which features drifted.

The verdict: **drift** when the share of drifted features reaches ``drift_share`` (0.5 by default,
Evidently's own dataset-drift rule). A feature whose values are all missing on one side only
(a source stopped sending device ids) counts as drifted ("presence"); one missing on both sides
is not compared. Each side is sampled uniformly down to ``MAX_ROWS`` rows (fixed seed): the
distances do not need more, and Evidently's time grows with the rows.

:func:`check_platform_drift` (``stripe-platform ml drift``; the ``ml_fraud_training`` DAG, where a
drift verdict triggers retraining) writes, under ``<home>/ml/drift/<UTC time>/``, Evidently's
HTML report (``report.html``) and the JSON verdict (``verdict.json``), and copies the verdict to
``<home>/ml/drift/latest.json``. Files are written whole (a temporary file renamed), never half.

The reference is the champion's training period (the version's ``train_start`` and ``train_end``
tags), recomputed from the platform's PostgreSQL: the history the model was trained on is still
there. A champion trained from a user's file (``ml train --transactions``) has no
such period on the platform: the check refuses it with a clear error.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stripe_platform.errors import PlatformError

if TYPE_CHECKING:
    from stripe_platform.config import Settings

DEFAULT_WINDOW_DAYS = 7
DEFAULT_DRIFT_SHARE = 0.5  # Evidently's default: dataset drift when half the features drifted
MAX_ROWS = 50_000
SAMPLE_SEED = 18


class DriftError(PlatformError, ValueError):
    """Drift cannot be measured (no data in a window, no reference); the message says why."""


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's comparison: Evidently's method, score and threshold, and its decision."""

    name: str
    method: str
    score: float | None
    threshold: float | None
    drifted: bool
    compared: bool = True


@dataclass(frozen=True)
class Side:
    """What one side of the comparison was: rows (before sampling), rows given to Evidently,
    the period (UTC, end excluded) and where it comes from."""

    source: str
    rows: int
    rows_compared: int
    start: str | None = None
    end: str | None = None


@dataclass(frozen=True)
class DriftVerdict:
    drifted: bool
    drift_share: float
    drift_share_threshold: float
    drifted_features: list[str]
    features: list[FeatureDrift]
    reference: Side
    current: Side
    evidently_version: str
    created_at: str
    model: dict[str, str] = field(default_factory=dict)  # name, version of the champion
    html_path: str | None = None
    json_path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "DRIFT" if self.drifted else "no drift"
        return (
            f"{verdict}: {len(self.drifted_features)} of "
            f"{sum(f.compared for f in self.features)} features drifted "
            f"(share {self.drift_share:.2f}, threshold {self.drift_share_threshold:.2f})"
        )


def _sample(frame: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    if len(frame) <= max_rows:
        return frame.reset_index(drop=True)
    rng = np.random.default_rng(SAMPLE_SEED)
    rows = np.sort(rng.choice(len(frame), max_rows, replace=False))
    return frame.iloc[rows].reset_index(drop=True)


def _evidently_version() -> str:
    from importlib.metadata import version

    return version("evidently")


def _run_evidently(reference: pd.DataFrame, current: pd.DataFrame, drift_share: float) -> Any:
    """Evidently's data-drift preset with its tests (one per column); returns the snapshot."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=list(reference.columns))
    report = Report([DataDriftPreset(drift_share=drift_share)], include_tests=True)
    # Constant columns make its normalisations divide by zero: warnings, not errors.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return report.run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )


def _column_results(snapshot: Any) -> dict[str, FeatureDrift]:
    """Per column, Evidently's ValueDrift metric and its test's status (FAIL = drifted)."""
    data = json.loads(snapshot.json())
    metrics = {m["id"]: m for m in data["metrics"]}
    found: dict[str, FeatureDrift] = {}
    for test in data["tests"]:
        params = test["metric_config"]["params"]
        if not params.get("type", "").endswith("ValueDrift"):
            continue
        metric = metrics.get(test["metric_config"]["metric_id"], {})
        value = metric.get("value")
        found[params["column"]] = FeatureDrift(
            name=params["column"],
            method=str(params.get("method")),
            score=None if value is None else float(value),
            threshold=params.get("threshold"),
            drifted=str(test["status"]).upper().endswith("FAIL"),
        )
    return found


@dataclass
class Comparison:
    """:func:`compare`'s result: the verdict (without paths) and Evidently's snapshot, which
    :meth:`save_html` writes."""

    verdict: DriftVerdict
    snapshot: Any

    def save_html(self, path: Path) -> None:
        if self.snapshot is None:  # nothing was comparable: a page that says so
            _write_atomic(path, "<html><body><p>No feature could be compared.</p></body></html>")
            return
        with _atomic_path(path) as tmp:
            self.snapshot.save_html(str(tmp))


def compare(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    columns: Sequence[str] | None = None,
    drift_share: float = DEFAULT_DRIFT_SHARE,
    max_rows: int = MAX_ROWS,
    reference_source: str = "reference",
    current_source: str = "current",
    periods: tuple[tuple[str | None, str | None], tuple[str | None, str | None]] = (
        (None, None),
        (None, None),
    ),
) -> Comparison:
    """Compare ``current`` with ``reference`` feature by feature (``columns``: all of the
    reference's by default) and decide: drift when the share of drifted features is at least
    ``drift_share``."""
    if not 0 < drift_share <= 1:
        raise DriftError(f"drift share {drift_share}: expected a share in (0, 1]")
    columns = list(columns if columns is not None else reference.columns)
    missing = [c for c in columns if c not in reference.columns or c not in current.columns]
    if missing:
        raise DriftError(f"features missing from the data to compare: {missing}")
    if reference.empty:
        raise DriftError(f"{reference_source}: no payments to compare against")
    if current.empty:
        raise DriftError(f"{current_source}: no payments in the window")
    ref = _sample(reference[columns].astype("float64"), max_rows)
    cur = _sample(current[columns].astype("float64"), max_rows)

    results: dict[str, FeatureDrift] = {}
    comparable = []
    for name in columns:
        ref_empty, cur_empty = ref[name].isna().all(), cur[name].isna().all()
        if ref_empty and cur_empty:
            results[name] = FeatureDrift(name, "presence", None, None, False, compared=False)
        elif ref_empty or cur_empty:  # present on one side only: the data changed shape
            results[name] = FeatureDrift(name, "presence", None, None, True)
        else:
            comparable.append(name)
    snapshot = None
    if comparable:
        snapshot = _run_evidently(ref[comparable], cur[comparable], drift_share)
        found = _column_results(snapshot)
        lost = [c for c in comparable if c not in found]
        if lost:
            raise DriftError(f"Evidently returned no drift test for {lost}")
        results.update(found)
    features = [results[name] for name in columns]
    compared = [f for f in features if f.compared]
    drifted = [f.name for f in compared if f.drifted]
    share = len(drifted) / len(compared) if compared else 0.0
    (ref_start, ref_end), (cur_start, cur_end) = periods
    verdict = DriftVerdict(
        drifted=bool(compared) and share >= drift_share,
        drift_share=share,
        drift_share_threshold=drift_share,
        drifted_features=drifted,
        features=features,
        reference=Side(reference_source, len(reference), len(ref), ref_start, ref_end),
        current=Side(current_source, len(current), len(cur), cur_start, cur_end),
        evidently_version=_evidently_version(),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    return Comparison(verdict, snapshot)


# -- files written whole ------------------------------------------------------------------------------
class _atomic_path:
    """A temporary path beside ``path``, renamed onto it when the block succeeds."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_text(text)


def write_verdict(comparison: Comparison, directory: Path) -> DriftVerdict:
    """``report.html`` and ``verdict.json`` in ``directory`` (created), and the verdict with its
    paths; the HTML first, so a verdict on disk always has its report."""
    html, verdict_json = directory / "report.html", directory / "verdict.json"
    comparison.save_html(html)
    verdict = _with_paths(comparison.verdict, html, verdict_json)
    _write_atomic(verdict_json, json.dumps(verdict.as_dict(), indent=2) + "\n")
    return verdict


def _with_paths(verdict: DriftVerdict, html: Path, verdict_json: Path) -> DriftVerdict:
    from dataclasses import replace

    return replace(verdict, html_path=str(html), json_path=str(verdict_json))


# -- the platform: the champion's training period against the latest window ---------------------------
def drift_dir(settings: Settings) -> Path:
    return settings.home_dir / "ml" / "drift"


def feature_horizon(specs: Sequence[Any] | None = None) -> dt.timedelta:
    """How far back a payment's features look (the longest window, a merchant risk's window plus
    its delay): the history to load before the first payment whose features are wanted."""
    from stripe_platform.ml.features import FEATURES

    longest = dt.timedelta(0)
    for spec in specs if specs is not None else FEATURES:
        span = (spec.window or dt.timedelta(0)) + (spec.delay or dt.timedelta(0))
        longest = max(longest, span)
    return longest


def platform_features(
    settings: Settings, start: dt.datetime, end: dt.datetime
) -> tuple[pd.DataFrame, int]:
    """Features of the platform's payments with ``start <= timestamp < end``, each computed from
    its own history (loaded from ``start`` less the feature horizon); and how many there are."""
    import pyarrow.compute as pc

    from stripe_platform.ml.contract import EmptyTransactions, load_platform_transactions
    from stripe_platform.ml.features import FEATURE_NAMES, batch_features

    try:
        history = load_platform_transactions(
            settings, start=start - feature_horizon(), end=end, require_labels=False
        )
    except EmptyTransactions:
        return pd.DataFrame(columns=list(FEATURE_NAMES), dtype="float64"), 0
    features = batch_features(history)
    ts = history.table["timestamp"]
    inside = pc.and_(pc.greater_equal(ts, start), pc.less(ts, end)).to_numpy(zero_copy_only=False)
    selected = features[inside].reset_index(drop=True)
    return selected, len(selected)


def latest_payment_time(settings: Settings) -> dt.datetime | None:
    from stripe_platform.oltp import db

    with db.connect(settings, autocommit=True, with_key=False) as conn:
        row = conn.execute("SELECT max(DateTime) FROM Transaction").fetchone()
    return None if row is None else row[0]


PLATFORM_SOURCE = "PostgreSQL database"  # how the contract names the platform's data


def champion_training_period(settings: Settings) -> tuple[dict[str, str], dt.datetime, dt.datetime]:
    """The champion (name, version) and its training period (UTC days, end excluded), as its
    version records them (tags ``train_start``, ``train_end``; the run's ``data_source``)."""
    from stripe_platform.ml import registry as reg

    registry = reg.Registry.from_settings(settings)
    registry.check()
    version = registry.require_champion(settings.ml_model_name)
    label = f"{version.name} version {version.version}"
    model = {"name": version.name, "version": str(version.version)}
    tags = version.tags or {}
    from mlflow.exceptions import MlflowException

    try:
        source = registry.client().get_run(version.run_id).data.tags.get("data_source", "")
    except MlflowException as exc:
        raise reg.RegistryError(f"reading the run of {label} failed: {exc.message}") from exc
    if not source.startswith(PLATFORM_SOURCE):
        raise DriftError(
            f"the champion ({label}) was trained on {source or 'data it did not record'}, not "
            "the platform's: its training payments are not here to compare with; retrain it on "
            "the platform's data (stripe-platform ml train)"
        )
    if "train_start" not in tags or "train_end" not in tags:
        raise DriftError(
            f"the champion ({label}) records no training period (version tags train_start, "
            "train_end): retrain it with `stripe-platform ml train`"
        )
    return model, _day(tags["train_start"]), _day(tags["train_end"])


def _day(text: str) -> dt.datetime:
    day = dt.date.fromisoformat(str(text)[:10])
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def check_platform_drift(
    settings: Settings,
    *,
    window_days: int = DEFAULT_WINDOW_DAYS,
    drift_share: float = DEFAULT_DRIFT_SHARE,
    end: dt.datetime | None = None,
) -> DriftVerdict:
    """The latest ``window_days`` of the platform's payments (ending with the latest payment, or
    at ``end``) against the champion's training period; the report and verdict are written under
    ``<home>/ml/drift``."""
    if window_days < 1:
        raise DriftError(f"--window-days {window_days}: at least 1 day")
    model, ref_start, ref_end = champion_training_period(settings)
    if end is None:
        latest = latest_payment_time(settings)
        if latest is None:
            raise DriftError("the platform holds no payment: nothing to check")
        end = latest + dt.timedelta(microseconds=1)  # the latest payment included
    start = end - dt.timedelta(days=window_days)
    reference, _ = platform_features(settings, ref_start, ref_end)
    if reference.empty:
        raise DriftError(
            f"the champion's training period {ref_start.date()} .. {ref_end.date()} holds no "
            "payment on the platform any more (archived?): retrain it"
        )
    current, _ = platform_features(settings, start, end)
    if current.empty:
        raise DriftError(f"no payment between {start.isoformat()} and {end.isoformat()}")
    comparison = compare(
        reference,
        current,
        drift_share=drift_share,
        reference_source=f"{model['name']} version {model['version']}'s training payments",
        current_source=f"the latest {window_days} day(s) of payments",
        periods=(
            (ref_start.isoformat(), ref_end.isoformat()),
            (start.isoformat(), end.isoformat()),
        ),
    )
    from dataclasses import replace

    comparison.verdict = replace(comparison.verdict, model=model)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    verdict = write_verdict(comparison, drift_dir(settings) / stamp)
    _write_atomic(
        drift_dir(settings) / "latest.json", json.dumps(verdict.as_dict(), indent=2) + "\n"
    )
    return verdict
