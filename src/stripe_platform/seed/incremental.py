"""Incremental activity after a seed: new payments (inserts), their status changes through the
schema's atomic operation (updates), customers changing preferences (updates), devices removed by
their owners (deletes), and the matching documents. Each tick is one PostgreSQL transaction;
documents follow once it is committed.

Two ways to run it: ``--minutes M`` writes M minutes of activity after the latest transaction at
the history's recent rate, in one go; ``--tps N`` writes N payments per second at the wall clock
until stopped (Ctrl-C) or for ``--duration`` seconds.
"""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from pymongo import UpdateOne

from stripe_platform.config import Settings
from stripe_platform.docstore import validation
from stripe_platform.docstore.fields import DocumentFields
from stripe_platform.oltp import db, partitions
from stripe_platform.seed import reference as ref
from stripe_platform.seed.dataset import transaction_table
from stripe_platform.seed.documents import CURRENCY_CODES, METHOD_NAMES, oid, utc
from stripe_platform.seed.generate import (
    Population,
    country_ips,
    device_rows,
    legit_transactions,
)
from stripe_platform.seed.spec import SeedError

COUNTRY_INDEX = {c.code: i for i, c in enumerate(ref.COUNTRIES)}


@dataclass
class ActivityReport:
    ticks: int = 0
    inserted: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, entity: str, n: int) -> None:
        bucket = getattr(self, kind)
        bucket[entity] = bucket.get(entity, 0) + n


def population_from_db(conn: psycopg.Connection, rng: np.random.Generator) -> Population:
    customers = conn.execute(
        """SELECT c.ID, c.CountryCode, a.ID, a.LocationID, c.PreferredPaymentMethodID,
                  (SELECT min(d.ID) FROM Device d WHERE d.CustomerID = c.ID),
                  (SELECT max(d.ID) FROM Device d WHERE d.CustomerID = c.ID),
                  (SELECT min(p.ID) FROM PaymentInstrument p WHERE p.CustomerID = c.ID AND p.PaymentMethodID = 1),
                  (SELECT min(p.ID) FROM PaymentInstrument p WHERE p.CustomerID = c.ID AND p.PaymentMethodID = 2)
           FROM Customer c JOIN Address a ON a.CustomerID = c.ID AND a.IsBilling
           WHERE c.CountryCode IS NOT NULL ORDER BY c.ID"""
    ).fetchall()
    merchants = conn.execute(
        """SELECT m.ID, l.CountryCode, m.LocationID, m.IndustryID, m.MerchantSizeID
           FROM Merchant m JOIN Location l ON l.ID = m.LocationID ORDER BY m.ID"""
    ).fetchall()
    locations = conn.execute("SELECT ID, CountryCode FROM Location ORDER BY ID").fetchall()
    if not customers or not merchants:
        raise SeedError("incremental mode needs seeded data: run `stripe-platform seed` first")
    if [loc_id for loc_id, _ in locations] != list(range(1, len(locations) + 1)):
        raise SeedError("incremental mode needs the seed's Location table (ids 1..n)")
    c = np.array(
        [
            (
                r[0],
                COUNTRY_INDEX.get(r[1], 0),
                r[2],
                r[3],
                r[4] or 1,
                r[5] or 0,
                r[6] if r[6] != r[5] else 0,
                r[7] or 0,
                r[8] or 0,
            )
            for r in customers
        ],
        dtype=np.int64,
    )
    m = np.array(
        [(r[0], COUNTRY_INDEX.get(r[1], 0), r[2], r[3], r[4]) for r in merchants], dtype=np.int64
    )
    sizes = {s[0]: s[2] for s in ref.SIZES}
    n = len(c)
    return Population(
        customer_id=c[:, 0],
        customer_country=c[:, 1],
        customer_location=c[:, 3],
        customer_address=c[:, 2],
        customer_activity=rng.pareto(1.8, n) + 0.2,
        customer_spend=rng.lognormal(0, 0.6, n),
        customer_pref_method=c[:, 4],
        customer_primary_device=c[:, 5],
        customer_second_device=c[:, 6],
        customer_card=c[:, 7:9],
        customer_ip=country_ips(rng, c[:, 1]),
        merchant_id=m[:, 0],
        merchant_country=m[:, 1],
        merchant_location=m[:, 2],
        merchant_industry=m[:, 3],
        merchant_size=m[:, 4],
        merchant_weight=np.array([sizes[s] for s in m[:, 4]], dtype=float),
        colluding_merchants=np.array([], dtype=np.int64),
        location_country=np.array([COUNTRY_INDEX.get(code, 0) for _, code in locations]),
    )


