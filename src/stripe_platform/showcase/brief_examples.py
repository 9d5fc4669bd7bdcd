"""The brief's own example records, for the demo and tests: John42, the Amazon merchant,
transaction 12345 in Lille, its review, session and logs, plus a few hundred deterministic
neighbours spread over the last two years. Loading them twice changes nothing.

Realistic data at scale is `stripe-platform seed`; this is only enough to show every table,
partition and collection working.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import psycopg
from bson import ObjectId

from stripe_platform.config import Settings
from stripe_platform.paths import SQL_EXAMPLES_DIR

BRIEF_TRANSACTION_ID = 12345
JOHN_DOC_ID = ObjectId("000000000000000000000012")
AMAZON_DOC_ID = ObjectId("000000000000000000000064")

LOCATIONS = [
    (1, "Lille", "Hauts-de-France", "France", "FR", 50.62925, 3.05726),
    (2, "Paris", "Île-de-France", "France", "FR", 48.85661, 2.35222),
    (3, "Lyon", "Auvergne-Rhône-Alpes", "France", "FR", 45.76404, 4.83566),
    (4, "Berlin", "Berlin", "Germany", "DE", 52.52001, 13.40495),
    (5, "London", "England", "United Kingdom", "GB", 51.50735, -0.12776),
    (6, "New York", "New York", "United States", "US", 40.71278, -74.00597),
    (7, "Madrid", "Madrid", "Spain", "ES", 40.41678, -3.70379),
]
# (oltp id, name, industry id, size id, rating, mcc, location id)
MERCHANTS = [
    (3, "Amazon", 1, 3, 4.7, "5399", 2),
    (4, "Boulangerie Paul", 3, 1, 4.4, "5462", 1),
    (5, "Air France", 2, 3, 3.9, "4511", 2),
    (6, "Steam", 9, 3, 4.5, "5816", 6),
    (7, "Librairie Lilloise", 1, 1, 4.8, "5942", 1),
    (8, "Pharmacie du Centre", 6, 1, 4.2, "5912", 3),
]
# (oltp id, user, password, email, full name, country, device, payment method id, currency id)
CUSTOMERS = [
    (12, "John42", "password_john", "john.doe@stripe.com", "John Doe", "FR", "Tablet", 3, 1),
    (
        13,
        "marie_l",
        "marie-pass-2024",
        "marie.lefevre@example.fr",
        "Marie Lefèvre",
        "FR",
        "Mobile",
        1,
        1,
    ),
    (14, "hans.b", "hans-secret", "hans.becker@example.de", "Hans Becker", "DE", "Desktop", 2, 1),
    (15, "olivia_k", "olivia-pw", "olivia.king@example.co.uk", "Olivia King", "GB", "Mobile", 4, 3),
    (16, "mike_ny", "mike-pw-ny", "mike.ross@example.com", "Mike Ross", "US", "Desktop", 1, 2),
    (17, "lucia_m", "lucia-pw", "lucia.martin@example.es", "Lucía Martín", "ES", "Mobile", 1, 1),
]
HOME_LOCATION = {"FR": 1, "DE": 4, "GB": 5, "US": 6, "ES": 7}
DEVICES = {  # customer -> (device id, type, os, os version, browser, browser version)
    12: (2, "Tablet", "iPadOS", "17.1", "Safari", "16.5"),
    13: (3, "Mobile", "Android", "14", "Chrome", "120.0"),
    14: (4, "Desktop", "Windows", "11", "Edge", "119.0"),
    15: (5, "Mobile", "iOS", "17.2", "Safari", "17.2"),
    16: (6, "Desktop", "macOS", "14.1", "Chrome", "120.0"),
    17: (7, "Mobile", "Android", "13", "Firefox", "121.0"),
}
BRIEF_TIMESTAMP = dt.datetime(2025, 9, 8, 22, 49, 21, 808000, tzinfo=dt.UTC)
SAMPLE_TRANSACTIONS = 300


def _sample_transactions(today: dt.date) -> list[tuple[Any, ...]]:
    """Deterministic rows: (id, status, merchant, amount, currency, method, device, customer,
    billing address, location, ip, datetime)."""
    rng = random.Random(20250908)
    start = dt.datetime.combine(today.replace(day=1), dt.time(), tzinfo=dt.UTC) - dt.timedelta(
        days=730
    )
    rows = []
    for i in range(1, SAMPLE_TRANSACTIONS + 1):
        cust = rng.choice(CUSTOMERS)
        cid, country = cust[0], cust[5]
        merchant = rng.choice(MERCHANTS)
        when = start + dt.timedelta(seconds=rng.randrange(730 * 86400))
        status = rng.choices([1, 3, 4], weights=[90, 5, 5])[0]
        amount = round(rng.lognormvariate(3.5, 1.0), 2)
        rows.append(
            (
                i,
                status,
                merchant[0],
                amount,
                cust[8],
                cust[7],
                DEVICES[cid][0],
                cid,
                cid,
                HOME_LOCATION[country],
                f"203.0.113.{rng.randrange(1, 255)}",
                when,
            )
        )
    # The brief's transaction, plus one far in the past that belongs to no monthly partition.
    rows.append(
        (BRIEF_TRANSACTION_ID, 1, 3, 243.87, 1, 3, 2, 12, 12, 1, "203.0.113.45", BRIEF_TIMESTAMP)
    )
    rows.append(
        (
            SAMPLE_TRANSACTIONS + 1,
            1,
            4,
            12.5,
            1,
            1,
            3,
            13,
            13,
            1,
            "198.51.100.7",
            dt.datetime(2019, 3, 14, 9, 26, 53, tzinfo=dt.UTC),
        )
    )
    return rows


def execute_unlogged(conn: psycopg.Connection, statement: str) -> list[tuple]:
    """Run one of the brief's example statements as written, inside the caller's transaction, with
    statement logging off for it alone; return its rows (if any). The brief writes its secrets as
    literals (``crypt('password_john', ...)``, an e-mail): with ``log_statement = all`` they would
    land in the cluster's log in clear. The platform's own statements pass them as parameters.
    ``log_statement`` is a superuser setting: the embedded runtime's service role."""
    (logged,) = conn.execute("SELECT current_setting('log_statement')").fetchone()
    conn.execute("SET LOCAL log_statement = 'none'")
    cur = conn.execute(statement)
    rows = cur.fetchall() if cur.description else []
    conn.execute("SELECT set_config('log_statement', %s, true)", (logged,))
    return rows


