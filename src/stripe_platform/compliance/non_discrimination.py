"""Non-discrimination (CCPA 1798.125, issue 23, docs/compliance.md): prices, limits and fraud
decisions do not depend on whether a customer opted out of the sale of their data.

:func:`check` shows it two ways, on the platform's own payments of a period:

1. **The counterfactual (the proof).** The payments are read as every decision reads them
   (``ml.contract.load_platform_transactions``, no consent filter: fraud prevention covers every
   payment), each given the customer's opt-out flag as a column, once as the registry says and
   once flipped for every customer. Both go through the contract (``canonicalize``, the door every
   source passes), the one feature definition (``batch_features``), the limits (the rules
   baseline's fixed thresholds: amount, spend and velocity limits, ``ml.rules``) and the
   champion's score and decision when there is one. Any payment whose features, rule decisions,
   score or decision differ is counted; the check passes only at zero. The contract says why: the
   flag is not in its schema and ``canonicalize`` keeps only the schema's columns, so no decision
   can read what does not get in.
2. **The outcomes (the evidence).** Between opted-out customers and the others: payments per
   customer, mean and median amount in EUR (the platform sets no price and charges customers no
   fee: amounts are the merchants' prices, so equal means say the same goods at the same prices),
   the share declined (status failed), flagged by the rules and by the champion. A difference
   beyond chance (a two-proportion z-test, |z| >= 3) is listed for review; it does not fail the
   check, since the opt-out cannot reach a decision (1.).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError

FLAG = "opted_out"  # the column the counterfactual adds (and flips)
DEFAULT_DAYS = 90
Z_REVIEW = 3.0


@dataclass(frozen=True)
class Counterfactual:
    payments: int
    customers_flipped: int
    flag_dropped_by_contract: bool  # not in the contract's schema, not in what canonicalize gave
    features_differ: int  # payments with any feature different (NaN equal to NaN)
    rule_decisions_differ: int
    model: str | None  # the champion scored, or why not
    scores_differ: int | None
    model_decisions_differ: int | None

    @property
    def passed(self) -> bool:
        return (
            self.flag_dropped_by_contract
            and self.features_differ == 0
            and self.rule_decisions_differ == 0
            and not self.scores_differ
            and not self.model_decisions_differ
        )


@dataclass(frozen=True)
class Group:
    customers: int
    payments: int
    payments_per_customer: float
    mean_amount_eur: float | None
    median_amount_eur: float | None
    declined: int
    declined_rate: float | None
    rules_flagged: int
    rules_flagged_rate: float | None
    model_flagged: int | None
    model_flagged_rate: float | None


@dataclass(frozen=True)
class Report:
    start: dt.datetime
    end: dt.datetime
    counterfactual: Counterfactual
    opted_out: Group
    others: Group
    z: dict[str, float | None]  # per rate: the two-proportion z statistic (None: a group empty)
    review: list[str] = field(default_factory=list)  # rates differing beyond chance

    @property
    def passed(self) -> bool:
        return self.counterfactual.passed

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["start"] = self.start.isoformat()
        data["end"] = self.end.isoformat()
        data["passed"] = self.passed
        data["counterfactual"]["passed"] = self.counterfactual.passed
        return data


class NonDiscriminationError(PlatformError, ValueError):
    """The check cannot run as asked (no payments in the period)."""


def _differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: any column differs (NaN equals NaN)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    return ~same.all(axis=1) if same.ndim == 2 else ~same


def _decide(table: pa.Table, scorer: Any) -> tuple[Any, np.ndarray, np.ndarray | None, Any]:
    """(canonical transactions, rule decisions, model scores or None, features) of ``table``."""
    from stripe_platform.ml.contract import canonicalize
    from stripe_platform.ml.features import FEATURE_NAMES, batch_features
    from stripe_platform.ml.rules import rules_score

    canonical = canonicalize(table, source="non-discrimination check", require_labels=False)
    features = batch_features(canonical)[list(FEATURE_NAMES)]
    rules = rules_score(features) > 0
    scores = None if scorer is None else scorer.scores(features)
    return canonical, rules, scores, features


def _z(k1: int, n1: int, k2: int, n2: int) -> float | None:
    if not n1 or not n2:
        return None
    pooled = (k1 + k2) / (n1 + n2)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return 0.0 if spread == 0 else round((k1 / n1 - k2 / n2) / spread, 3)


def _rate(k: int | None, n: int) -> float | None:
    return None if k is None or not n else round(k / n, 5)


def _group(
    mask: np.ndarray,
    customers: np.ndarray,
    amounts: np.ndarray,
    declined: int,
    rules: np.ndarray,
    model: np.ndarray | None,
) -> Group:
    n = int(mask.sum())
    people = len(set(customers[mask].tolist()))
    chosen = amounts[mask]
    flagged = None if model is None else int(model[mask].sum())
    return Group(
        customers=people,
        payments=n,
        payments_per_customer=round(n / people, 3) if people else 0.0,
        mean_amount_eur=round(float(chosen.mean()), 2) if n else None,
        median_amount_eur=round(float(np.median(chosen)), 2) if n else None,
        declined=declined,
        declined_rate=_rate(declined, n),
        rules_flagged=int(rules[mask].sum()),
        rules_flagged_rate=_rate(int(rules[mask].sum()), n),
        model_flagged=flagged,
        model_flagged_rate=_rate(flagged, n),
    )


def _declined(settings: Settings, start: dt.datetime, end: dt.datetime) -> dict[bool, int]:
    """Payments declined (status failed) in the period, by opt-out flag."""
    from stripe_platform.compliance.consent import OPTED_OUT, _connect

    with _connect(settings) as conn:
        rows = conn.execute(
            f"""SELECT t.CustomerID IN ({OPTED_OUT}) AS opted_out, count(*) AS n
               FROM Transaction t
               JOIN TransactionStatus st ON st.ID = t.TransactionStatusID AND st.Name = 'failed'
               WHERE t.DateTime >= %s AND t.DateTime < %s
               GROUP BY 1""",
            (start, end),
        ).fetchall()
    return {r["opted_out"]: r["n"] for r in rows}


def _champion(settings: Settings) -> tuple[Any, str]:
    from stripe_platform.ml.score import Scorer

    try:
        scorer = Scorer.champion(settings)
    except PlatformError as exc:
        return None, f"not scored: {exc}"
    return scorer, scorer.label


def check(
    settings: Settings,
    *,
    end: dt.datetime | None = None,
    days: int = DEFAULT_DAYS,
    scorer: Any = None,
    use_champion: bool = True,
) -> Report:
    """The counterfactual and the outcomes over the payments of the ``days`` before ``end`` (now;
    the seed's history ends earlier: pass its end). ``scorer``: a ``ml.score.Scorer`` to use
    instead of the champion; ``use_champion=False``: no model (the rules and features only)."""
    from stripe_platform.compliance import consent
    from stripe_platform.ml.contract import (
        CANONICAL_SCHEMA,
        EmptyTransactions,
        load_platform_transactions,
    )

    end = end or dt.datetime.now(dt.UTC)
    end = end if end.tzinfo else end.replace(tzinfo=dt.UTC)
    start = end - dt.timedelta(days=days)
    try:
        read = load_platform_transactions(settings, start=start, end=end, require_labels=False)
    except EmptyTransactions as exc:
        raise NonDiscriminationError(
            f"non-discrimination: no payments between {start:%Y-%m-%d} and {end:%Y-%m-%d} "
            f"({exc}): pass --end the last day of the data"
        ) from None
    model = "not scored: no model asked for"
    if scorer is not None:
        model = scorer.label
    elif use_champion:
        scorer, model = _champion(settings)

    opted = consent.opted_out(settings)
    customers = read.table["customer_id"].to_numpy(zero_copy_only=False)
    actual = np.array([int(c) in opted for c in customers], dtype=bool)
    with_flag = read.table.append_column(FLAG, pa.array(actual))
    flipped = read.table.append_column(FLAG, pa.array(~actual))

    canonical_a, rules_a, scores_a, features_a = _decide(with_flag, scorer)
    canonical_b, rules_b, scores_b, features_b = _decide(flipped, scorer)
    decisions_differ = None
    if scores_a is not None:
        decisions_differ = int((scorer.decide(scores_a) != scorer.decide(scores_b)).sum())
    counterfactual = Counterfactual(
        payments=read.num_rows,
        customers_flipped=len(set(customers.tolist())),
        flag_dropped_by_contract=FLAG not in CANONICAL_SCHEMA.names
        and FLAG not in canonical_a.table.column_names
        and FLAG not in canonical_b.table.column_names,
        features_differ=int(_differ(features_a.to_numpy(), features_b.to_numpy()).sum()),
        rule_decisions_differ=int((rules_a != rules_b).sum()),
        model=model,
        scores_differ=None if scores_a is None else int(_differ(scores_a, scores_b).sum()),
        model_decisions_differ=decisions_differ,
    )

    # The groups over the canonical rows the decisions were made on (canonicalize sorts them).
    customers = canonical_a.table["customer_id"].to_numpy(zero_copy_only=False)
    actual = np.array([int(c) in opted for c in customers], dtype=bool)
    amounts = canonical_a.table["amount"].to_numpy()
    model_flags = None if scores_a is None else scorer.decide(scores_a)
    declined = _declined(settings, start, end)
    out = _group(actual, customers, amounts, declined.get(True, 0), rules_a, model_flags)
    rest = _group(~actual, customers, amounts, declined.get(False, 0), rules_a, model_flags)
    z = {
        "declined_rate": _z(out.declined, out.payments, rest.declined, rest.payments),
        "rules_flagged_rate": _z(
            out.rules_flagged, out.payments, rest.rules_flagged, rest.payments
        ),
        "model_flagged_rate": None
        if out.model_flagged is None or rest.model_flagged is None
        else _z(out.model_flagged, out.payments, rest.model_flagged, rest.payments),
    }
    review = [name for name, value in z.items() if value is not None and abs(value) >= Z_REVIEW]
    return Report(start, end, counterfactual, out, rest, z, review)
