"""The Kafka change source: Debezium 3.6 envelopes to RowEvents (pure: no broker), then against a
real broker (consumer group, checkpointed offsets, dead-letter topic), then the whole path: payments
inserted in PostgreSQL, captured by Debezium on Kafka Connect, scored by the stream scorer."""

from __future__ import annotations

import collections
import copy
import datetime as dt
import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    Consumer,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql

from conftest import TEMPLATE_DB
from kafka_stack import KafkaTestStack
from ml_platform import ml_settings, train_champion
from stripe_platform.config import Settings, load_settings
from stripe_platform.docstore import client as docstore
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.oltp import db
from stripe_platform.runtime.kafka import client_config
from stripe_platform.runtime.postgres import RuntimeErrorWithHint
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec
from stripe_platform.streaming import debezium, scorer
from stripe_platform.streaming.changes import TABLES, Rejected, RowEvent
from stripe_platform.streaming.embedded import DEFAULT_PUBLICATION
from stripe_platform.streaming.kafka import (
    DLQ_HEADERS,
    KafkaSource,
    KafkaSourceError,
    decode,
    merge,
)
from test_stream import (  # the embedded stream's checks, for the same scorer on Kafka
    WITNESS,
    Stream,
    add_payments,
    assert_documents_carry_the_newest_score,
    score_events,
    wait_for,
    witnessed,
)

# Debezium 3.6.1's PostgreSQL connector as the test stack runs it (streaming.debezium: JsonConverter
# with schemas.enable=false, decimal.handling.mode=string, time.precision.mode=isostring), shaped
# as captured from its topics; values changed. A payment committed at 2026-01-01T10:00:00.123456Z
# (1767261600 s since the epoch).
SOURCE: dict[str, Any] = {
    "version": "3.6.1.Final",
    "connector": "postgresql",
    "name": "stripe",
    "ts_ms": 1767261600123,
    "snapshot": "false",
    "db": "stripe",
    "sequence": '[null,"24023128"]',
    "ts_us": 1767261600123456,
    "ts_ns": 1767261600123456000,
    "schema": "public",
    "table": "transaction",
    "txId": 555,
    "lsn": 24023128,
    "xmin": None,
    "origin": None,
    "origin_lsn": None,
}
PAYMENT: dict[str, Any] = {
    "id": 7001,
    "transactionstatusid": 1,
    "merchantid": 42,
    "amount": "149.90",
    "currencyid": 3,
    "paymentmethodid": 1,
    "paymentinstrumentid": 88,
    "deviceid": 501,
    "customerid": 12,
    "billingaddressid": 77,
    "transactionlocationid": 9,
    "ipaddress": "203.0.113.7",
    "datetime": "2026-01-01T09:59:59.500000Z",
    "createdat": "2026-01-01T10:00:00.120001Z",
    "updatedat": "2026-01-01T10:00:00.120001Z",
}
INSERT: dict[str, Any] = {
    "before": None,
    "after": PAYMENT,
    "source": SOURCE,
    "transaction": None,
    "op": "c",
    "ts_ms": 1767261600301,
    "ts_us": 1767261600301422,
    "ts_ns": 1767261600301422000,
}
COMMITTED = dt.datetime(2026, 1, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)

