import datetime as dt

import pytest

from stripe_platform.oltp import partitions
from stripe_platform.oltp.partitions import add_months, maintain

TODAY = dt.date(2026, 11, 26)


@pytest.fixture
def parties(conn):
    conn.execute(
        "INSERT INTO Location (ID, City, Country, CountryCode) VALUES (1, 'Lille', 'France', 'FR')"
    )
    conn.execute(
        "INSERT INTO Merchant (ID, Name, IndustryID, MerchantSizeID) VALUES (1, 'Amazon', 1, 3)"
    )
    conn.execute(
        "INSERT INTO Customer (ID, UserName, Password, Email) "
        "VALUES (1, 'John42', crypt('pw', gen_salt('bf')), pii_encrypt('john@example.com'))"
    )
    return conn


def insert_at(conn, when: str, tx_id: int) -> str:
    conn.execute(
        "INSERT INTO Transaction (ID, TransactionStatusID, MerchantID, Amount, CurrencyID, "
        "PaymentMethodID, CustomerID, DateTime) VALUES (%s, 1, 1, 10, 1, 1, 1, %s)",
        (tx_id, when),
    )
    return conn.execute(
        "SELECT tableoid::regclass::text FROM Transaction WHERE ID = %s", (tx_id,)
    ).fetchone()[0]


def test_month_arithmetic():
    assert add_months(dt.date(2026, 11, 1), 3) == dt.date(2027, 2, 1)
    assert add_months(dt.date(2026, 1, 1), -1) == dt.date(2025, 12, 1)


def test_rows_land_in_their_month_and_outliers_in_default(parties):
    report = maintain(parties, today=TODAY, months_ahead=3, retention_months=24)
    assert report.created[0] == "transaction_y2024m12"
    assert report.created[-1] == "transaction_y2027m02"
    assert len(report.created) == 27
    assert insert_at(parties, "2025-09-08 22:49:21+00", 1) == "transaction_y2025m09"
    assert insert_at(parties, "2026-11-30 23:59:59+00", 2) == "transaction_y2026m11"
    assert insert_at(parties, "2026-12-01 00:00:00+00", 3) == "transaction_y2026m12"
    assert insert_at(parties, "2019-03-14 09:26:53+00", 4) == "transaction_default"
    assert insert_at(parties, "2031-01-01 00:00:00+00", 5) == "transaction_default"


def test_maintenance_is_idempotent(parties):
    maintain(parties, today=TODAY, months_ahead=1, retention_months=3)
    again = maintain(parties, today=TODAY, months_ahead=1, retention_months=3)
    assert again.created == [] and again.archived == []


def test_new_month_takes_its_rows_out_of_default(parties):
    maintain(parties, today=TODAY, months_ahead=0, retention_months=1)
    assert insert_at(parties, "2027-03-05 10:00+00", 10) == "transaction_default"
    assert insert_at(parties, "2027-03-20 10:00+00", 11) == "transaction_default"
    assert insert_at(parties, "2027-04-02 10:00+00", 12) == "transaction_default"
    report = maintain(parties, today=dt.date(2027, 3, 1), months_ahead=0, retention_months=12)
    assert report.moved_rows == {"transaction_y2027m03": 2}
    where = dict(parties.execute("SELECT ID, tableoid::regclass::text FROM Transaction").fetchall())
    assert where == {
        10: "transaction_y2027m03",
        11: "transaction_y2027m03",
        12: "transaction_default",
    }


def test_partitions_past_retention_are_archived_not_lost(parties):
    maintain(parties, today=TODAY, months_ahead=0, retention_months=6)
    insert_at(parties, "2026-06-15 12:00+00", 20)
    report = maintain(parties, today=dt.date(2027, 2, 1), months_ahead=0, retention_months=6)
    assert "archive.transaction_y2026m06" in report.archived
    assert parties.execute("SELECT count(*) FROM Transaction WHERE ID = 20").fetchone() == (0,)
    assert parties.execute("SELECT ID FROM archive.transaction_y2026m06").fetchall() == [(20,)]
    assert "transaction_y2026m06" not in partitions.existing_partitions(parties).values()


def test_rows_on_a_month_boundary_move_to_the_month_they_start(parties):
    """A partition covers [first instant of its month, first instant of the next): rows stranded in
    default exactly on either bound go to the month that starts there."""
    maintain(parties, today=TODAY, months_ahead=0, retention_months=1)
    stranded = {
        30: "2027-02-28 23:59:59.999999+00",
        31: "2027-03-01 00:00:00+00",
        32: "2027-03-31 23:59:59.999999+00",
        33: "2027-04-01 00:00:00+00",
    }
    for tx_id, when in stranded.items():
        assert insert_at(parties, when, tx_id) == "transaction_default"
    report = maintain(parties, today=dt.date(2027, 3, 1), months_ahead=0, retention_months=12)
    assert report.moved_rows == {"transaction_y2027m02": 1, "transaction_y2027m03": 2}
    where = dict(parties.execute("SELECT ID, tableoid::regclass::text FROM Transaction").fetchall())
    assert where == {
        30: "transaction_y2027m02",
        31: "transaction_y2027m03",
        32: "transaction_y2027m03",
        33: "transaction_default",
    }
