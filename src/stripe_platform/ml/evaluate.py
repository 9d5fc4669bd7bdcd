"""Metrics of a fraud score on a test period, the model beside the rules baseline.

Frauds are rare (about 0.5% of payments), so accuracy says nothing and ROC AUC flatters; what an
operations team lives with is how many alerts are true and how many frauds they catch:

- ``roc_auc``: the probability that a fraud scores above a legitimate payment.
- ``average_precision`` (PR-AUC): precision averaged over the recall levels, as scikit-learn
  computes it (a step function, no interpolation); a random score gets the fraud rate.
- ``recall_at_1pct_fpr``: the share of frauds caught at the highest recall any threshold reaches
  while flagging at most 1% of legitimate payments (the ROC curve's best true-positive rate with
  a false-positive rate <= 0.01).
- ``budget_precision`` / ``budget_recall``: with a fixed alert budget (``alert_budget``, a share of
  the period's payments, 1% by default) the highest-scored payments are alerted: the share of
  alerts that are frauds, the share of frauds alerted.
- ``card_precision_at_k`` (k = 100 by default): each day, the k customers (cards) with the highest
  score that day (a customer's score is their highest payment's) are investigated; a customer is a
  true fraud when one of their payments that day is. The day's value is the share of true frauds
  among those investigated (all the day's customers when there are fewer than k); the metric is
  the mean over the period's days with payments.

Ties: a budget or top k that cuts through payments (or customers) with the same score takes the
expected value of a random order among them: those scored above the cut count fully, those tied
at the cut in proportion to the places left. A coarse score (the rules' count of fired rules) is
then neither helped nor hurt by the order rows happen to be in.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from stripe_platform.errors import PlatformError

DEFAULT_ALERT_BUDGET = 0.01
DEFAULT_K = 100
MAX_FPR = 0.01


class EvaluationError(PlatformError, ValueError):
    """Scores and labels that no metric can be computed on."""


@dataclass(frozen=True)
class Metrics:
    roc_auc: float
    average_precision: float
    recall_at_1pct_fpr: float
    alert_budget: float
    budget_alerts: int
    budget_precision: float
    budget_recall: float
    card_precision_k: int
    card_precision_at_k: float
    card_precision_days: int
    transactions: int
    positives: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int8)
    scores = np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise EvaluationError(f"{len(labels)} labels for {len(scores)} scores")
    if np.isnan(scores).any():
        raise EvaluationError(f"{int(np.isnan(scores).sum())} score(s) are NaN")
    positives = int(labels.sum())
    if positives == 0 or positives == len(labels):
        raise EvaluationError(
            f"{positives} fraud(s) in {len(labels)} payments: the metrics need frauds and "
            "legitimate payments"
        )
    return labels, scores


def expected_hits(labels: np.ndarray, scores: np.ndarray, n: int) -> float:
    """Expected number of positives among the ``n`` highest ``scores``, ties at the cut taken in
    a random order."""
    if n <= 0:
        return 0.0
    if n >= len(scores):
        return float(labels.sum())
    cut = np.partition(scores, len(scores) - n)[len(scores) - n]  # the n-th highest score
    above = scores > cut
    tied = scores == cut
    places = n - int(above.sum())
    return float(labels[above].sum()) + places * float(labels[tied].sum()) / int(tied.sum())


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float = MAX_FPR) -> float:
    """The highest true-positive rate of a threshold whose false-positive rate is <= max_fpr."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())


def card_precision_at_k(
    labels: np.ndarray,
    scores: np.ndarray,
    customers: np.ndarray,
    days: np.ndarray,
    k: int = DEFAULT_K,
) -> tuple[float, int]:
    """(mean daily card precision@k, number of days): see the module's docstring."""
    frame = pd.DataFrame({"day": days, "customer": customers, "score": scores, "label": labels})
    cards = frame.groupby(["day", "customer"], sort=False).agg(
        score=("score", "max"), label=("label", "max")
    )
    daily = []
    for _, day in cards.groupby(level="day", sort=True):
        n = min(k, len(day))
        daily.append(expected_hits(day["label"].to_numpy(), day["score"].to_numpy(), n) / n)
    return float(np.mean(daily)), len(daily)


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    customers: np.ndarray,
    timestamps: np.ndarray,
    alert_budget: float = DEFAULT_ALERT_BUDGET,
    k: int = DEFAULT_K,
) -> Metrics:
    """Every metric of ``scores`` (higher = more suspicious) against ``labels`` (1 = fraud) on one
    period; ``customers`` and ``timestamps`` (UTC) of the same payments give the days and cards
    of card precision@k."""
    if not 0 < alert_budget <= 1:
        raise EvaluationError(f"the alert budget {alert_budget} must be a share in (0, 1]")
    if k < 1:
        raise EvaluationError(f"k = {k}: at least one customer a day")
    labels, scores = _check(labels, scores)
    n = len(labels)
    positives = int(labels.sum())
    alerts = max(1, round(alert_budget * n))
    hits = expected_hits(labels, scores, alerts)
    days = pd.DatetimeIndex(pd.to_datetime(timestamps, utc=True)).floor("D").to_numpy()
    card_precision, n_days = card_precision_at_k(labels, scores, np.asarray(customers), days, k)
    return Metrics(
        roc_auc=float(roc_auc_score(labels, scores)),
        average_precision=float(average_precision_score(labels, scores)),
        recall_at_1pct_fpr=recall_at_fpr(labels, scores),
        alert_budget=alert_budget,
        budget_alerts=alerts,
        budget_precision=hits / alerts,
        budget_recall=hits / positives,
        card_precision_k=k,
        card_precision_at_k=card_precision,
        card_precision_days=n_days,
        transactions=n,
        positives=positives,
    )


@dataclass(frozen=True)
class Comparison:
    """A model's metrics beside the rules baseline's on the same payments."""

    period_start: dt.datetime
    period_end: dt.datetime
    model: Metrics
    rules: Metrics

    @property
    def ap_ratio(self) -> float:
        """The model's average precision over the rules' (inf when the rules' is 0)."""
        base = self.rules.average_precision
        return self.model.average_precision / base if base else float("inf")

    def as_dict(self) -> dict[str, object]:
        return {
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "model": self.model.as_dict(),
            "rules": self.rules.as_dict(),
            "ap_ratio": self.ap_ratio,
        }