# The same insert as JsonConverter writes it with schemas.enable=true.
_ROW_FIELDS = [
    {"type": "int64", "optional": False, "field": "id"},
    {"type": "int16", "optional": False, "field": "transactionstatusid"},
    {"type": "int64", "optional": False, "field": "merchantid"},
    {"type": "string", "optional": False, "field": "amount"},  # decimal.handling.mode=string
    {"type": "int16", "optional": False, "field": "currencyid"},
    {"type": "int16", "optional": False, "field": "paymentmethodid"},
    {"type": "int64", "optional": True, "field": "paymentinstrumentid"},
    {"type": "int64", "optional": True, "field": "deviceid"},
    {"type": "int64", "optional": False, "field": "customerid"},
    {"type": "int64", "optional": True, "field": "billingaddressid"},
    {"type": "int32", "optional": True, "field": "transactionlocationid"},
    {"type": "string", "optional": True, "field": "ipaddress"},
    *(
        {
            "type": "string",
            "optional": False,
            "name": "io.debezium.time.ZonedTimestamp",
            "version": 1,
            "field": name,
        }
        for name in ("datetime", "createdat", "updatedat")
    ),
]
_SOURCE_FIELDS = [
    {"type": "string", "optional": False, "field": "version"},
    {"type": "string", "optional": False, "field": "connector"},
    {"type": "string", "optional": False, "field": "name"},
    {"type": "int64", "optional": False, "field": "ts_ms"},
    {
        "type": "string",
        "optional": True,
        "name": "io.debezium.data.Enum",
        "version": 1,
        "parameters": {
            "allowed": "true,first,first_in_data_collection,last_in_data_collection,"
            "last,false,incremental"
        },
        "default": "false",
        "field": "snapshot",
    },
    {"type": "string", "optional": False, "field": "db"},
    {"type": "string", "optional": True, "field": "sequence"},
    {"type": "int64", "optional": True, "field": "ts_us"},
    {"type": "int64", "optional": True, "field": "ts_ns"},
    {"type": "string", "optional": False, "field": "schema"},
    {"type": "string", "optional": False, "field": "table"},
    {"type": "int64", "optional": True, "field": "txId"},
    {"type": "int64", "optional": True, "field": "lsn"},
    {"type": "int64", "optional": True, "field": "xmin"},
    {"type": "string", "optional": True, "field": "origin"},
    {"type": "int64", "optional": True, "field": "origin_lsn"},
]
ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "struct",
    "fields": [
        {
            "type": "struct",
            "fields": _ROW_FIELDS,
            "optional": True,
            "name": "stripe.public.transaction.Value",
            "field": "before",
        },
        {
            "type": "struct",
            "fields": _ROW_FIELDS,
            "optional": True,
            "name": "stripe.public.transaction.Value",
            "field": "after",
        },
        {
            "type": "struct",
            "fields": _SOURCE_FIELDS,
            "optional": False,
            "name": "io.debezium.connector.postgresql.Source",
            "version": 1,
            "field": "source",
        },
        {
            "type": "struct",
            "fields": [
                {"type": "string", "optional": False, "field": "id"},
                {"type": "int64", "optional": False, "field": "total_order"},
                {"type": "int64", "optional": False, "field": "data_collection_order"},
            ],
            "optional": True,
            "name": "event.block",
            "version": 1,
            "field": "transaction",
        },
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
        {"type": "int64", "optional": True, "field": "ts_us"},
        {"type": "int64", "optional": True, "field": "ts_ns"},
    ],
    "optional": False,
    "name": "stripe.public.transaction.Envelope",
    "version": 2,
}
HEARTBEAT_SCHEMA: dict[str, Any] = {
    "type": "struct",
    "fields": [{"type": "int64", "optional": False, "field": "ts_ms"}],
    "optional": False,
    "name": "io.debezium.connector.common.Heartbeat",
    "version": 1,
}

WHERE = "stripe.public.transaction[3]@17"


def raw(doc: object) -> bytes:
    return json.dumps(doc).encode()


