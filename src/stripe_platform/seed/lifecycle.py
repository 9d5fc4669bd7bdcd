"""Status life cycles: every transaction is created pending, then settles; some are refunded,
disputed, charged back. Each status change becomes a TransactionStateChanges row (creation is not
a change: it is Transaction.CreatedAt); steps that would fall after the end of the generated
history have not happened yet, so recent transactions can still be pending or disputed."""

from __future__ import annotations

import csv

import numpy as np

from stripe_platform.paths import REPO_ROOT
from stripe_platform.seed.fraud import DISPUTE_RATE

PENDING, COMPLETED, REFUNDED, FAILED, DISPUTED, CHARGED_BACK, CANCELLED = 3, 1, 2, 4, 5, 6, 7
SECOND, DAY = 1_000, 86_400_000

FAIL_REASONS = np.array(
    ["card declined", "insufficient funds", "do not honor", "3-D Secure failed"], dtype=object
)
REFUND_REASONS = np.array(["customer request", "item returned", "Exceptional refund"], dtype=object)
DISPUTE_REASONS = np.array(["product not received", "duplicate charge"], dtype=object)
# The dispute reasons that report fraud, defined once for the seed, the model's label
# (ml.contract) and the warehouse's confirmed fraud: the dbt seed, in its order (the seed draws by
# index).
with (REPO_ROOT / "dbt_project" / "seeds" / "fraud_dispute_reasons.csv").open(newline="") as _f:
    FRAUD_DISPUTE_REASONS = np.array([row["reason"] for row in csv.DictReader(_f)], dtype=object)


def life_cycles(
    rng: np.random.Generator,
    tx_id: np.ndarray,
    created_ms: np.ndarray,
    fraud_pattern: np.ndarray,
    end_ms: int,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Return (state change columns, final status, last update ms) for the given transactions."""
    n = len(tx_id)
    is_fraud = fraud_pattern != None  # noqa: E711 - numpy elementwise comparison
    card_testing = fraud_pattern == "card_testing"
    steps: list[tuple] = []  # (mask, from, to, at_ms, reason array or str, by)

    def record(mask, from_status, to_status, at, reason, by):
        steps.append((mask & (at < end_ms), from_status, to_status, at, reason, by))
        return mask & (at < end_ms)

    settle_at = created_ms + rng.integers(2 * SECOND, 180 * SECOND, n)
    roll = rng.random(n)
    fail_p = np.where(card_testing, 0.55, np.where(is_fraud, 0.03, 0.045))
    failed = roll < fail_p
    cancelled = ~failed & (roll < fail_p + np.where(is_fraud, 0.0, 0.025))
    completed = ~failed & ~cancelled
    record(failed, PENDING, FAILED, settle_at, FAIL_REASONS[rng.integers(0, 4, n)], "issuer")
    record(cancelled, PENDING, CANCELLED, settle_at, "voided by merchant", "merchant")
    completed = record(completed, PENDING, COMPLETED, settle_at, "captured", "payments-api")

    dispute_p = np.zeros(n)
    for pattern, rate in DISPUTE_RATE.items():
        dispute_p[fraud_pattern == pattern] = rate
    dispute_p[~is_fraud] = 0.0025
    after = rng.random(n)
    disputed_wish = completed & (after < dispute_p)
    refund_wish = completed & ~disputed_wish & (after < dispute_p + np.where(is_fraud, 0.05, 0.03))
    refund_at = settle_at + rng.integers(1 * DAY, 30 * DAY, n)
    record(
        refund_wish,
        COMPLETED,
        REFUNDED,
        refund_at,
        REFUND_REASONS[rng.integers(0, 3, n)],
        "Customer service",
    )
    dispute_at = settle_at + rng.integers(5 * DAY, 60 * DAY, n)
    reasons = np.where(
        is_fraud,
        FRAUD_DISPUTE_REASONS[rng.integers(0, 2, n)],
        DISPUTE_REASONS[rng.integers(0, 2, n)],
    )
    disputed = record(disputed_wish, COMPLETED, DISPUTED, dispute_at, reasons, "card network")
    resolve_at = dispute_at + rng.integers(10 * DAY, 45 * DAY, n)
    lost = disputed & (rng.random(n) < np.where(is_fraud, 0.9, 0.35))
    record(lost, DISPUTED, CHARGED_BACK, resolve_at, "dispute lost", "card network")
    record(disputed & ~lost, DISPUTED, COMPLETED, resolve_at, "dispute won", "card network")

    final = np.full(n, PENDING, dtype=np.int16)
    updated = created_ms.copy()
    columns: dict[str, list[np.ndarray]] = {
        k: [] for k in ("row", "fromstatusid", "tostatusid", "reason", "updatedby", "updatedat")
    }
    for mask, from_status, to_status, at, reason, by in steps:
        rows = np.flatnonzero(mask)
        final[rows] = to_status
        updated[rows] = at[rows]
        columns["row"].append(rows)
        columns["fromstatusid"].append(
            np.full(len(rows), -1 if from_status is None else from_status)
        )
        columns["tostatusid"].append(np.full(len(rows), to_status))
        columns["reason"].append(
            reason[rows]
            if isinstance(reason, np.ndarray)
            else np.full(len(rows), reason, dtype=object)
        )
        columns["updatedby"].append(np.full(len(rows), by, dtype=object))
        columns["updatedat"].append(at[rows])
    merged = {k: np.concatenate(v) for k, v in columns.items()}
    # Chronological per transaction, as the audit trail was written.
    order = np.lexsort((merged["updatedat"], merged["row"]))
    merged = {k: v[order] for k, v in merged.items()}
    merged["transactionid"] = tx_id[merged["row"]]
    merged["transactiondatetime"] = created_ms[merged["row"]]
    return merged, final, updated
