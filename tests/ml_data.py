"""The seed's generated data in the ML contract's shape, without a database: realistic
transactions for feature, training and scoring tests (import it from a test module)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stripe_platform.ml.contract import Transactions, canonicalize, eur_rates
from stripe_platform.seed import reference as ref
from stripe_platform.seed.dataset import Dataset
from stripe_platform.seed.lifecycle import DISPUTED, FRAUD_DISPUTE_REASONS

# Currency.ID -> code, as sql/oltp/0002_reference_data.sql inserts them.
CURRENCY_CODES = {1: "EUR", 2: "USD", 3: "GBP", 4: "JPY", 5: "CAD", 6: "CHF", 7: "AUD", 8: "BRL"}


def fraud_reports(data: Dataset) -> dict[int, object]:
    """Transaction id -> time of its first fraud report (a dispute whose reason names fraud)."""
    changes = data.state_changes
    reported = pc.and_(
        pc.equal(changes["tostatusid"], DISPUTED),
        pc.is_in(changes["reason"], pa.array([str(r) for r in FRAUD_DISPUTE_REASONS])),
    )
    found: dict[int, object] = {}
    for tx, at in zip(
        changes["transactionid"].filter(reported).to_pylist(),
        changes["updatedat"].filter(reported).to_pylist(),
        strict=True,
    ):
        found[tx] = min(found.get(tx, at), at)
    return found


def seed_transactions(data: Dataset, *, labels: str = "planted") -> Transactions:
    """``data``'s payments as canonical transactions. ``labels="planted"``: the ground truth
    (every planted fraud is 1; label_time is its fraud report when it had one, else unknown);
    ``"reported"``: what the platform's OLTP store shows, only reported frauds are 1."""
    tx = data.transactions
    rates = eur_rates()
    rate = np.array([rates[CURRENCY_CODES[c]] for c in tx["currencyid"].to_pylist()])
    country_of = {row[0]: row[4] for row in ref.locations()}
    billing_location = dict(
        zip(
            data.entities.addresses["id"].to_pylist(),
            data.entities.addresses["locationid"].to_pylist(),
            strict=True,
        )
    )
    reports = fraud_reports(data)
    ids = tx["id"].to_pylist()
    if labels == "planted":
        label = data.is_fraud.astype(np.int8)
    else:
        label = np.array([1 if i in reports else 0 for i in ids], np.int8)
    label_time = [reports.get(i) if flag else None for i, flag in zip(ids, label, strict=True)]
    table = pa.table(
        {
            "transaction_id": tx["id"],
            "timestamp": tx["datetime"],
            "customer_id": tx["customerid"],
            "merchant_id": tx["merchantid"],
            "amount": pc.multiply(tx["amount"].cast(pa.float64()), pa.array(rate)),
            "label": pa.array(label),
            "label_time": pa.array(label_time, pa.timestamp("ms", tz="UTC")),
            "device_id": tx["deviceid"],
            "ip": tx["ipaddress"],
            "country": pa.array([country_of[i] for i in tx["transactionlocationid"].to_pylist()]),
            "billing_country": pa.array(
                [country_of[billing_location[a]] for a in tx["billingaddressid"].to_pylist()]
            ),
        }
    )
    return canonicalize(table, source=f"seed {data.spec.run_key}")