def envelope(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(INSERT)
    source = changes.pop("source", {})
    doc.update(changes)
    doc["source"].update(source)
    return doc


# Decoding: pure, no broker ---------------------------------------------------------------------


def test_insert_without_schemas_is_a_row_event() -> None:
    assert decode(raw(INSERT), where=WHERE) == RowEvent(
        source="debezium",
        table="transaction",
        op="insert",
        row=PAYMENT,
        lsn=24023128,
        commit_time=COMMITTED,
    )


def test_insert_with_schemas_is_the_same_row_event() -> None:
    with_schema = {"schema": ENVELOPE_SCHEMA, "payload": INSERT}
    assert decode(raw(with_schema), where=WHERE) == decode(raw(INSERT), where=WHERE)
    assert decode(raw(with_schema), where=WHERE).row["amount"] == "149.90"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("op", "before", "after", "expected_op", "expected_row"),
    [
        (
            "u",
            None,
            {**PAYMENT, "transactionstatusid": 2},
            "update",
            {**PAYMENT, "transactionstatusid": 2},
        ),
        # REPLICA IDENTITY DEFAULT: a delete's before holds the key, the other columns null.
        (
            "d",
            {**dict.fromkeys(PAYMENT), "id": 7001, "datetime": "2026-01-01T09:59:59.500000Z"},
            None,
            "delete",
            {**dict.fromkeys(PAYMENT), "id": 7001, "datetime": "2026-01-01T09:59:59.500000Z"},
        ),
        ("r", None, PAYMENT, "snapshot", PAYMENT),
    ],
)
def test_each_operation_maps_to_its_row(
    op: str, before: Any, after: Any, expected_op: str, expected_row: dict[str, Any]
) -> None:
    event = decode(raw(envelope(op=op, before=before, after=after)), where=WHERE)
    assert isinstance(event, RowEvent)
    assert (event.op, event.row, event.table, event.lsn) == (
        expected_op,
        expected_row,
        "transaction",
        24023128,
    )


def test_state_change_of_a_snapshot_keeps_the_table_and_lsn() -> None:
    change = {
        "id": 9,
        "transactionid": 7001,
        "transactiondatetime": "2026-01-01T09:59:59.500000Z",
        "fromstatusid": 1,
        "tostatusid": 5,
        "reason": "fraudulent",
        "updatedby": "dispute-desk",
        "updatedat": "2026-01-03T08:00:00Z",
    }
    event = decode(
        raw(
            envelope(
                op="r",
                after=change,
                source={
                    "table": "transactionstatechanges",
                    "snapshot": "last",
                    "lsn": 33554432,
                    "ts_us": None,
                    "ts_ms": 1767427200000,
                },
            )
        ),
        where=WHERE,
    )
    assert event == RowEvent(
        source="debezium",
        table="transactionstatechanges",
        op="snapshot",
        row=change,
        lsn=33554432,
        commit_time=dt.datetime(2026, 1, 3, 8, 0, tzinfo=dt.UTC),  # ts_ms when no ts_us
    )


def test_upper_case_columns_and_table_are_lower_cased() -> None:
    event = decode(
        raw(envelope(after={"ID": 1, "CustomerID": 2}, source={"table": "Transaction"})),
        where=WHERE,
    )
    assert isinstance(event, RowEvent)
    assert (event.table, dict(event.row)) == ("transaction", {"id": 1, "customerid": 2})


@pytest.mark.parametrize(
    "value",
    [
        None,  # the tombstone after a delete
        raw({"schema": None, "payload": None}),  # a tombstone through a converter with schemas
        raw({"ts_ms": 1767261600123}),  # a heartbeat, schemas disabled
        raw({"schema": HEARTBEAT_SCHEMA, "payload": {"ts_ms": 1767261600123}}),
        raw(envelope(op="t", after=None)),  # a truncate: no row
    ],
    ids=["tombstone", "tombstone-with-schema", "heartbeat", "heartbeat-with-schema", "truncate"],
)
def test_messages_without_a_row_are_skipped(value: bytes | None) -> None:
    assert decode(value, where=WHERE) is None


