"""The rules baseline: the platform's own amount and velocity thresholds, what a model must beat.

A payments team's first fraud defence is a handful of fixed rules: a large amount, an amount far
above the card's habit, a burst of payments on one card, device or IP. Each rule here is one
threshold on one feature of the one feature definition (:mod:`stripe_platform.ml.features`), so
the baseline reads exactly what the model reads, point in time. A rule fires when the feature is
at or above its threshold (a missing value, NaN, never fires).

The baseline's score is the number of rules a payment fires (0 to ``len(RULES)``): an alert when
at least one fires, the most suspicious first when an analyst's queue is short. The thresholds
are fixed round numbers, not fitted to any data (fitted thresholds would be a model), set where
each rule fires on about 2% of legitimate payments or fewer in the seed's generated history (a
rule that alarms more would swamp the analysts).

Geography (billing country differs from the payment's country) is deliberately not a rule: the
brief's baseline is amount and velocity thresholds, and the model is judged against that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from stripe_platform.ml.features import FEATURE_NAMES


@dataclass(frozen=True)
class Rule:
    name: str
    feature: str  # a name in FEATURE_NAMES
    threshold: float  # fires when feature >= threshold
    why: str


RULES: tuple[Rule, ...] = (
    Rule("large_amount", "amount", 500.0, "a payment of 500 EUR or more"),
    Rule(
        "above_habit",
        "customer_amount_ratio_30d",
        10.0,
        "ten times the card's mean payment of the last 30 days or more",
    ),
    Rule("card_burst", "customer_count_1h", 3.0, "three or more payments on the card in the hour"),
    Rule(
        "card_spend_24h",
        "customer_amount_sum_24h",
        500.0,
        "500 EUR or more spent on the card in the 24 hours before",
    ),
    Rule(
        "device_burst", "device_count_1h", 3.0, "three or more payments from the device in the hour"
    ),
    Rule("ip_burst", "ip_count_1h", 3.0, "three or more payments from the IP address in the hour"),
)

assert all(r.feature in FEATURE_NAMES for r in RULES), "a rule reads a feature that is not defined"


def fired(features: pd.DataFrame, rules: tuple[Rule, ...] = RULES) -> pd.DataFrame:
    """One boolean column per rule: whether it fires on each payment."""
    return pd.DataFrame(
        {
            r.name: np.nan_to_num(features[r.feature].to_numpy(np.float64), nan=-np.inf)
            >= r.threshold
            for r in rules
        },
        index=features.index,
    )


def rules_score(features: pd.DataFrame, rules: tuple[Rule, ...] = RULES) -> np.ndarray:
    """The baseline's score of each payment: how many rules it fires (float64)."""
    return fired(features, rules).sum(axis=1).to_numpy(np.float64)


def describe(rules: tuple[Rule, ...] = RULES) -> list[dict[str, object]]:
    """The rules as data, for reports and docs."""
    return [
        {"name": r.name, "feature": r.feature, "threshold": r.threshold, "why": r.why}
        for r in rules
    ]