def _tick(
    settings: Settings,
    conn: psycopg.Connection,
    docdb: Any,
    fields: DocumentFields,
    pop: Population,
    rng: np.random.Generator,
    times_ms: np.ndarray,
    report: ActivityReport,
) -> None:
    n = len(times_ms)
    cols = legit_transactions(
        rng, pop, n, dt.date(2000, 1, 1), dt.date(2000, 1, 2), times_ms=times_ms
    )
    # Cards can be missing for customers loaded from the database: pay by bank transfer then.
    no_card = np.isin(cols["paymentmethodid"], (1, 2)) & (cols["paymentinstrumentid"] == 0)
    cols["paymentmethodid"][no_card] = 3
    with conn.transaction():
        ids = np.array(
            [
                r[0]
                for r in conn.execute(
                    "SELECT nextval(pg_get_serial_sequence('transaction', 'id')) FROM generate_series(1, %s)",
                    (n,),
                )
            ],
            dtype=np.int64,
        )
        rows = transaction_table(ids, cols, np.full(n, 3), times_ms)
        db.copy_arrow(conn, "transaction", rows)
        report.add("inserted", "transaction", n)

        # Most new payments settle within the tick; a few stay pending for a later one.
        outcome = rng.choice([1, 4, 7, 3], n, p=[0.92, 0.04, 0.02, 0.02])
        changes = [(int(i), int(s)) for i, s in zip(ids, outcome, strict=True) if s != 3]
        # Older payments: a refund now and then.
        now = utc(times_ms[0])
        refund = conn.execute(
            """SELECT ID FROM Transaction WHERE TransactionStatusID = 1
               AND DateTime > %s - interval '60 days' ORDER BY random() LIMIT %s""",
            (now, max(1, n // 50)),
        ).fetchall()
        changes += [(r[0], 2) for r in refund]
        # Payments left pending by an earlier tick settle now.
        pending = conn.execute(
            """SELECT ID FROM Transaction WHERE TransactionStatusID = 3
               AND DateTime > %s - interval '1 day' AND NOT ID = ANY(%s) LIMIT %s""",
            (now, ids.tolist(), max(1, n // 50)),
        ).fetchall()
        changes += [(r[0], 1) for r in pending]
        with conn.cursor() as cur:
            cur.executemany(
                "SELECT change_transaction_status(%s, %s::smallint, %s, %s)",
                [(tx, status, "incremental activity", "payments-api") for tx, status in changes],
            )
        report.add("updated", "transaction", len(changes))

        # Customers switch devices: a new device registered, an unused one removed.
        who = rng.choice(len(pop.customer_id), max(1, n // 100))
        next_device = conn.execute("SELECT coalesce(max(ID), 0) + 1 FROM Device").fetchone()[0]
        device_ids = np.arange(next_device, next_device + len(who))
        db.copy_arrow(
            conn,
            "device",
            device_rows(
                rng,
                int(times_ms[0]),
                device_ids,
                pop.customer_id[who],
                rng.choice(3, len(who)),
                np.full(len(who), int(times_ms[-1])),
            ).drop_columns(["updatedat"]),
        )
        report.add("inserted", "device", len(who))
        removed = conn.execute(
            """DELETE FROM Device d WHERE d.ID IN (
                   SELECT d2.ID FROM Device d2
                   WHERE NOT EXISTS (SELECT FROM Transaction t WHERE t.DeviceID = d2.ID)
                     AND d2.ID < %s ORDER BY d2.ID DESC LIMIT %s)
               RETURNING d.ID""",
            (int(device_ids[0]), max(1, len(who) // 2)),
        ).fetchall()
        report.add("deleted", "device", len(removed))
        # Removed devices are never paid with again (the owner falls back to their other one).
        gone = np.array([r[0] for r in removed], dtype=np.int64)
        primary_gone = np.isin(pop.customer_primary_device, gone)
        pop.customer_primary_device[primary_gone] = pop.customer_second_device[primary_gone]
        pop.customer_second_device[np.isin(pop.customer_second_device, gone)] = 0
        pop.customer_primary_device[np.isin(pop.customer_primary_device, gone)] = 0
        # Preferences change: an update on Customer (and its document below).
        changed = pop.customer_id[rng.choice(len(pop.customer_id), max(1, n // 100))]
        new_device = np.array(ref.DEVICE_TYPES, dtype=object)[rng.choice(3, len(changed))]
        with conn.cursor() as cur:
            cur.executemany(
                "UPDATE Customer SET PreferredDevice = %s WHERE ID = %s",
                [(d, int(c)) for d, c in zip(new_device, changed, strict=True)],
            )
        report.add("updated", "customer", len(changed))
        final = dict(
            conn.execute(
                "SELECT ID, TransactionStatusID FROM Transaction WHERE ID = ANY(%s)",
                ([tx for tx, _ in changes] + ids.tolist(),),
            ).fetchall()
        )
        prefs = conn.execute(
            "SELECT ID, PreferredDevice, PreferredPaymentMethodID, PreferredCurrencyID, UpdatedAt "
            "FROM Customer WHERE ID = ANY(%s)",
            (changed.tolist(),),
        ).fetchall()

    # Documents, once the database has committed.
    emails = {}
    for doc in docdb.Customer.find(
        {"oltp_id": {"$in": cols["customerid"].tolist()}}, {"oltp_id": 1, "email": 1}
    ):
        emails[doc["oltp_id"]] = fields.decrypt_document("Customer", doc)["email"]
    docs = [
        {
            "_id": oid("Transaction", i),
            "transaction_id": int(i),
            "transaction_status_id": final[int(i)],
            "merchant_id": int(cols["merchantid"][k]),
            "amount": float(cols["amount"][k]),
            "currency_id": int(cols["currencyid"][k]),
            "payment_method_id": int(cols["paymentmethodid"][k]),
            "device_id": int(cols["deviceid"][k]) or None,
            "customer_email": emails.get(int(cols["customerid"][k]), ""),
            "ip_address": cols["ipaddress"][k],
            "AnomalyScore": None,
            "isFraud": 0,
            "timestamp": utc(times_ms[k]),
        }
        for k, i in enumerate(ids)
    ]
    if docs:
        validation.insert_many(docdb.Transaction, fields.encrypt_documents("Transaction", docs))
    report.add("inserted", "Transaction", len(docs))
    new_ids = set(ids.tolist())
    # Through set_fields, as the fraud scorer writes: on the embedded FerretDB both are row-locked
    # UPDATEs of its backend table, so neither can put back what the other just wrote (FerretDB's
    # own update reads, changes and writes back a document without a lock).
    validation.set_fields(
        docdb,
        settings,
        "Transaction",
        "transaction_id",
        [(tx, {"transaction_status_id": final[tx]}) for tx, _ in changes if tx not in new_ids],
    )
    preferences = [
        UpdateOne(
            {"oltp_id": cid},
            {
                "$set": {
                    "preferences": {
                        "device": device,
                        "paymentMethod": METHOD_NAMES.get(method, "Wallet"),
                        "currency": CURRENCY_CODES.get(currency, "EUR"),
                    },
                    "lastUpdated": updated,
                }
            },
        )
        for cid, device, method, currency, updated in prefs
    ]
    validation.bulk_write(docdb.Customer, preferences)
    report.add("updated", "Customer", len(prefs))
    # Moderation removes a review now and then.
    stale = docdb.CustomerReview.find_one({"rating": 1})
    if stale is not None and rng.random() < 0.5:
        docdb.CustomerReview.delete_one({"_id": stale["_id"]})
        report.add("deleted", "CustomerReview", 1)
    report.ticks += 1


def run(
    settings: Settings,
    docdb: Any,
    *,
    seed: int,
    minutes: float | None = None,
    tps: float | None = None,
    duration: float | None = None,
    on_tick: Callable[[ActivityReport], None] = lambda r: None,
) -> ActivityReport:
    if (minutes is None) == (tps is None):
        raise SeedError("give exactly one of --minutes or --tps")
    if (minutes is not None and minutes <= 0) or (tps is not None and tps <= 0):
        raise SeedError("--minutes and --tps must be positive")
    rng = np.random.default_rng([seed, int(time.time())])
    report = ActivityReport()
    fields = DocumentFields(settings)
    with db.connect(settings, autocommit=True) as conn:
        pop = population_from_db(conn, rng)
        latest = conn.execute("SELECT max(DateTime) FROM Transaction").fetchone()[0]
        if minutes is not None:
            recent = conn.execute(
                "SELECT count(*) FROM Transaction WHERE DateTime > %s - interval '30 days'",
                (latest,),
            ).fetchone()[0]
            per_minute = recent / (30 * 1440)
            n = max(1, round(per_minute * minutes))
            start_ms = int(latest.timestamp() * 1000) + 1
            times = np.sort(rng.integers(start_ms, start_ms + int(minutes * 60_000), n))
            partitions.maintain(
                conn,
                today=utc(times[-1]).date(),
                months_ahead=settings.partition_months_ahead,
                retention_months=settings.partition_retention_months,
                archive=False,
            )
            _tick(settings, conn, docdb, fields, pop, rng, times, report)
            on_tick(report)
            return report

        assert tps is not None
        stop = {"now": False}
        # SIGTERM ends the loop between ticks (only the main thread may install handlers).
        in_main = threading.current_thread() is threading.main_thread()
        previous = (
            signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True)) if in_main else None
        )
        started = time.monotonic()
        try:
            while not stop["now"] and (duration is None or time.monotonic() - started < duration):
                tick_start = time.monotonic()
                n = max(1, int(rng.poisson(tps)))
                now_ms = int(time.time() * 1000)
                _tick(
                    settings,
                    conn,
                    docdb,
                    fields,
                    pop,
                    rng,
                    np.sort(rng.integers(now_ms - 1000, now_ms, n)),
                    report,
                )
                on_tick(report)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - tick_start)))
        except KeyboardInterrupt:
            pass  # the tick in progress either committed whole or not at all
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
    return report