_no_source = envelope()
del _no_source["source"]


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"", "not JSON"),
        (raw([1, 2]), "not a JSON object"),
        (raw({"schema": ENVELOPE_SCHEMA, "payload": [INSERT]}), "payload is not a JSON object"),
        (raw({"before": None, "after": PAYMENT}), "no 'op'"),
        (raw(envelope(op="x")), "unknown op 'x'"),
        (raw(envelope(op=["c"])), "unknown op ['c']"),
        (raw(envelope(after=None)), "without a row in 'after'"),
        (raw(envelope(op="d", before=None, after=None)), "without a row in 'before'"),
        (raw(envelope(after=[1, 2])), "without a row in 'after'"),
        (raw(_no_source), "no 'source' block"),
        (raw(envelope(source={"table": None})), "source.table missing"),
        (raw(envelope(source={"lsn": "24023128"})), "source.lsn is not a WAL position"),
        (raw(envelope(source={"lsn": -1})), "source.lsn is not a WAL position"),
        (raw(envelope(source={"lsn": True})), "source.lsn is not a WAL position"),
        (raw(envelope(source={"ts_us": None, "ts_ms": "yesterday"})), "source.ts_ms is not a time"),
        (raw(envelope(source={"ts_us": 10**30})), "source timestamp out of range"),
    ],
)
def test_malformed_messages_are_rejected_as_undecodable(value: bytes, detail: str) -> None:
    rejected = decode(value, where=WHERE)
    assert isinstance(rejected, Rejected)
    assert (rejected.source, rejected.where, rejected.reason) == ("debezium", WHERE, "undecodable")
    assert detail in rejected.detail


def at(seconds: int, lsn: int) -> RowEvent:
    """A payment committed ``seconds`` after COMMITTED."""
    return RowEvent(
        "debezium", "transaction", "insert", {}, lsn, COMMITTED + dt.timedelta(seconds=seconds)
    )


def test_merge_hands_out_several_partitions_in_commit_order() -> None:
    held = {
        "p0": collections.deque([(0, at(1, 10)), (1, at(3, 30)), (2, at(3, 31))]),
        "p1": collections.deque([(5, at(2, 20)), (6, at(3, 29)), (7, at(4, 40))]),
    }
    taken = merge(held, waiting={"p0", "p1"}, max_items=100)
    # p0 has nothing left and is not read to its end: p1's change at 4 s waits for it.
    assert [(k, o) for k, o, _ in taken] == [("p0", 0), ("p1", 5), ("p1", 6), ("p0", 1), ("p0", 2)]
    assert [o for o, _ in held["p1"]] == [7]
    assert merge(held, waiting={"p0", "p1"}, max_items=100) == []
    # Read to its end, p0 cannot bring anything earlier any more.
    assert [(k, o) for k, o, _ in merge(held, waiting={"p1"}, max_items=100)] == [("p1", 7)]


def test_merge_lets_untimed_messages_go_and_stops_at_max_items() -> None:
    poison = Rejected("debezium", "t[1]@4", "undecodable", "not JSON")
    held = {
        "p0": collections.deque([(3, at(5, 50))]),
        "p1": collections.deque([(4, poison), (5, None), (6, at(1, 10)), (7, at(2, 20))]),
        "p2": collections.deque(),
    }
    # p2 (empty, behind) holds back every change, not the poison or the tombstone.
    assert [(k, o) for k, o, _ in merge(held, waiting={"p2"}, max_items=100)] == [
        ("p1", 4),
        ("p1", 5),
    ]
    assert [(k, o) for k, o, _ in merge(held, waiting=set(), max_items=2)] == [
        ("p1", 6),
        ("p1", 7),
    ]
    assert [(k, o) for k, o, _ in merge(held, waiting=set(), max_items=2)] == [("p0", 3)]


def test_no_brokers_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STRIPE_PLATFORM_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    s = load_settings(home=tmp_path, profile="embedded")
    with pytest.raises(RuntimeErrorWithHint, match="STRIPE_PLATFORM_KAFKA_BOOTSTRAP_SERVERS"):
        KafkaSource(s)  # no setting, and no broker started by `stripe-platform kafka up`


# Against a real broker ---------------------------------------------------------------------------

WAIT = 120.0  # longest wait for an observed event (a bound on failure, never a pace)
_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}x{next(_names)}"


