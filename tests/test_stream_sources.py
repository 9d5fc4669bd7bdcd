"""Rows to features: the embedded change source (a replication slot: each change returned once,
re-delivered after a crash until checkpointed), the normalizer (CDC and Debezium rows to the very
payments and labels training reads) and the live feature state (the same vectors as the batch
engine), against the session's real PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from stripe_platform.config import Settings
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.ml.contract import (
    TransactionRecord,
)
from stripe_platform.showcase.brief_examples import BRIEF_TRANSACTION_ID
from stripe_platform.streaming.changes import Poll, Rejected, RowEvent
from stripe_platform.streaming.embedded import EmbeddedSource
from stripe_platform.streaming.normalize import Normalizer

WAIT = 30.0  # seconds: a bound for changes to show up, never a delay to wait out


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def db_settings(settings: Settings, database: str) -> Settings:
    return settings.model_copy(update={"pg_database": database})


@pytest.fixture
def slots(conn: psycopg.Connection, database: str) -> Iterator[Callable[[str], str]]:
    """Slot names unique to this test's database (slots are cluster-wide), dropped afterwards:
    an abandoned slot holds WAL, and a database with a slot cannot be dropped."""
    made: list[str] = []

    def name(purpose: str) -> str:
        slot = f"{database}_{purpose}"
        made.append(slot)
        return slot

    yield name
    for slot in made:
        cdc.slot_info_when_free(conn, slot)
        cdc.drop_slot(conn, slot)


def flush(conn: psycopg.Connection) -> None:
    """A synchronous commit: the WAL of everything committed before it is flushed, so the slot
    (which decodes flushed WAL only) can see it."""
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = on")
        conn.execute("SELECT pg_current_xact_id()")


def insert_payments(conn: psycopg.Connection, n: int, *, currency: int = 1) -> list[int]:
    """``n`` payments copied from the brief's transaction, one commit each; their ids."""
    ids = []
    for _ in range(n):
        row = conn.execute(
            """INSERT INTO Transaction (TransactionStatusID, MerchantID, Amount, CurrencyID,
                   PaymentMethodID, DeviceID, CustomerID, BillingAddressID, TransactionLocationID,
                   IPAddress, DateTime)
               SELECT TransactionStatusID, MerchantID, Amount, %s, PaymentMethodID, DeviceID,
                      CustomerID, BillingAddressID, TransactionLocationID, IPAddress,
                      date_trunc('second', now())
               FROM Transaction WHERE ID = %s
               RETURNING ID""",
            (currency, BRIEF_TRANSACTION_ID),
        ).fetchone()
        ids.append(row[0])
    flush(conn)
    return ids


def drain(source: EmbeddedSource, want: int, *, max_events: int = 1000) -> list[RowEvent]:
    """Poll until ``want`` events came (and nothing more is waiting), bounded by WAIT."""
    events: list[RowEvent] = []
    deadline = time.monotonic() + WAIT
    while True:
        poll = source.poll(max_events, 0.05)
        events.extend(poll.events)
        if len(events) >= want and poll.caught_up and not poll.events:
            return events
        assert time.monotonic() < deadline, f"{len(events)} of {want} changes came"


def payment_ids(events: list[RowEvent]) -> list[int]:
    return [e.row["id"] for e in events if e.table == "transaction"]


# -- the embedded source ---------------------------------------------------------------------------
def test_poll_returns_each_change_once_until_checkpoint(
    loaded: psycopg.Connection, db_settings: Settings, slots: Callable[[str], str]
) -> None:
    source = EmbeddedSource(db_settings, slot=slots("once"), publication="fraud_stream")
    try:
        assert not source.poll(100, 0).events
        first = insert_payments(loaded, 3)
        events = drain(source, 3)
        assert payment_ids(events) == first
        assert {e.op for e in events} == {"insert"} and {e.source for e in events} == {"embedded"}
        assert all(e.commit_time.tzinfo is not None for e in events)
        assert len({e.lsn for e in events}) == 3
        # The slot was not advanced: a peek re-reads the three, which the source drops.
        assert source.poll(100, 0.02) == Poll((), (), True)
        second = insert_payments(loaded, 2)
        assert payment_ids(drain(source, 2)) == second
        # A read cut short (max_events 1, each transaction one change) returns one at a time.
        third = insert_payments(loaded, 3)
        one_by_one = []
        deadline = time.monotonic() + WAIT
        while len(one_by_one) < 3:
            poll = source.poll(1, 0.05)
            assert len(poll.events) <= 1
            one_by_one.extend(payment_ids(list(poll.events)))
            assert time.monotonic() < deadline
        assert one_by_one == third
        before = source.lag()
        assert before.slot_lag_bytes is not None and before.slot_lag_bytes > 0
        source.checkpoint()
        after = source.lag()
        assert cdc.parse_lsn(after.position) > cdc.parse_lsn(before.position)
        assert after.slot_lag_bytes < before.slot_lag_bytes
        assert not source.poll(100, 0.02).events
    finally:
        source.close()


