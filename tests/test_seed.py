"""Synthetic data: determinism, integrity across both stores, planted patterns, resumability."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from stripe_platform.docstore.client import connect as connect_docs
from stripe_platform.docstore.fields import DocumentFields
from stripe_platform.oltp import db
from stripe_platform.seed import incremental
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import build
from stripe_platform.seed.documents import customers, sessions
from stripe_platform.seed.spec import SeedError, make_spec

END = dt.date(2026, 11, 1)
SPEC = {"scale": 0.01, "seed": 7, "end": END, "max_documents": None}


@pytest.fixture(scope="module")
def seeded(settings):
    """One seeded database and document database, on the session's servers, shared by the
    read-only tests of this module (the per-test `database` and `docdb` fixtures cannot be)."""
    name = f"seeded_{os.getpid()}"
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE stripe_template STRATEGY FILE_COPY").format(
                sql.Identifier(name)
            )
        )
    s = settings.model_copy(update={"pg_database": name, "mongodb_database": name})
    docs = connect_docs(s)
    try:
        data = build(make_spec(**SPEC))
        seed_load.seed(s, data, docs)
        with db.connect(s, autocommit=True) as conn:
            yield s, conn, docs, data
    finally:
        docs.client.drop_database(name)
        docs.client.close()
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def stores(settings, database, docdb):
    """Settings naming the test's own PostgreSQL and document databases on the session's
    servers (both dropped after the test by their fixtures)."""
    return settings.model_copy(update={"pg_database": database, "mongodb_database": docdb.name})


def rows(conn, query, *params):
    return conn.execute(query, params or None).fetchall()


def test_same_seed_same_data_and_another_seed_differs():
    a, b = build(make_spec(**SPEC)), build(make_spec(**SPEC))
    for table in ("transactions", "state_changes"):
        assert getattr(a, table).equals(getattr(b, table))
    for table in ("customers", "merchants", "devices", "addresses", "instruments"):
        assert getattr(a.entities, table).equals(getattr(b.entities, table))
    assert list(customers(a)) == list(customers(b))
    assert list(sessions(a, np.random.default_rng(1))) == list(
        sessions(b, np.random.default_rng(1))
    )
    other = build(make_spec(**{**SPEC, "seed": 8}))
    assert not other.transactions.equals(a.transactions)


def test_bad_arguments_are_refused_before_anything_is_written(settings, database):
    for bad, flag in (
        ({"scale": -1}, "--scale"),
        ({"fraud_rate": 0.2}, "--fraud-rate"),
        ({"days": 3}, "--days"),
        ({"colour": "red"}, "--colour"),
    ):
        with pytest.raises(SeedError, match=flag):
            make_spec(**bad)
    env = {
        **os.environ,
        "STRIPE_PLATFORM_HOME": str(settings.home_dir),
        "STRIPE_PLATFORM_PG_DATABASE": database,
        "STRIPE_PLATFORM_PG_FSYNC": "false",
    }
    result = subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", "seed", "--scale", "-2"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 1 and "--scale=-2.0" in result.stderr
    with db.connect(settings, database=database) as conn:
        assert conn.execute("SELECT count(*) FROM platform.seed_run").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM Customer").fetchone() == (0,)


def test_oltp_referential_integrity(seeded):
    _, conn, _, data = seeded
    assert rows(conn, "SELECT count(*) FROM Transaction")[0][0] == data.spec.n_transactions
    orphans = rows(
        conn,
        """
        SELECT count(*) FILTER (WHERE m.ID IS NULL), count(*) FILTER (WHERE c.ID IS NULL),
               count(*) FILTER (WHERE t.DeviceID IS NOT NULL AND d.ID IS NULL),
               count(*) FILTER (WHERE a.ID IS NULL OR a.CustomerID <> t.CustomerID),
               count(*) FILTER (WHERE p.ID IS NOT NULL AND p.CustomerID <> t.CustomerID),
               count(*) FILTER (WHERE d.ID IS NOT NULL AND d.CustomerID <> t.CustomerID)
        FROM Transaction t
        LEFT JOIN Merchant m ON m.ID = t.MerchantID LEFT JOIN Customer c ON c.ID = t.CustomerID
        LEFT JOIN Device d ON d.ID = t.DeviceID LEFT JOIN Address a ON a.ID = t.BillingAddressID
        LEFT JOIN PaymentInstrument p ON p.ID = t.PaymentInstrumentID""",
    )[0]
    assert orphans == (0, 0, 0, 0, 0, 0)
    # Every status is where its audit trail says, through permitted transitions only.
    assert (
        rows(
            conn,
            """
        SELECT count(*) FROM TransactionStateChanges s
        LEFT JOIN TransactionStatusTransition x USING (FromStatusID, ToStatusID)
        WHERE x.FromStatusID IS NULL""",
        )[0][0]
        == 0
    )
    assert (
        rows(
            conn,
            """
        SELECT count(*) FROM Transaction t
        WHERE t.TransactionStatusID IS DISTINCT FROM coalesce(
            (SELECT ToStatusID FROM TransactionStateChanges s WHERE s.TransactionID = t.ID
             ORDER BY s.UpdatedAt DESC LIMIT 1), 3)""",
        )[0][0]
        == 0
    )
    statuses = dict(rows(conn, "SELECT TransactionStatusID, count(*) FROM Transaction GROUP BY 1"))
    assert {1, 2, 4, 6, 7} <= set(statuses)  # completed, refunded, failed, charged back, cancelled
    # Passwords are bcrypt hashes and personal data is encrypted, as for any other write.
    assert rows(conn, "SELECT count(*) FROM Customer WHERE Password !~ '^\\$2a\\$'")[0][0] == 0
    assert (
        rows(
            conn,
            """SELECT count(*) FROM Customer
                         WHERE EmailHash <> pii_lookup_hash(pii_decrypt(Email))""",
        )[0][0]
        == 0
    )


def test_documents_reference_real_rows(seeded):
    s, conn, docs, _ = seeded
    pg_customers = {
        r[0]: (r[1], r[2])
        for r in rows(conn, "SELECT ID, UserName, pii_decrypt(Email) FROM Customer")
    }
    fields = DocumentFields(s)  # the e-mails are encrypted at rest
    clear = fields.decrypt_documents("Customer", docs.Customer.find())
    doc_customers = {d["_id"]: d for d in clear}
    assert len(doc_customers) == len(pg_customers)
    for doc in doc_customers.values():
        assert pg_customers[doc["oltp_id"]] == (doc["userName"], doc["email"])
    industry = dict(
        rows(conn, "SELECT m.ID, i.Name FROM Merchant m JOIN Industry i ON i.ID = m.IndustryID")
    )
    doc_merchants = {d["_id"]: d for d in docs.Merchant.find()}
    assert {d["oltp_id"]: d["industry"] for d in doc_merchants.values()} == industry

    tx = {
        r[0]: r[1:]
        for r in rows(
            conn,
            "SELECT ID, CustomerID, MerchantID, Amount::float8, "
            "TransactionStatusID FROM Transaction",
        )
    }
    scored = fields.decrypt_documents("Transaction", docs.Transaction.find())
    assert len(scored) == len(tx)
    for doc in scored:
        customer, merchant, amount, status = tx[doc["transaction_id"]]
        assert (doc["merchant_id"], doc["amount"], doc["transaction_status_id"]) == (
            merchant,
            amount,
            status,
        )
        assert doc["customer_email"] == pg_customers[customer][1]
    reviews = list(docs.CustomerReview.find())
    assert reviews
    for review in reviews:
        customer, merchant, _, status = tx[review["transaction_id"]]
        assert doc_customers[review["customer_id"]]["oltp_id"] == customer
        assert doc_merchants[review["merchant_id"]]["oltp_id"] == merchant
        assert status in (1, 2, 6)
    for session in docs.UserInteractionData.find().limit(200):
        assert session["customer_id"] in doc_customers
        assert session["events"] and session["sessionDuration"] >= 0


def test_planted_fraud_rate_and_patterns(seeded):
    _, conn, docs, data = seeded
    labels = [d["isFraud"] for d in docs.Transaction.find({}, {"isFraud": 1})]
    assert abs(sum(labels) / len(labels) - data.spec.fraud_rate) < 0.2 * data.spec.fraud_rate
    fraud = {d["transaction_id"]: d["fraudPattern"] for d in docs.Transaction.find({"isFraud": 1})}
    ids = {p: [i for i, q in fraud.items() if q == p] for p in set(fraud.values())}
    assert set(ids) == {
        "card_testing",
        "account_takeover",
        "odd_hour_large_amount",
        "colluding_merchant",
    }

    # Card testing: tiny amounts in bursts of 5+ on one card within ten minutes, mostly declined.
    bursts = rows(
        conn,
        """
        SELECT PaymentInstrumentID, count(*), max(DateTime) - min(DateTime), max(Amount)
        FROM Transaction WHERE ID = ANY(%s) AND CurrencyID = 1
        GROUP BY PaymentInstrumentID""",
        ids["card_testing"],
    )
    assert bursts and all(
        n >= 5 and span < dt.timedelta(minutes=15) and top <= 5
        for _, n, span, top in bursts
        if n >= 5
    )
    declined = rows(
        conn,
        "SELECT avg((TransactionStatusID = 4)::int) FROM Transaction WHERE ID = ANY(%s)",
        ids["card_testing"],
    )[0][0]
    assert declined > 0.4
    # Account takeover: a device first seen for it, abroad relative to the billing address.
    mismatched = rows(
        conn,
        """
        SELECT avg((tl.CountryCode <> bl.CountryCode)::int), avg((t.DateTime - d.FirstSeenAt < interval '2 hours')::int)
        FROM Transaction t JOIN Location tl ON tl.ID = t.TransactionLocationID
        JOIN Address a ON a.ID = t.BillingAddressID JOIN Location bl ON bl.ID = a.LocationID
        JOIN Device d ON d.ID = t.DeviceID WHERE t.ID = ANY(%s)""",
        ids["account_takeover"],
    )[0]
    assert mismatched == (1, 1)
    # Large amounts: far above the customer's own median.
    ratio = rows(
        conn,
        """
        SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY t.Amount / m.median) FROM Transaction t
        JOIN (SELECT CustomerID, percentile_cont(0.5) WITHIN GROUP (ORDER BY Amount) AS median
              FROM Transaction GROUP BY CustomerID) m USING (CustomerID)
        WHERE t.ID = ANY(%s)""",
        ids["odd_hour_large_amount"],
    )[0][0]
    assert ratio > 5
    # Colluding merchants: few merchants, many cards, chargebacks far above the base rate.
    merchants = rows(
        conn,
        "SELECT count(DISTINCT MerchantID), count(DISTINCT CustomerID) FROM Transaction "
        "WHERE ID = ANY(%s)",
        ids["colluding_merchant"],
    )[0]
    assert merchants[0] <= 3 and merchants[1] > 5 * merchants[0]
    rates = rows(
        conn,
        """SELECT avg((TransactionStatusID = 6)::int) FILTER (WHERE ID = ANY(%s)),
                                 avg((TransactionStatusID = 6)::int) FILTER (WHERE NOT ID = ANY(%s))
                          FROM Transaction""",
        list(fraud),
        list(fraud),
    )[0]
    assert rates[0] > 20 * rates[1]


def test_log_documents_with_labelled_anomalies(seeded):
    _, _, docs, _ = seeded
    logs = list(docs.Log.find())
    kinds = {d.get("anomalyType") for d in logs if d["isAnomaly"]}
    assert kinds == {"off_hours_pii_read", "failed_login_burst", "mass_export"}
    assert 0.005 < sum(d["isAnomaly"] for d in logs) / len(logs) < 0.1
    failed = [d for d in logs if d.get("anomalyType") == "failed_login_burst"]
    assert all(line["state_code"] == "28P01" for d in failed for line in d["lines"])
    assert any(line.get("state_code") == "42P01" for d in logs for line in d["lines"])


def test_every_month_of_history_is_populated(seeded):
    _, conn, _, data = seeded
    counts = dict(
        rows(conn, "SELECT tableoid::regclass::text, count(*) FROM Transaction GROUP BY 1")
    )
    month, months = data.spec.start.replace(day=1), []
    while month < END:
        months.append(f"transaction_y{month.year}m{month.month:02d}")
        month = (month + dt.timedelta(days=32)).replace(day=1)
    assert len(months) >= 24
    assert all(counts.get(m, 0) > 0 for m in months), {m: counts.get(m) for m in months}
    assert "transaction_default" not in counts
    # Seasonality: December busier than February on average across the years.
    by_month = dict(
        rows(conn, "SELECT extract(month FROM DateTime)::int, count(*) FROM Transaction GROUP BY 1")
    )
    assert by_month[12] > by_month[2] * 1.2


def test_interrupted_run_resumes_to_exactly_the_data(settings, database, docdb, monkeypatch):
    s, docs = stores(settings, database, docdb), docdb
    data = build(make_spec(**{**SPEC, "max_documents": 500}))
    monkeypatch.setattr(seed_load, "TX_BATCH", 2_000)  # several batches: indexes deferred
    indexes = "SELECT indexdef FROM pg_indexes WHERE tablename = 'transaction' ORDER BY 1"
    # Per partition (the seed creates them): its indexes, all valid.
    per_partition = """SELECT t.relid::regclass::text, count(i.indexrelid), bool_and(i.indisvalid)
                       FROM pg_partition_tree('transaction') t
                       LEFT JOIN pg_index i ON i.indrelid = t.relid WHERE t.isleaf GROUP BY 1"""
    with db.connect(s) as conn:
        migrated = rows(conn, indexes)
    real_writer = seed_load._transaction_writer
    calls = {"n": 0}

    def crashing_writer(tx, changes):
        write = real_writer(tx, changes)

        def wrapped(conn):
            calls["n"] += 1
            if calls["n"] == 3:
                write(conn)  # the batch is written, then the process "dies" before commit
                raise KeyboardInterrupt
            write(conn)

        return wrapped

    monkeypatch.setattr(seed_load, "_transaction_writer", crashing_writer)
    with pytest.raises(KeyboardInterrupt):
        seed_load.seed(s, data, docs)
    with db.connect(s) as conn:
        committed = conn.execute(
            "SELECT count(*) FROM platform.seed_batch WHERE entity = 'transaction'"
        ).fetchone()[0]
        assert conn.execute("SELECT count(*) FROM Transaction").fetchone()[0] == committed * 2_000
        # The secondary indexes were dropped for the load; their definitions are kept for the
        # rerun (primary key only in the meantime).
        assert rows(conn, indexes) == [r for r in migrated if "_pkey" in r[0]]
        assert {(n, valid) for _, n, valid in rows(conn, per_partition)} == {(1, True)}
        kept = rows(
            conn, "SELECT count(*) FROM platform.seed_batch WHERE entity LIKE 'index:CREATE%'"
        )
        assert kept[0][0] == len(migrated) - 1 == 4  # customer, merchant, updated, device
    monkeypatch.setattr(seed_load, "_transaction_writer", real_writer)
    report = seed_load.seed(s, data, docs)
    assert report.resumed_batches >= committed
    with db.connect(s) as conn:
        count, distinct, total = conn.execute(
            "SELECT count(*), count(DISTINCT ID), sum(Amount)::float8 FROM Transaction"
        ).fetchone()
        changes = conn.execute("SELECT count(*) FROM TransactionStateChanges").fetchone()[0]
        assert rows(conn, indexes) == migrated  # built again, as the migrations define them,
        partitions = rows(conn, per_partition)  # on every partition
        assert len(partitions) >= 24 and {(n, v) for _, n, v in partitions} == {(5, True)}
        assert not rows(conn, "SELECT entity FROM platform.seed_batch WHERE entity LIKE 'index:%'")
    assert count == distinct == data.transactions.num_rows
    assert total == pytest.approx(float(np.sum(data.transactions.column("amount").to_numpy())))
    assert changes == data.state_changes.num_rows


def test_copy_writes_zoned_timestamps_as_the_same_instants_in_any_session_zone(conn):
    """The seed's COPY text of timestamps (oltp/db.py: the UTC time and +00): every unit, zone,
    null and date before 1970 reads back as the instant it was, in a session far from UTC."""
    rng = np.random.default_rng(3)
    conn.execute("SET TimeZone = 'America/New_York'")
    conn.execute("CREATE TEMP TABLE stamps (i int, t timestamptz)")
    for unit, scale in (("s", 1), ("ms", 1_000), ("us", 1_000_000)):
        for zone in ("UTC", "Europe/Paris", "+05:30"):
            values = rng.integers(-2 * 10**9, 4 * 10**9, 500) * scale + rng.integers(0, scale, 500)
            stamps = pa.array(values, pa.timestamp(unit, tz=zone), mask=rng.random(500) < 0.1)
            conn.execute("TRUNCATE stamps")
            db.copy_arrow(conn, "stamps", pa.table({"i": np.arange(500), "t": stamps}))
            back = [t for (t,) in rows(conn, "SELECT t FROM stamps ORDER BY i")]
            utc = [None if t is None else t.astimezone(dt.UTC) for t in stamps.to_pylist()]
            assert [None if t is None else t.astimezone(dt.UTC) for t in back] == utc, (unit, zone)


def test_killed_process_leaves_consistent_stores_and_rerun_completes(settings, database, docdb):
    s = stores(settings, database, docdb)
    env = {
        **os.environ,
        "STRIPE_PLATFORM_HOME": str(s.home_dir),
        "STRIPE_PLATFORM_PG_DATABASE": s.pg_database,
        "STRIPE_PLATFORM_MONGODB_DATABASE": s.mongodb_database,
    }
    args = [
        sys.executable,
        "-m",
        "stripe_platform.cli",
        "seed",
        "--scale",
        "0.03",
        "--seed",
        "3",
        "--end",
        END.isoformat(),
        "--max-documents",
        "300",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    with db.connect(s, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if conn.execute("SELECT count(*) FROM platform.seed_batch").fetchone()[0] >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        n_batches = conn.execute("SELECT count(*) FROM platform.seed_batch").fetchone()[0]
        assert conn.execute("SELECT finished_at FROM platform.seed_run").fetchone() == (None,)
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    expected = build(make_spec(scale=0.03, seed=3, end=END, max_documents=300))
    with db.connect(s) as conn:
        count, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT ID) FROM Transaction"
        ).fetchone()
        assert count == distinct == expected.transactions.num_rows
        assert (
            conn.execute("SELECT count(*) FROM Customer").fetchone()[0]
            == expected.entities.customers.num_rows
        )
        assert conn.execute("SELECT count(*) FROM platform.seed_batch").fetchone()[0] >= n_batches
    assert docdb.Customer.count_documents({}) == expected.entities.customers.num_rows
    assert docdb.Transaction.count_documents({}) == 300


def test_incremental_mode_inserts_updates_and_deletes(settings, database, docdb):
    s, docs = stores(settings, database, docdb), docdb
    seed_load.seed(s, build(make_spec(scale=0.005, seed=11, end=END, max_documents=500)), docs)

    def snapshot(conn):
        return conn.execute(
            "SELECT (SELECT count(*) FROM Transaction), (SELECT max(DateTime) FROM Transaction),"
            " (SELECT count(*) FROM TransactionStateChanges), (SELECT array_agg(ID) FROM Device),"
            " (SELECT max(UpdatedAt) FROM Customer)"
        ).fetchone()

    with db.connect(s) as conn:
        before = snapshot(conn)
    docs_before = docs.Transaction.count_documents({})
    report = incremental.run(s, docs, seed=1, minutes=24 * 60)
    with db.connect(s) as conn:
        after = snapshot(conn)
    inserted = report.inserted["transaction"]
    assert inserted > 0 and after[0] == before[0] + inserted
    assert after[1] > before[1]  # appended after the latest timestamp
    assert after[2] >= before[2] + report.updated["transaction"]  # updates through the audit trail
    assert after[4] > before[4]  # customers updated
    removed = set(before[3]) - set(after[3])
    assert len(removed) == report.deleted["device"] >= 1
    assert docs.Transaction.count_documents({}) == docs_before + inserted

    report = incremental.run(s, docs, seed=2, tps=5, duration=1.5)
    assert report.ticks >= 1 and report.inserted["transaction"] >= 1
    with pytest.raises(SeedError, match="exactly one"):
        incremental.run(s, docs, seed=3)


def test_seeding_over_foreign_data_needs_reset(settings, loaded, database, docdb):
    s, docs = stores(settings, database, docdb), docdb
    data = build(make_spec(scale=0.005, seed=5, end=END, max_documents=200))
    with pytest.raises(SeedError, match="--reset"):
        seed_load.seed(s, data, docs)
    assert loaded.execute("SELECT count(*) FROM Transaction WHERE ID = 12345").fetchone() == (1,)
    seed_load.seed(s, data, docs, reset_first=True)
    assert (
        loaded.execute("SELECT count(*) FROM Transaction").fetchone()[0]
        == data.transactions.num_rows
    )
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        loaded.execute("DELETE FROM TransactionStateChanges")  # the guard is back after the reset