# ``servers``: a client's bootstrap.servers and TLS settings (runtime.kafka.client_config): the
# broker speaks TLS only.
def create_topics(servers: dict[str, str], partitions: dict[str, int]) -> None:
    admin = AdminClient(servers)
    new = [
        NewTopic(topic, num_partitions=n, replication_factor=1) for topic, n in partitions.items()
    ]
    for future in admin.create_topics(new).values():
        future.result(timeout=60)


def produce(
    servers: dict[str, str], messages: list[tuple[str, int, bytes | None, bytes | None]]
) -> list[int]:
    """(topic, partition, key, value) in order; returns their offsets."""
    producer = Producer({**servers, "enable.idempotence": True})
    offsets: list[int] = []
    for topic, partition, key, value in messages:
        producer.produce(
            topic,
            key=key,
            value=value,
            partition=partition,
            headers=[("origin", b"test")],
            on_delivery=lambda err, msg: offsets.append(-1 if err else msg.offset()),
        )
        producer.flush(60)
    assert len(offsets) == len(messages) and min(offsets) >= 0
    return offsets


def read_topic(servers: dict[str, str], topic: str) -> list[Any]:
    """Every message of ``topic``, from the start, without a group."""
    consumer = Consumer({**servers, "group.id": unique("reader"), "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        assert meta.error is None, meta.error
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in parts}
        consumer.assign(parts)
        messages: list[Any] = []
        deadline = time.monotonic() + WAIT
        while len(messages) < sum(ends.values()):
            assert time.monotonic() < deadline, f"{topic}: {len(messages)} of {sum(ends.values())}"
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                messages.append(msg)
        return messages
    finally:
        consumer.close()


def drain(source: KafkaSource, max_events: int = 100) -> tuple[list[RowEvent], list[Rejected]]:
    """Poll until the source says it is caught up and has nothing more."""
    events: list[RowEvent] = []
    rejected: list[Rejected] = []
    deadline = time.monotonic() + WAIT
    while True:
        poll = source.poll(max_events, 0.5)
        events += poll.events
        rejected += poll.rejected
        if poll.caught_up and not poll.events and not poll.rejected:
            return events, rejected
        assert time.monotonic() < deadline, "the Kafka source never caught up"


def test_poison_goes_to_the_dead_letter_topic_and_offsets_move_only_at_checkpoint(
    kafka_stack: KafkaTestStack,
) -> None:
    servers = client_config(kafka_stack.settings)
    s = kafka_stack.settings.model_copy(update={"kafka_topic_prefix": unique("poison")})
    payments, labels = (
        debezium.topics(s)["transaction"],
        debezium.topics(s)["transactionstatechanges"],
    )
    create_topics(servers, {payments: 2, labels: 1})
    update = envelope(
        op="u",
        after={**PAYMENT, "transactionstatusid": 2},
        source={"lsn": 24023200, "ts_us": 1767261601000000},
    )
    label = envelope(
        after={"id": 9, "transactionid": 7001},
        source={"table": "transactionstatechanges", "lsn": 24023300},
    )
    key = b'{"customerid":12}'
    offsets = produce(
        servers,
        [
            (payments, 0, key, raw(INSERT)),
            (payments, 0, key, None),  # a tombstone
            (payments, 0, key, b"{not json"),  # the poison
            (payments, 1, key, raw(update)),
            (labels, 0, b'{"id":9}', raw(label)),
            (labels, 0, None, raw({"ts_ms": 1767261600123})),  # heartbeat-shaped: no row
        ],
    )
    assert offsets == [0, 1, 2, 0, 0, 1]
    expected = [decode(raw(doc), where="") for doc in (INSERT, update, label)]
    group = unique("group")

    first = KafkaSource(s, group=group)
    try:
        events, rejected = drain(first)
        assert sorted(events, key=lambda e: e.lsn) == expected
        assert [(r.where, r.reason) for r in rejected] == [(f"{payments}[0]@2", "undecodable")]
        assert "not JSON" in rejected[0].detail
        lag = first.lag()  # nothing committed: all six messages are still ahead of the group
        assert lag.consumer_lag_messages == 6
        assert lag.position == f"{payments}[0]@0,{payments}[1]@0,{labels}[0]@0"
    finally:
        first.close()  # without a checkpoint

    (dead,) = read_topic(servers, f"{s.kafka_topic_prefix}.dlq")
    assert (dead.key(), dead.value()) == (key, b"{not json")
    headers = dict(dead.headers())
    assert headers["origin"] == b"test"  # the original headers are kept
    assert {k: headers[k] for k in DLQ_HEADERS[:5]} == {
        "dlq.original.topic": payments.encode(),
        "dlq.original.partition": b"0",
        "dlq.original.offset": b"2",
        "dlq.consumer.group": group.encode(),
        "dlq.error.reason": b"undecodable",
    }
    assert b"not JSON" in headers["dlq.error.detail"]

    second = KafkaSource(s, group=group)  # the group never checkpointed: everything again
    try:
        events, rejected = drain(second)
        assert sorted(events, key=lambda e: e.lsn) == expected
        assert [r.where for r in rejected] == [f"{payments}[0]@2"]
        second.checkpoint()
        lag = second.lag()
        assert lag.consumer_lag_messages == 0
        assert lag.position == f"{payments}[0]@3,{payments}[1]@1,{labels}[0]@2"
    finally:
        second.close()
    # The re-delivered poison was dead-lettered again: at least once, like every delivery here.
    assert len(read_topic(servers, f"{s.kafka_topic_prefix}.dlq")) == 2

    third = KafkaSource(s, group=group)  # checkpointed: only what comes after
    try:
        assert drain(third) == ([], [])
        produce(servers, [(labels, 0, None, raw(envelope(source={"lsn": 24023400})))])
        events, rejected = drain(third)
        assert [e.lsn for e in events] == [24023400] and rejected == []
    finally:
        third.close()


def test_a_dead_letter_topic_it_cannot_write_stops_the_source_and_commits_nothing(
    kafka_stack: KafkaTestStack,
) -> None:
    servers = client_config(kafka_stack.settings)
    s = kafka_stack.settings.model_copy(update={"kafka_topic_prefix": unique("nodlq")})
    payments = debezium.topics(s)["transaction"]
    # Kafka refuses a topic whose name differs from an existing one only by '.' versus '_'.
    create_topics(servers, {payments: 1, f"{s.kafka_topic_prefix}_dlq": 1})
    produce(servers, [(payments, 0, None, raw(INSERT)), (payments, 0, None, b"{not json")])
    group = unique("group")
    source = KafkaSource(s, group=group, topics=[payments])
    try:
        with pytest.raises(
            KafkaSourceError, match=rf"dead-letter topic {s.kafka_topic_prefix}\.dlq"
        ):
            drain(source)
        with pytest.raises(KafkaSourceError, match="restart the stream"):
            source.checkpoint()  # the scorer's next step: it moves nothing
        with pytest.raises(KafkaSourceError, match="restart the stream"):
            source.poll(10, 0.1)
    finally:
        source.close()
    reader = Consumer({**servers, "group.id": group})
    try:
        (tp,) = reader.committed([TopicPartition(payments, 0)], timeout=30)
        assert tp.offset == OFFSET_INVALID  # a restart reads the payment and the poison again
    finally:
        reader.close()


def test_a_rebalance_hands_unchecked_events_to_the_new_owner(kafka_stack: KafkaTestStack) -> None:
    servers = client_config(kafka_stack.settings)
    s = kafka_stack.settings
    topic = unique("rebalance")
    create_topics(servers, {topic: 2})
    produce(servers, [(topic, p, None, raw(envelope(source={"lsn": 1000 + p}))) for p in (0, 1)])
    group = unique("group")
    a = KafkaSource(s, group=group, topics=[topic])
    b = None
    try:
        events, _ = drain(a)
        assert sorted(e.lsn for e in events) == [1000, 1001]  # both partitions, not checkpointed
        b = KafkaSource(s, group=group, topics=[topic])
        deadline = time.monotonic() + WAIT
        taken: list[RowEvent] = []
        # Both members poll until the cooperative rebalance gives each one partition.
        while not (a.lag().extra["partitions"] == 1 and b.lag().extra["partitions"] == 1):
            assert time.monotonic() < deadline, "no rebalance"
            assert a.poll(10, 0.2).events == []
            taken += b.poll(10, 0.2).events
        a.checkpoint()  # the revoked partition's offset is not committed by its old owner
        more, _ = drain(b)
        moved = [e.lsn for e in taken + more]
        assert len(moved) == 1 and moved[0] in (1000, 1001)  # re-delivered to b
        b.checkpoint()
        kept = 1 - (moved[0] - 1000)
        assert a.lag().position == f"{topic}[{kept}]@1"
        assert b.lag().position == f"{topic}[{1 - kept}]@1"
    finally:
        a.close()
        if b is not None:
            b.close()


# The whole path: PostgreSQL -> Debezium -> Kafka -> the stream scorer ---------------------------


@dataclass
class Captured:
    """A seeded platform with a champion, followed by Debezium from after its seed."""

    stream: Stream  # the embedded stream tests' view of a platform: their helpers take it
    group: str
    produced: int = 0  # messages the tests put on the payments topic themselves


@pytest.fixture(scope="module")
def captured(
    settings: Settings,
    kafka_stack: KafkaTestStack,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Captured]:
    name = unique("stream_kafka_")
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    tmp = tmp_path_factory.mktemp("stream_kafka")
    monkeypatch = pytest.MonkeyPatch()
    s = ml_settings(settings, tmp, monkeypatch, pg_database=name, mongodb_database=name)
    docdb = docstore.connect(s)
    followed = None
    try:
        # As the embedded stream's tests do: the seed ends the day after tomorrow, so that the
        # payments added later come after it and the warm-up (the horizon before now) sees it.
        end = dt.date.today() + dt.timedelta(days=2)
        seed_load.seed(s, build(make_spec(scale=0.01, seed=5, end=end, max_documents=300)), docdb)
        trained = train_champion(s)
        assert trained.promoted
        with db.connect(s, autocommit=True) as conn:
            cdc.ensure_publication(conn, DEFAULT_PUBLICATION, TABLES)
            cdc.ensure_slot(conn, WITNESS)  # every change from here on, to compare with Kafka's
        followed = kafka_stack.follow(name, unique("pay"), create=False)
        s = followed.settings.model_copy(
            update={"mlflow_tracking_uri": s.mlflow_tracking_uri, "mongodb_database": name}
        )
        yield Captured(Stream(s, docdb, tmp, trained.version), unique("fraud"))
    finally:
        if followed is not None:
            kafka_stack.unfollow(followed, drop=False)
        with db.connect(s, autocommit=True) as conn:
            cdc.slot_info_when_free(conn, WITNESS, timeout=30)
            cdc.drop_slot(conn, WITNESS)
        docdb.client.drop_database(name)
        docdb.client.close()
        monkeypatch.undo()
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def witnessed_counts(s: Settings) -> dict[str, int]:
    """Changes per table since the fixture, from the witness slot."""
    with db.connect(s, autocommit=True) as conn:
        batch = cdc.read_changes(conn, WITNESS, DEFAULT_PUBLICATION, max_changes=10_000_000)
    counts = dict.fromkeys(TABLES, 0)
    for change in batch.changes:
        counts[change.table] += 1
    return counts


def topic_size(servers: dict[str, str], topic: str) -> int:
    consumer = Consumer({**servers, "group.id": unique("size")})
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        if meta.error is not None:  # not created yet: Debezium creates it at its first change
            return 0
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in meta.partitions
        )
    except KafkaException:  # a topic just created may have no leader yet
        return 0
    finally:
        consumer.close()