def test_a_new_source_redelivers_what_was_not_checkpointed(
    loaded: psycopg.Connection, db_settings: Settings, slots: Callable[[str], str]
) -> None:
    slot = slots("crash")
    source = EmbeddedSource(db_settings, slot=slot, publication="fraud_stream")
    first = insert_payments(loaded, 2)
    delivered = drain(source, 2)
    source.checkpoint()  # the first two are durable
    second = insert_payments(loaded, 3)
    lost_with_the_crash = drain(source, 3)
    assert payment_ids(lost_with_the_crash) == second
    source.close()  # the process dies before its checkpoint

    again = EmbeddedSource(db_settings, slot=slot, publication="fraud_stream")
    try:
        redelivered = drain(again, 3)
        assert payment_ids(redelivered) == second  # not the checkpointed first two
        assert [(e.lsn, e.row) for e in redelivered] == [
            (e.lsn, e.row) for e in lost_with_the_crash
        ]
        assert not set(payment_ids(delivered)) & set(payment_ids(redelivered))
        assert payment_ids(delivered) == first
        again.checkpoint()
    finally:
        again.close()
    # Checkpointed: a third process has nothing to re-deliver.
    third = EmbeddedSource(db_settings, slot=slot, publication="fraud_stream")
    try:
        assert not third.poll(100, 0.05).events
    finally:
        third.close()


def test_temporary_slot_follows_and_goes_with_its_session(
    loaded: psycopg.Connection, db_settings: Settings, slots: Callable[[str], str]
) -> None:
    slot = slots("follower")
    source = EmbeddedSource(db_settings, slot=slot, publication="fraud_stream", temporary=True)
    try:
        assert cdc.slot_info(loaded, slot) is not None
        ids = insert_payments(loaded, 2)
        assert payment_ids(drain(source, 2)) == ids
        source.checkpoint()
        assert not source.poll(10, 0.02).events
    finally:
        source.close()
    deadline = time.monotonic() + WAIT
    while cdc.slot_info(loaded, slot) is not None:  # dropped by the server as the session ends
        assert time.monotonic() < deadline, "the temporary slot outlived its session"
        time.sleep(0.01)


def test_other_tables_and_truncates_are_rejected_not_fatal(
    loaded: psycopg.Connection, db_settings: Settings, slots: Callable[[str], str]
) -> None:
    source = EmbeddedSource(db_settings, slot=slots("other"), publication="fraud_stream")
    normalizer = Normalizer(db_settings)
    try:
        # Someone widens the publication: a merchant row reaches the stream.
        loaded.execute("ALTER PUBLICATION fraud_stream ADD TABLE merchant")
        loaded.execute("UPDATE Merchant SET Name = Name || ' (renamed)' WHERE ID = 3")
        loaded.execute("CREATE TABLE scratch (id int PRIMARY KEY)")
        loaded.execute("ALTER PUBLICATION fraud_stream ADD TABLE scratch")
        loaded.execute("TRUNCATE scratch")
        ids = insert_payments(loaded, 1)
        events: list[RowEvent] = []
        rejected: list[Rejected] = []
        deadline = time.monotonic() + WAIT
        while len(events) < 2 or not rejected:
            poll = source.poll(100, 0.05)
            events.extend(poll.events)
            rejected.extend(poll.rejected)
            assert time.monotonic() < deadline
        assert [r.reason for r in rejected] == ["truncate"]
        merchant, payment = events
        out = normalizer.normalize(merchant)
        assert isinstance(out, Rejected) and out.reason == "unknown_table"
        assert "merchant" in out.where and out.source == "embedded"
        record = normalizer.normalize(payment)
        assert isinstance(record, TransactionRecord) and record.transaction_id == str(ids[0])
    finally:
        normalizer.close()
        source.close()
