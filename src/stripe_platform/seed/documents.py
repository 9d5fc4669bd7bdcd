"""Documents consistent with the OLTP rows of a Dataset: Customer, Merchant, Transaction (the
scored copy), CustomerReview and UserInteractionData. Log documents are in logs.py.

Document ids are derived from the OLTP ids (``oid(kind, id)``) so a re-run writes the same
documents and references between collections hold without a lookup.

Values come out in clear: the seed encrypts the catalog's protected fields (the e-mails) on their
way to the store (``docstore/fields.py``, ``DocumentFields.encrypting`` in ``seed/load.py``), unless
``encrypt_at_rest`` is off.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import numpy as np
from bson import ObjectId

from stripe_platform.seed import reference as ref
from stripe_platform.seed.dataset import Dataset
from stripe_platform.seed.generate import to_ms

KIND = {
    "Customer": 1,
    "Merchant": 2,
    "CustomerReview": 3,
    "UserInteractionData": 4,
    "Transaction": 5,
    "Log": 6,
}
METHOD_NAMES = {
    1: "Credit Card",
    2: "Debit Card",
    3: "Bank Transfer",
    4: "Wallet",
    5: "Buy Now Pay Later",
    6: "SEPA Direct Debit",
}
CURRENCY_CODES = {1: "EUR", 2: "USD", 3: "GBP", 4: "JPY", 5: "CAD", 6: "CHF", 7: "AUD", 8: "BRL"}
INDUSTRY_NAMES = {i[0]: i[1] for i in ref.INDUSTRIES}
REVIEW_TEXT = {
    1: ["Never again.", "Charged twice and no answer from support.", "Item never arrived."],
    2: ["Disappointing quality.", "Slow delivery and poor packaging."],
    3: ["Average experience.", "Fine, nothing special."],
    4: [
        "Good service overall.",
        "The product was not what I wanted, but customer service refunded me quickly.",
    ],
    5: ["Excellent, fast and friendly!", "Perfect, will buy again."],
}
EVENT_PAGES = {
    "page_view": ["/home", "/products", "/pricing", "/dashboard", "/account"],
    "search": ["/search"],
    "click": ["/products", "/home"],
    "add_to_cart": ["/cart"],
    "checkout": ["/checkout"],
    "form_submit": ["/checkout", "/login"],
    "logout": ["/logout"],
}
NEXT_EVENT = {  # a small Markov chain of what users do next
    "page_view": (["page_view", "search", "click", "logout"], [0.35, 0.25, 0.3, 0.1]),
    "search": (["page_view", "click"], [0.4, 0.6]),
    "click": (["page_view", "add_to_cart", "click"], [0.45, 0.3, 0.25]),
    "add_to_cart": (["checkout", "page_view"], [0.6, 0.4]),
    "checkout": (["form_submit", "page_view"], [0.8, 0.2]),
    "form_submit": (["page_view", "logout"], [0.6, 0.4]),
}


def oid(kind: str, n: int) -> ObjectId:
    return ObjectId(f"{KIND[kind]:02x}{int(n):022x}")


def utc(ms: int | np.integer) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(ms) / 1000, dt.UTC)


def customers(data: Dataset) -> Iterator[dict[str, Any]]:
    t = data.entities.customers.to_pydict()
    for i, cid in enumerate(t["id"]):
        yield {
            "_id": oid("Customer", cid),
            "oltp_id": cid,
            "userName": t["username"][i],
            "email": t["email"][i],
            "preferences": {
                "device": t["preferreddevice"][i],
                "paymentMethod": METHOD_NAMES[t["preferredpaymentmethodid"][i]],
                "currency": CURRENCY_CODES[t["preferredcurrencyid"][i]],
            },
            "lastUpdated": t["updatedat"][i],
        }


def merchants(data: Dataset) -> Iterator[dict[str, Any]]:
    t = data.entities.merchants.to_pydict()
    for i, mid in enumerate(t["id"]):
        yield {
            "_id": oid("Merchant", mid),
            "oltp_id": mid,
            "name": t["name"][i],
            "industry": INDUSTRY_NAMES[t["industryid"][i]],
            "rating": {"average": t["rating"][i]},
            "lastUpdated": t["updatedat"][i],
        }


def _sample(rng: np.random.Generator, candidates: np.ndarray, n: int) -> np.ndarray:
    return np.sort(rng.choice(candidates, min(n, len(candidates)), replace=False))


def transactions(data: Dataset, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """The scored copy. A uniform sample when capped, so the fraud base rate stays true."""
    n = data.transactions.num_rows
    rows = _sample(rng, np.arange(n), data.spec.cap(n))
    tx = data.transactions.take(rows).to_pydict()
    emails = data.entities.customers.column("email").to_numpy(zero_copy_only=False)
    loc = {r[0]: r for r in data.entities.locations}
    address_loc = data.entities.addresses.column("locationid").to_numpy()
    for k, row in enumerate(rows):
        place = loc[tx["transactionlocationid"][k]]
        billing = loc[address_loc[tx["billingaddressid"][k] - 1]]
        doc = {
            "_id": oid("Transaction", tx["id"][k]),
            "transaction_id": tx["id"][k],
            "transaction_status_id": tx["transactionstatusid"][k],
            "merchant_id": tx["merchantid"][k],
            "amount": tx["amount"][k],
            "currency_id": tx["currencyid"][k],
            "payment_method_id": tx["paymentmethodid"][k],
            "device_id": tx["deviceid"][k],
            "customer_email": emails[tx["customerid"][k] - 1],
            "ip_address": tx["ipaddress"][k],
            "transaction_city": place[1],
            "transaction_country": place[3],
            "billing_city": billing[1],
            "billing_country": billing[3],
            "AnomalyScore": None,
            "isFraud": int(data.is_fraud[row]),
            "timestamp": tx["datetime"][k],
        }
        if data.is_fraud[row]:
            doc["fraudPattern"] = data.fraud_pattern[row]
        yield doc


def reviews(data: Dataset, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """Reviews of settled transactions (about 3%), worse after refunds and chargebacks."""
    status = data.transactions.column("transactionstatusid").to_numpy()
    settled = np.flatnonzero(np.isin(status, (1, 2, 6)))
    rows = _sample(rng, settled, data.spec.cap(round(0.03 * data.transactions.num_rows)))
    tx = data.transactions.take(rows).to_pydict()
    rating_of = data.entities.merchants.column("rating").to_numpy()
    end_ms = to_ms(data.spec.end)
    noise = rng.normal(0, 0.9, len(rows))
    delay = rng.integers(3_600_000, 14 * 86_400_000, len(rows))
    for k in range(len(rows)):
        st = tx["transactionstatusid"][k]
        base = rating_of[tx["merchantid"][k] - 1] + noise[k] - (1.5 if st == 2 else 0)
        rating = 1 if st == 6 else int(np.clip(round(base), 1, 5))
        at = min(int(tx["datetime"][k].timestamp() * 1000) + int(delay[k]), end_ms - 1)
        texts = REVIEW_TEXT[rating]
        yield {
            "_id": oid("CustomerReview", tx["id"][k]),
            "transaction_id": tx["id"][k],
            "customer_id": oid("Customer", tx["customerid"][k]),
            "merchant_id": oid("Merchant", tx["merchantid"][k]),
            "rating": rating,
            "message": texts[k % len(texts)],
            "timestamp": utc(at),
        }


def sessions(data: Dataset, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """Browsing sessions on the customers' own devices, from their home city."""
    pop = data.entities.population
    n = data.spec.cap(round(0.2 * data.transactions.num_rows))
    who = rng.choice(len(pop.customer_id), n, p=pop.customer_activity / pop.customer_activity.sum())
    use_second = (rng.random(n) < 0.3) & (pop.customer_second_device[who] > 0)
    device_id = np.where(
        use_second, pop.customer_second_device[who], pop.customer_primary_device[who]
    )
    devices = data.entities.devices.to_pydict()
    loc = {r[0]: r for r in data.entities.locations}
    start_ms, end_ms = to_ms(data.spec.start), to_ms(data.spec.end)
    starts = np.sort(rng.integers(start_ms, end_ms - 3_600_000, n))
    for k in range(n):
        d = int(device_id[k]) - 1
        place = loc[pop.customer_location[who[k]]]
        t = int(starts[k])
        events, kind = [], "page_view"
        for _ in range(int(rng.integers(2, 12))):
            t += int(rng.exponential(20_000)) + 1_000
            pages = EVENT_PAGES[kind]
            event = {
                "eventType": kind,
                "pageUrl": pages[int(rng.integers(len(pages)))],
                "timestamp": utc(t),
            }
            if kind == "click":
                event["elementId"] = "buy_button" if event["pageUrl"] == "/products" else "nav_link"
            events.append(event)
            if kind == "logout":
                break
            options, weights = NEXT_EVENT[kind]
            kind = options[int(rng.choice(len(options), p=weights))]
        yield {
            "_id": oid("UserInteractionData", k + 1),
            "session_id": f"{int(starts[k]) // 1000:x}.{k:x}",
            "customer_id": oid("Customer", pop.customer_id[who[k]]),
            "session_start": utc(starts[k]),
            "device": {
                "type": devices["devicetype"][d].lower(),
                "os": devices["os"][d],
                "osVersion": devices["osversion"][d],
                "browser": devices["browser"][d],
                "browserVersion": devices["browserversion"][d],
            },
            "location": {"ip": pop.customer_ip[who[k]], "country": place[3], "city": place[1]},
            "events": events,
            "sessionDuration": (t - int(starts[k])) // 1000,
            "isActive": t > end_ms - 30 * 60_000,
        }