def wait_for_debezium(captured: Captured) -> dict[str, int]:
    """Until every change the witness slot saw is on Kafka (beside the tests' own messages): then
    a scorer run ``until_idle`` sees them all."""
    s = captured.stream.settings
    want = witnessed_counts(s)
    want["transaction"] += captured.produced
    topics = debezium.topics(s)
    assert s.kafka_bootstrap_servers
    servers = client_config(s)
    return wait_for(
        "Debezium's messages",
        lambda: all(topic_size(servers, topics[t]) >= n for t, n in want.items()) and want,
    )


def run_scorer(s: Settings, group: str) -> scorer.RunSummary:
    source = KafkaSource(s, group=group)
    try:
        return scorer.run(s, source, until_idle=True)
    finally:
        source.close()


def test_payments_committed_in_postgresql_are_scored_from_debezium(captured: Captured) -> None:
    stream, s = captured.stream, captured.stream.settings
    ids = add_payments(stream, seed=1, days=3)
    wait_for_debezium(captured)
    summary = run_scorer(s, captured.group)
    assert summary.state == "stopped" and summary.source == "debezium"
    assert summary.model_version == stream.champion_version

    rows = score_events(s, ids)
    expected_changes = {k for k in witnessed(s) if k[0] in set(ids)}
    # Every change of every new payment once, under the LSN PostgreSQL gave it: Debezium's
    # source.lsn is the embedded slot's change LSN.
    assert set(rows) == expected_changes
    for row in rows.values():
        assert row["source"] == "debezium" and 0 <= row["score"] <= 1
        assert row["isfraud"] == (row["score"] >= row["threshold"])
        assert row["committoscorems"] >= 0 and row["scoredat"] >= row["committime"]
    assert_documents_carry_the_newest_score(stream, ids, rows)
    assert summary.skipped == {} and summary.dead_lettered == 0

    status = scorer.read_status(s)
    assert status["state"] == "stopped" and status["source"] == "debezium"
    assert status["consumer_lag_messages"] == 0


