"""Rows to features: the embedded change source (a replication slot: each change returned once,
re-delivered after a crash until checkpointed), the normalizer (CDC and Debezium rows to the very
payments and labels training reads) and the live feature state (the same vectors as the batch
engine), against the session's real PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import numpy as np
import psycopg
import pyarrow.compute as pc
import pytest

from stripe_platform.config import Settings
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.ml.contract import (
    TransactionRecord,
    eur_rates,
    load_platform_transactions,
    records,
)
from stripe_platform.ml.drift import feature_horizon
from stripe_platform.ml.features import FEATURE_NAMES, batch_features
from stripe_platform.showcase.brief_examples import BRIEF_TRANSACTION_ID
from stripe_platform.streaming.changes import Rejected, RowEvent
from stripe_platform.streaming.embedded import EmbeddedSource
from stripe_platform.streaming.normalize import LabelEvent, Normalizer
from stripe_platform.streaming.state import LiveFeatureState

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
        again = source.poll(100, 0.02)
        assert not again.events and not again.rejected and again.caught_up
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
        deadline = time.monotonic() + WAIT
        while (after := source.lag()).position == before.position:  # the server reads it
            assert time.monotonic() < deadline, "the checkpoint never reached the slot"
            time.sleep(0.01)
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


def test_a_lost_connection_is_reopened_and_a_lost_temporary_slot_is_an_error(
    loaded: psycopg.Connection, db_settings: Settings, slots: Callable[[str], str]
) -> None:
    source = EmbeddedSource(db_settings, slot=slots("reconnect"), publication="fraud_stream")
    follower = EmbeddedSource(
        db_settings, slot=slots("lost"), publication="fraud_stream", temporary=True
    )
    try:
        first = insert_payments(loaded, 2)
        assert payment_ids(drain(source, 2)) == first
        assert payment_ids(drain(follower, 2)) == first
        for s in (source, follower):  # a server restart, as each session sees it
            loaded.execute("SELECT pg_terminate_backend(%s)", (s._repl.backend_pid,))
        second = insert_payments(loaded, 1)
        # The persistent slot's source reconnects: the new change, not the two it returned.
        assert payment_ids(drain(source, 1)) == second
        source.checkpoint()
        assert cdc.slot_info(loaded, source.slot).confirmed_flush_lsn > 0
        with pytest.raises(cdc.SlotLostError, match="temporary replication slot"):
            follower.poll(10, 0)
    finally:
        source.close()
        follower.close()


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


# -- the normalizer --------------------------------------------------------------------------------
def debezium_row(row: dict[str, Any]) -> dict[str, Any]:
    """A CDC row as Debezium's JSON carries it (decimal.handling.mode=string): numerics as
    strings, timestamptz as ISO-8601 UTC text with a Z, integers as integers."""
    out: dict[str, Any] = {}
    for column, value in row.items():
        if isinstance(value, Decimal):
            value = str(value)
        elif isinstance(value, dt.datetime):
            value = value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out[column] = value
    return out


def test_cdc_and_debezium_rows_give_the_payments_and_labels_training_reads(
    loaded: psycopg.Connection, db_settings: Settings, slots: Callable[[str], str]
) -> None:
    source = EmbeddedSource(db_settings, slot=slots("norm"), publication="fraud_stream")
    normalizer = Normalizer(db_settings)
    try:
        usd, jpy = (
            insert_payments(loaded, 1, currency=2)[0],
            insert_payments(loaded, 1, currency=4)[0],
        )
        bare = insert_payments(loaded, 1)[0]
        loaded.execute(
            "UPDATE Transaction SET DeviceID = NULL, IPAddress = NULL, BillingAddressID = NULL, "
            "TransactionLocationID = NULL, Amount = 0.07 WHERE ID = %s",
            (bare,),
        )
        when = loaded.execute("SELECT DateTime FROM Transaction WHERE ID = %s", (usd,)).fetchone()[
            0
        ]
        for reason in ("unauthorized transaction", "product not received"):
            loaded.execute(
                "INSERT INTO TransactionStateChanges (TransactionID, TransactionDateTime, "
                "FromStatusID, ToStatusID, Reason, UpdatedBy, UpdatedAt) "
                "VALUES (%s, %s, 1, 5, %s, 'card network', %s)",
                (usd if reason.startswith("unauth") else jpy, when, reason, when),
            )
        flush(loaded)
        events = drain(source, 6)
        assert [(e.table, e.op) for e in events] == [
            ("transaction", "insert"),
            ("transaction", "insert"),
            ("transaction", "insert"),
            ("transaction", "update"),
            ("transactionstatechanges", "insert"),
            ("transactionstatechanges", "insert"),
        ]
        # The same rows as Debezium writes them normalize to the same payments and labels.
        as_debezium = [
            dataclasses.replace(e, source="debezium", row=debezium_row(dict(e.row))) for e in events
        ]
        assert isinstance(as_debezium[0].row["amount"], str)
        assert isinstance(as_debezium[0].row["datetime"], str)
        got = [normalizer.normalize(e) for e in events]
        assert [normalizer.normalize(e) for e in as_debezium] == got

        payments = {r.transaction_id: r for r in got if isinstance(r, TransactionRecord)}
        labels = [r for r in got if isinstance(r, LabelEvent)]
        assert got[5] is None  # a dispute that reports no fraud
        assert labels == [LabelEvent(str(usd), when)]
        # What training reads for the same payments, field by field (the update's values win).
        table = load_platform_transactions(db_settings, require_labels=False).table
        expected = {r.transaction_id: r for r in records(table)}
        for tid in (usd, jpy, bare):
            assert payments[str(tid)] == expected[str(tid)]
        contract_labels = table.filter(pc.equal(table["label"], 1))
        assert contract_labels["transaction_id"].to_pylist() == [str(usd)]
        assert contract_labels["label_time"].to_pylist() == [when]
        # And by hand: the brief's amount in USD and JPY at the warehouse's rates (the CSV).
        rates = eur_rates()
        amount = loaded.execute("SELECT Amount FROM Transaction WHERE ID = %s", (usd,)).fetchone()[
            0
        ]
        assert payments[str(usd)].amount == float(amount) * rates["USD"]
        assert payments[str(jpy)].amount == float(amount) * rates["JPY"]
        assert payments[str(bare)] == TransactionRecord(
            str(bare),
            payments[str(bare)].timestamp,
            payments[str(usd)].customer_id,
            payments[str(usd)].merchant_id,
            0.07 * rates["EUR"],
        )
        country = loaded.execute(
            "SELECT l.CountryCode FROM Transaction t JOIN Location l "
            "ON l.ID = t.TransactionLocationID WHERE t.ID = %s",
            (usd,),
        ).fetchone()[0]
        assert payments[str(usd)].country == country
    finally:
        normalizer.close()
        source.close()


def test_bad_events_are_rejected_with_a_reason_never_raised(
    loaded: psycopg.Connection, db_settings: Settings
) -> None:
    normalizer = Normalizer(db_settings)
    good = {
        "id": 7,
        "datetime": "2026-12-07T13:00:00.123456Z",
        "customerid": 1,
        "merchantid": 3,
        "amount": "10.50",
        "currencyid": 1,
        "deviceid": None,
        "ipaddress": "203.0.113.9",
        "transactionlocationid": None,
        "billingaddressid": None,
    }
    label = {
        "transactionid": 7,
        "tostatusid": 5,
        "reason": "fraudulent: card not present",
        "updatedat": "2026-12-08T09:00:00+01:00",
    }

    def event(table: str, row: dict[str, Any], op: str = "insert") -> RowEvent:
        return RowEvent("debezium", table, op, row, 42, dt.datetime.now(dt.UTC))  # type: ignore[arg-type]

    def reason(table: str, row: dict[str, Any], op: str = "insert") -> str | None:
        out = normalizer.normalize(event(table, row, op))
        return out.reason if isinstance(out, Rejected) else None

    try:
        record = normalizer.normalize(event("transaction", good))
        assert record == TransactionRecord(
            "7",
            dt.datetime(2026, 12, 7, 13, 0, 0, 123456, tzinfo=dt.UTC),
            "1",
            "3",
            10.5,
            ip="203.0.113.9",
        )
        assert normalizer.normalize(event("transactionstatechanges", label)) == LabelEvent(
            "7", dt.datetime(2026, 12, 8, 8, 0, tzinfo=dt.UTC)
        )
        assert reason("merchant", {"id": 1}) == "unknown_table"
        assert normalizer.payment(event("transactionstatechanges", label)).reason == "unknown_table"
        assert normalizer.label(event("transaction", good)).reason == "unknown_table"
        for column in ("amount", "datetime", "deviceid", "currencyid"):
            row = {k: v for k, v in good.items() if k != column}
            assert reason("transaction", row) == "missing_column", column
        assert (
            reason("transactionstatechanges", {k: v for k, v in label.items() if k != "reason"})
            == "missing_column"
        )
        bad_values = {
            "amount": ["ten", "NaN", "Infinity", True, None, [1], "1e13"],
            "datetime": ["yesterday", 1765112400, None, "infinity"],
            "customerid": ["x", None, 1.5, False],
            "id": ["", None],
            "currencyid": [99, "EUR"],
            "ipaddress": [3232235777],
            "deviceid": ["phone"],
        }
        for column, values in bad_values.items():
            for value in values:
                assert reason("transaction", {**good, column: value}) == "bad_value", (
                    column,
                    value,
                )
        assert reason("transactionstatechanges", {**label, "updatedat": "soon"}) == "bad_value"
        assert reason("transactionstatechanges", {**label, "tostatusid": "five"}) == "bad_value"
        # Not fraud reports: nothing to do.
        assert (
            normalizer.normalize(event("transactionstatechanges", {**label, "tostatusid": 6}))
            is None
        )
        assert (
            normalizer.normalize(event("transactionstatechanges", {**label, "reason": None}))
            is None
        )
        assert reason("transaction", {"id": 7, "datetime": good["datetime"]}, "delete") == "deleted"
        out = normalizer.normalize(event("transaction", {**good, "amount": "ten"}))
        assert isinstance(out, Rejected)
        assert (
            out.source == "debezium" and out.where == "transaction@0/2A" and "amount" in out.detail
        )

        # Reference data written after the normalizer read it: found on the cache miss.
        place = loaded.execute(
            "INSERT INTO Location (City, Country, CountryCode) VALUES ('Reykjavik', 'Iceland', "
            "'IS') RETURNING ID"
        ).fetchone()[0]
        address = loaded.execute(
            "INSERT INTO Address (CustomerID, Line1, LocationID) SELECT CustomerID, '\\x00', %s "
            "FROM Transaction WHERE ID = %s RETURNING ID",
            (place, BRIEF_TRANSACTION_ID),
        ).fetchone()[0]
        moved = {**good, "transactionlocationid": place, "billingaddressid": address}
        found = normalizer.normalize(event("transaction", moved))
        assert (found.country, found.billing_country) == ("IS", "IS")
        # A lost connection (a server restart) is opened again for the next miss.
        loaded.execute("SELECT pg_terminate_backend(%s)", (normalizer._conn.info.backend_pid,))
        other = loaded.execute(
            "INSERT INTO Location (City, Country, CountryCode) VALUES ('Oslo', 'Norway', 'NO') "
            "RETURNING ID"
        ).fetchone()[0]
        found = normalizer.normalize(
            event("transaction", {**moved, "transactionlocationid": other})
        )
        assert (found.country, found.billing_country) == ("NO", "IS")
    finally:
        normalizer.close()


# -- a seeded platform: the stream means what training reads -----------------------------------------
def seed_spec():
    from stripe_platform.seed.spec import make_spec

    return make_spec(scale=0.01, seed=5, end=dt.date(2026, 1, 1), max_documents=300)


def drain_all(source: EmbeddedSource, want: int, *, max_events: int = 5000) -> list[RowEvent]:
    """The ``want`` changes committed (and flushed) so far, checkpointing as a consumer does;
    nothing more may come."""
    events: list[RowEvent] = []
    deadline = time.monotonic() + 5 * WAIT
    while True:
        poll = source.poll(max_events, 0.05)
        assert not poll.rejected
        events.extend(poll.events)
        source.checkpoint()
        if len(events) >= want and poll.caught_up and not poll.events:
            assert len(events) == want
            return events
        assert time.monotonic() < deadline, f"{len(events)} of {want} changes, {source.lag()}"


def test_the_change_stream_of_a_seed_gives_the_contracts_payments_and_labels(
    conn: psycopg.Connection,
    db_settings: Settings,
    docdb: Any,
    slots: Callable[[str], str],
) -> None:
    from stripe_platform.seed import load as seed_load
    from stripe_platform.seed.dataset import build

    s = db_settings.model_copy(update={"mongodb_database": docdb.name})
    source = EmbeddedSource(s, slot=slots("seed"), publication="fraud_stream")
    normalizer = Normalizer(s)
    try:
        data = build(seed_spec())
        seed_load.seed(s, data, docdb)  # COPY batches, under the root's partitions
        flush(conn)
        payments: dict[str, TransactionRecord] = {}
        labels: dict[str, dt.datetime] = {}
        for event in drain_all(source, data.transactions.num_rows + data.state_changes.num_rows):
            out = normalizer.normalize(event)
            assert not isinstance(out, Rejected), out
            if isinstance(out, TransactionRecord):
                payments[out.transaction_id] = out  # an update's values win, as in the table
            elif isinstance(out, LabelEvent):
                first = labels.get(out.transaction_id, out.known_at)
                labels[out.transaction_id] = min(first, out.known_at)
        table = load_platform_transactions(s, require_labels=False).table
        expected = list(records(table))
        assert len(expected) == data.transactions.num_rows == len(payments)
        mismatched = [r for r in expected if payments[r.transaction_id] != r]
        assert mismatched == []
        currencies = set(data.transactions["currencyid"].to_pylist())
        assert len(currencies) > 1  # amounts converted from several currencies
        fraud = table.filter(pc.equal(table["label"], 1))
        assert fraud.num_rows > 0
        assert labels == dict(
            zip(fraud["transaction_id"].to_pylist(), fraud["label_time"].to_pylist(), strict=True)
        )
    finally:
        normalizer.close()
        source.close()


# A week in which a fraud report becomes known (payment 7579's, 2025-08-30) for a merchant
# that keeps taking payments: the label reaches the features through the stream.
PERIOD = (dt.datetime(2025, 8, 27, tzinfo=dt.UTC), dt.datetime(2025, 9, 3, tzinfo=dt.UTC))


def test_live_features_of_the_stream_equal_the_batch_features(
    conn: psycopg.Connection,
    db_settings: Settings,
    docdb: Any,
    slots: Callable[[str], str],
) -> None:
    """A seeded history, then a week of it committed again in time order (each payment at its
    time, each state change when it happened) through the change stream, as in production: the
    live state warmed on the history gives every payment of the week the batch engine's vector."""
    from stripe_platform.seed import load as seed_load
    from stripe_platform.seed.dataset import build

    s = db_settings.model_copy(update={"mongodb_database": docdb.name})
    seed_load.seed(s, build(seed_spec()), docdb)
    start, end = PERIOD
    # Take the week out (audit rows too: triggers off, as the seed loads), keep it aside.
    conn.execute("SET session_replication_role = replica")
    conn.execute(
        "CREATE TEMP TABLE week_tx AS SELECT * FROM Transaction "
        "WHERE DateTime >= %s AND DateTime < %s",
        PERIOD,
    )
    conn.execute(
        "CREATE TEMP TABLE week_sc AS SELECT * FROM TransactionStateChanges "
        "WHERE UpdatedAt >= %s AND UpdatedAt < %s",
        PERIOD,
    )
    conn.execute("DELETE FROM TransactionStateChanges WHERE ID IN (SELECT ID FROM week_sc)")
    conn.execute(
        "DELETE FROM Transaction WHERE (ID, DateTime) IN (SELECT ID, DateTime FROM week_tx)"
    )
    happenings = conn.execute(
        "SELECT DateTime, 0, ID FROM week_tx UNION ALL SELECT UpdatedAt, 1, ID FROM week_sc "
        "ORDER BY 1, 2, 3"
    ).fetchall()
    paid = sum(1 for _, kind, _ in happenings if kind == 0)
    assert paid > 50 and len(happenings) > paid

    source = EmbeddedSource(s, slot=slots("parity"), publication="fraud_stream")
    normalizer = Normalizer(s)
    try:
        state = LiveFeatureState.warm(s, now=start)  # the history before the week
        assert state.warmed > 1000
        for _, kind, key in happenings:  # the week happens, one commit each
            if kind == 0:
                conn.execute("INSERT INTO Transaction SELECT * FROM week_tx WHERE ID = %s", (key,))
            else:
                conn.execute(
                    "INSERT INTO TransactionStateChanges OVERRIDING SYSTEM VALUE "
                    "SELECT * FROM week_sc WHERE ID = %s",
                    (key,),
                )
        flush(conn)
        items = []
        for event in drain_all(source, len(happenings), max_events=50):
            out = normalizer.normalize(event)
            assert not isinstance(out, Rejected), out
            if out is not None:
                items.append(out)
        payments = [i for i in items if isinstance(i, TransactionRecord)]
        assert len(payments) == paid
        labels_before = state.labels
        vectors = state.apply(items)
        assert state.labels > labels_before  # a fraud report became known during the week

        history = load_platform_transactions(
            s, start=start - feature_horizon(), end=end, require_labels=False
        ).table
        expected = batch_features(history)
        inside = pc.greater_equal(history["timestamp"], start).to_numpy(zero_copy_only=False)
        row_of = {tid: i for i, tid in enumerate(history["transaction_id"].to_pylist())}
        want = expected.to_numpy()[[row_of[p.transaction_id] for p in payments]]
        assert inside.sum() == len(payments)
        assert vectors.shape == (len(payments), len(FEATURE_NAMES))
        # 0 mismatches, NaN equal to NaN (a mean over no payment, a device-less payment).
        same = (vectors == want) | (np.isnan(vectors) & np.isnan(want))
        mismatches = [
            (payments[r].transaction_id, FEATURE_NAMES[c], vectors[r, c], want[r, c])
            for r, c in zip(*np.nonzero(~same), strict=True)
        ]
        assert mismatches == []
        risk = [FEATURE_NAMES.index(n) for n in FEATURE_NAMES if n.startswith("merchant_fraud")]
        assert np.nanmax(vectors[:, risk]) > 0  # the frauds count, known ones only

        # Re-delivered (a restart before the checkpoint): scored the same, not ingested twice.
        # (The same within the state's allowed lateness of the newest payment, an hour: what is
        # older has left the windows' memory.)
        held = state.retained()
        newest = payments[-1].timestamp
        recent = [p for p in payments if p.timestamp >= newest - dt.timedelta(hours=1)]
        assert len(recent) >= 2
        again = state.apply(recent)
        assert np.array_equal(again, vectors[-len(recent) :], equal_nan=True)
        assert state.retained() == held
        assert all(state.seen(p.transaction_id) for p in payments)
    finally:
        normalizer.close()
        source.close()