def load_oltp(conn: psycopg.Connection, today: dt.date | None = None) -> int:
    """Insert the examples into PostgreSQL (idempotent); return the number of transactions present."""
    today = today or dt.date.today()
    with conn.transaction():
        with conn.cursor() as cur:
            cur.executemany(
                """INSERT INTO Location (ID, City, Region, Country, CountryCode, Latitude, Longitude)
                   VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                LOCATIONS,
            )
            cur.executemany(
                """INSERT INTO Merchant (ID, Name, IndustryID, MerchantSizeID, Rating,
                                         MerchantCategoryCode, LocationID)
                   VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                MERCHANTS,
            )
            execute_unlogged(conn, (SQL_EXAMPLES_DIR / "customer_insert.sql").read_text())
            cur.executemany(
                """INSERT INTO Customer (ID, UserName, Password, Email, FullName, CountryCode,
                       PreferredDevice, PreferredPaymentMethodID, PreferredCurrencyID)
                   VALUES (%s, %s, crypt(%s, gen_salt('bf')), pii_encrypt(%s, 'postgres/customer'),
                           pii_encrypt(%s, 'postgres/customer'), %s, %s, %s, %s)
                   ON CONFLICT (UserName) DO NOTHING""",
                [c for c in CUSTOMERS if c[0] != 12],
            )
            cur.executemany(
                """INSERT INTO Address (ID, CustomerID, Line1, PostalCode, LocationID)
                   VALUES (%s, %s, pii_encrypt(%s, 'postgres/address'), %s, %s)
                   ON CONFLICT DO NOTHING""",
                [
                    (c[0], c[0], f"{c[0]} rue de l'Exemple", f"{59000 + c[0]}", HOME_LOCATION[c[5]])
                    for c in CUSTOMERS
                ],
            )
            cur.executemany(
                """INSERT INTO Device (ID, CustomerID, DeviceType, OS, OSVersion, Browser,
                                       BrowserVersion, Fingerprint)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                [(d[0], cid, *d[1:], f"fp-{cid}-{d[0]}") for cid, d in DEVICES.items()],
            )
            cur.executemany(
                """INSERT INTO Transaction (ID, TransactionStatusID, MerchantID, Amount, CurrencyID,
                       PaymentMethodID, DeviceID, CustomerID, BillingAddressID,
                       TransactionLocationID, IPAddress, DateTime)
                   SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s
                   WHERE NOT EXISTS (SELECT FROM Transaction WHERE ID = %s)""",
                [(*row, row[0]) for row in _sample_transactions(today)],
            )
            # Explicit ids were used: move every identity past them so later inserts never collide.
            for table in ("location", "merchant", "customer", "address", "device", "transaction"):
                cur.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"greatest((SELECT max(id) FROM {table}), 1))"
                )
        return conn.execute("SELECT count(*) FROM Transaction").fetchone()[0]


def _documents() -> dict[str, list[dict[str, Any]]]:
    updated = dt.datetime(2025, 9, 4, 14, 49, 21, 808000, tzinfo=dt.UTC)
    methods = {1: "Credit Card", 2: "Debit Card", 3: "Bank Transfer", 4: "Wallet"}
    currencies = {1: "EUR", 2: "USD", 3: "GBP"}
    industries = {1: "Retail", 2: "Travel", 3: "Food & Beverage", 6: "Health", 9: "Gaming"}
    customer_ids = {c[0]: ObjectId(f"{c[0]:024d}") for c in CUSTOMERS}
    merchant_ids = {m[0]: ObjectId(f"{m[0] if m[0] != 3 else 64:024d}") for m in MERCHANTS}
    assert customer_ids[12] == JOHN_DOC_ID and merchant_ids[3] == AMAZON_DOC_ID
    cities = {loc[0]: (loc[1], loc[3]) for loc in LOCATIONS}

    customers = [
        {
            "_id": customer_ids[c[0]],
            "oltp_id": c[0],
            "userName": c[1],
            "email": c[3],
            "preferences": {
                "device": c[6],
                "paymentMethod": methods[c[7]],
                "currency": currencies[c[8]],
            },
            "lastUpdated": updated,
        }
        for c in CUSTOMERS
    ]
    merchants = [
        {
            "_id": merchant_ids[m[0]],
            "oltp_id": m[0],
            "name": m[1],
            "industry": industries[m[2]],
            "rating": {"average": m[4]},
            "lastUpdated": updated,
        }
        for m in MERCHANTS
    ]
    reviews = [
        {
            "_id": ObjectId("0" * 24),
            "transaction_id": BRIEF_TRANSACTION_ID,
            "customer_id": JOHN_DOC_ID,
            "merchant_id": AMAZON_DOC_ID,
            "rating": 4,
            "message": "The product was not what I wanted, but customer service refunded me quickly.",
            "timestamp": dt.datetime(2025, 9, 9, 14, 49, 21, 808000, tzinfo=dt.UTC),
        },
        {
            "_id": ObjectId(f"{1:024x}"),
            "transaction_id": 1,
            "customer_id": JOHN_DOC_ID,
            "merchant_id": AMAZON_DOC_ID,
            "rating": 5,
            "message": "Fast delivery.",
            "timestamp": dt.datetime(2025, 3, 2, 10, 0, tzinfo=dt.UTC),
        },
        {
            "_id": ObjectId(f"{2:024x}"),
            "transaction_id": 2,
            "customer_id": JOHN_DOC_ID,
            "merchant_id": merchant_ids[7],
            "rating": 5,
            "message": "Great bookshop.",
            "timestamp": dt.datetime(2025, 4, 12, 16, 30, tzinfo=dt.UTC),
        },
        {
            "_id": ObjectId(f"{3:024x}"),
            "transaction_id": 3,
            "customer_id": customer_ids[13],
            "merchant_id": AMAZON_DOC_ID,
            "rating": 2,
            "message": "Late parcel.",
            "timestamp": dt.datetime(2025, 5, 20, 8, 15, tzinfo=dt.UTC),
        },
    ]
    session_start = dt.datetime(2025, 9, 9, 14, 22, 15, tzinfo=dt.UTC)
    sessions = [
        {
            "_id": ObjectId(f"{13:024d}"),
            "session_id": "64cjbz756.93h3",
            "session_start": session_start,
            "device": {
                "type": "tablet",
                "os": "iPadOS",
                "osVersion": "17.1",
                "browser": "Safari",
                "browserVersion": "16.5",
            },
            "location": {"ip": "203.0.113.45", "country": "France", "city": "Lille"},
            "events": [
                {
                    "eventType": "page_view",
                    "pageUrl": "/home",
                    "referrer": "stripe.com",
                    "timestamp": session_start + dt.timedelta(seconds=60),
                },
                {
                    "eventType": "click",
                    "elementId": "signup_button",
                    "pageUrl": "/home",
                    "timestamp": session_start + dt.timedelta(seconds=75),
                },
                {
                    "eventType": "form_submit",
                    "formId": "signup_form",
                    "pageUrl": "/login",
                    "timestamp": session_start + dt.timedelta(seconds=107),
                    "formFields": {"email": "john.doe@stripe.com", "rememberMe": 1},
                },
                {
                    "eventType": "page_view",
                    "pageUrl": "/dashboard",
                    "timestamp": session_start + dt.timedelta(seconds=115),
                },
            ],
            "sessionDuration": 75,
            "isActive": False,
        },
    ]
    rng = random.Random(7)
    for n, (cid, device) in enumerate(sorted(DEVICES.items()) * 4, start=1):
        start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC) + dt.timedelta(
            minutes=rng.randrange(400_000)
        )
        city, country = cities[HOME_LOCATION[next(c[5] for c in CUSTOMERS if c[0] == cid)]]
        sessions.append(
            {
                "_id": ObjectId(f"{1000 + n:024d}"),
                "session_id": f"s{n:05d}.{cid}",
                "session_start": start,
                "device": {
                    "type": device[1].lower(),
                    "os": device[2],
                    "osVersion": device[3],
                    "browser": device[4],
                    "browserVersion": device[5],
                },
                "location": {"ip": f"198.51.100.{n}", "country": country, "city": city},
                "events": [
                    {
                        "eventType": "page_view",
                        "pageUrl": "/home",
                        "timestamp": start + dt.timedelta(seconds=5),
                    }
                ],
                "sessionDuration": 5 + rng.randrange(300),
                "isActive": False,
            }
        )
    transactions = [
        {
            "_id": ObjectId(f"{823:024d}"),
            "transaction_id": BRIEF_TRANSACTION_ID,
            "transaction_status_id": 2,
            "merchant_id": 3,
            "amount": 243.87,
            "currency_id": 1,
            "payment_method_id": 3,
            "device_id": 2,
            "customer_email": "john.doe@stripe.com",
            "ip_address": "203.0.113.45",
            "transaction_city": "Lille",
            "transaction_country": "France",
            "billing_city": "Lille",
            "billing_country": "France",
            "AnomalyScore": 0.1,
            "isFraud": 0,
            "timestamp": BRIEF_TIMESTAMP,
        },
    ]
    session = dt.datetime(2025, 9, 8, 22, 46, 21, 808000, tzinfo=dt.UTC)
    at = dt.datetime(2025, 9, 8, 22, 49, 21, 808000, tzinfo=dt.UTC)
    logs = [
        {
            "_id": ObjectId(f"{23:024d}"),
            "query_id": 1,
            "user": "postgres",
            "dbname": "stripe",
            "pid": 18254,
            "remote_host": "[local]",
            "session_id": "64c6e836.474e",
            "session_start": session,
            "application_name": "psql",
            "lines": [
                {
                    "timestamp": at,
                    "error_severity": "LOG",
                    "message": "statement: SELECT * FROM CustomerInteractions;",
                },
                {
                    "timestamp": at,
                    "error_severity": "ERROR",
                    "state_code": "42P01",
                    "message": "Table `CustomerInteractions` does not exist",
                    "statement": "SELECT * FROM CustomerInteractions;",
                },
            ],
        },
        {
            "_id": ObjectId(f"{24:024d}"),
            "query_id": 2,
            "user": "admin",
            "dbname": "stripe",
            "pid": 18301,
            "remote_host": "10.0.4.12",
            "session_id": "64c6e9a1.477d",
            "session_start": session,
            "application_name": "psql",
            "lines": [
                {
                    "timestamp": at,
                    "error_severity": "LOG",
                    "message": "statement: DROP TABLE TransactionStateChanges;",
                },
                {
                    "timestamp": at,
                    "error_severity": "ERROR",
                    "state_code": "42501",
                    "message": "must be owner of table transactionstatechanges",
                    "statement": "DROP TABLE TransactionStateChanges;",
                },
            ],
        },
        {
            "_id": ObjectId(f"{25:024d}"),
            "query_id": 3,
            "user": "admin",
            "dbname": "stripe",
            "pid": 18301,
            "remote_host": "10.0.4.12",
            "session_id": "64c6e9a1.477d",
            "session_start": session,
            "application_name": "psql",
            "lines": [
                {
                    "timestamp": at,
                    "error_severity": "LOG",
                    "message": "statement: SELECT count(*) FROM Merchant;",
                }
            ],
        },
        {
            "_id": ObjectId(f"{26:024d}"),
            "query_id": 4,
            "user": "admin",
            "dbname": "analytics",
            "pid": 18400,
            "remote_host": "10.0.4.12",
            "session_id": "64c6ea00.47e0",
            "session_start": session,
            "application_name": "dbt",
            "lines": [
                {
                    "timestamp": at,
                    "error_severity": "ERROR",
                    "state_code": "42703",
                    "message": 'column "amout" does not exist',
                    "statement": "SELECT amout FROM fact_revenue;",
                }
            ],
        },
    ]
    return {
        "Customer": customers,
        "Merchant": merchants,
        "CustomerReview": reviews,
        "UserInteractionData": sessions,
        "Transaction": transactions,
        "Log": logs,
    }


def load_documents(db: Any, settings: Settings) -> dict[str, int]:
    """Upsert the example documents by _id (idempotent); return the count per collection. Their
    protected fields (John Doe's e-mail) are encrypted as every write of the platform does."""
    from pymongo import ReplaceOne

    from stripe_platform.docstore import validation  # checks the validators FerretDB lacks
    from stripe_platform.docstore.fields import DocumentFields

    fields = DocumentFields(settings)
    counts = {}
    for collection, docs in _documents().items():
        docs = fields.encrypt_documents(collection, docs)
        upserts = [ReplaceOne({"_id": doc["_id"]}, doc, upsert=True) for doc in docs]
        validation.bulk_write(db[collection], upserts)
        counts[collection] = db[collection].count_documents({})
    return counts