def test_a_poison_message_goes_to_the_dead_letter_topic_and_the_stream_goes_on(
    captured: Captured,
) -> None:
    stream, s = captured.stream, captured.stream.settings
    assert s.kafka_bootstrap_servers
    servers, payments = client_config(s), debezium.topics(s)["transaction"]
    run_scorer(s, captured.group)  # whatever an earlier test left: this one starts caught up
    (offset,) = produce(servers, [(payments, 0, b'{"customerid":1}', b"\x00poison")])
    captured.produced += 1
    ids = add_payments(stream, seed=2, days=1)
    wait_for_debezium(captured)
    summary = run_scorer(s, captured.group)

    assert (summary.skipped, summary.dead_lettered) == ({"undecodable": 1}, 1)
    assert set(score_events(s, ids)) == {k for k in witnessed(s) if k[0] in set(ids)}
    dead = [
        m
        for m in read_topic(servers, debezium.dead_letter_topic(s))
        if dict(m.headers())["dlq.original.offset"] == str(offset).encode()
    ]
    assert [(m.value(), dict(m.headers())["dlq.original.topic"]) for m in dead] == [
        (b"\x00poison", payments.encode())
    ]


def test_a_second_run_scores_nothing_twice(captured: Captured) -> None:
    stream, s = captured.stream, captured.stream.settings
    ids = add_payments(stream, seed=3, days=1)
    wait_for_debezium(captured)
    first = run_scorer(s, captured.group)
    assert first.scored > 0
    before = score_events(s, ids)

    again = run_scorer(s, captured.group)  # the group's offsets: nothing is delivered again
    assert (again.scored, again.replayed) == (0, 0)
    # A new group reads every topic from the start: each change is delivered again and its
    # FraudScoreEvent (keyed by transaction and LSN) stays the one written first.
    replay = run_scorer(s, unique("replay"))
    assert replay.scored == 0 and replay.replayed > 0
    assert score_events(s, ids) == before