# -- the live state ------------------------------------------------------------------------------
def test_a_label_before_its_payment_waits_and_a_payment_counts_once() -> None:
    """Kafka may deliver the fraud report before its payment (other topic); a restart delivers
    a payment again. Neither changes what the payments after them see."""
    t0 = dt.datetime(2026, 3, 2, 12, tzinfo=dt.UTC)

    def pay(tid: str, days: float) -> TransactionRecord:
        return TransactionRecord(tid, t0 + dt.timedelta(days=days), "c1", "m1", 20.0)

    fraud, report = pay("1", 0), LabelEvent("1", t0 + dt.timedelta(days=1))
    later = [pay("2", 8), pay("3", 9)]
    rate = FEATURE_NAMES.index("merchant_fraud_rate_7d_delay_7d")
    count = FEATURE_NAMES.index("customer_count_30d")

    in_order = LiveFeatureState().apply([fraud, report, *later])
    state = LiveFeatureState()
    shuffled = state.apply([report, fraud, fraud, *later])  # report first, payment twice
    assert state.retained()["waiting_labels"] == 0 and state.labels == 1
    assert np.array_equal(shuffled[[0, 2, 3]], in_order, equal_nan=True)
    assert np.array_equal(shuffled[1], shuffled[0], equal_nan=True)  # scored, not ingested again
    # By the definition: 1 fraud (known on day 1) among the merchant's 1 payment of
    # [t - 14d, t - 7d); the customer's earlier payments: 1, then 2.
    assert in_order[1, rate] == 1.0 and in_order[2, rate] == 1.0
    assert in_order[1, count] == 1 and in_order[2, count] == 2
    assert state.seen("1") and not state.seen("4")


def test_a_closed_source_stays_closed(
    loaded: psycopg.Connection, db_settings: Settings, slots: Callable[[str], str]
) -> None:
    """A poll after close (a thread still reading while another closes it) must not open a new
    stream: nobody would close it, and it would hold the slot."""
    slot = slots("closed")
    source = EmbeddedSource(db_settings, slot=slot, publication="fraud_stream")
    insert_payments(loaded, 1)
    drain(source, 1)
    source.close()
    with pytest.raises(cdc.CDCError, match="closed"):
        source.poll(10, 0)
    with pytest.raises(cdc.CDCError, match="closed"):
        source.lag()
    assert cdc.slot_info_when_free(loaded, slot).active_pid is None


def test_an_idle_stream_releases_the_wal_others_write(
    loaded: psycopg.Connection, db_settings: Settings, slots: Callable[[str], str]
) -> None:
    """No payment for a while, much WAL from tables the stream does not follow: checkpoints
    move the slot past it (the server's keepalives say how far it read), so it is not held."""
    source = EmbeddedSource(db_settings, slot=slots("idle"), publication="fraud_stream")
    try:
        assert not source.poll(10, 0.05).events
        source.checkpoint()
        loaded.execute("CREATE TABLE scratch (id int PRIMARY KEY, pad text)")
        loaded.execute(
            "INSERT INTO scratch SELECT i, repeat('x', 200) FROM generate_series(1, 20000) i"
        )
        flush(loaded)
        written = cdc.parse_lsn(loaded.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
        deadline = time.monotonic() + WAIT
        while cdc.parse_lsn(source.lag().position) < written:
            poll = source.poll(10, 0.05)
            assert not poll.events and not poll.rejected
            source.checkpoint()
            assert time.monotonic() < deadline, f"the slot stayed at {source.lag()}"
        assert source.lag().slot_lag_bytes < 1_000_000  # the ~5 MB written are not held
    finally:
        source.close()
