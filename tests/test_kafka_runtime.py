"""The Kafka stack against real servers: a Kafka 4.4 broker (KRaft) and Kafka Connect with the
Debezium PostgreSQL connector, following a database of the session's PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from kafka_stack import Followed, KafkaTestStack
from stripe_platform.oltp import db
from stripe_platform.runtime import kafka
from stripe_platform.runtime.postgres import RuntimeErrorWithHint
from stripe_platform.showcase import brief_examples
from stripe_platform.streaming import debezium

DEADLINE_S = 90.0  # an upper bound for an awaited event: a missing one fails, never hangs


BEFORE_ANY_CHANGE: dict[str, int | None] = {}  # topic -> partitions, seen right after follow()


@pytest.fixture(scope="module")
def followed(kafka_stack: KafkaTestStack) -> Iterator[Followed]:
    """A database of this module's own, with the brief's example records, followed by a
    connector writing to topics rt.public.*."""
    f = kafka_stack.follow(f"kafka_runtime_{uuid.uuid4().hex[:8]}", "rt")
    admin = AdminClient(kafka.client_config(f.settings))
    for topic in f.topics.values():
        found = admin.list_topics(topic, timeout=10).topics[topic]
        BEFORE_ANY_CHANGE[topic] = None if found.error else len(found.partitions)
    with db.connect(f.settings, autocommit=True) as conn:
        brief_examples.load_oltp(conn)
    yield f
    kafka_stack.unfollow(f)


def consumer(f: Followed, topic: str) -> Consumer:
    """A consumer without a group's committed position, reading ``topic`` from its start."""
    c = Consumer(
        {
            **kafka.client_config(f.settings),  # bootstrap.servers, and TLS: the broker's only
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([topic])
    return c


def read_until(c: Consumer, found, what: str) -> list:
    """Messages until ``found(messages)`` holds."""
    messages: list = []
    deadline = time.monotonic() + DEADLINE_S
    while not found(messages):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen within {DEADLINE_S:.0f} s ({len(messages)} messages)")
        message = c.poll(0.5)
        if message is None or message.error():
            continue
        messages.append(message)
    return messages


def lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


def listening_addresses(port: int) -> set[str]:
    """The local addresses on which something listens on ``port`` (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            host, port_hex = address.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.add(host)
    return found


def test_broker_and_connect_run_on_loopback_only(kafka_stack: KafkaTestStack) -> None:
    status = kafka_stack.stack.status()
    assert status.broker_running and status.connect_running
    name = kafka_stack.attached.name
    assert status.connectors[name]["connector"] == "RUNNING"
    assert status.connectors[name]["tasks"] == ["RUNNING"]
    state = json.loads(kafka_stack.stack.state_file.read_text())
    for key in ("broker_port", "controller_port", "rest_port"):
        # 127.0.0.1 as /proc/net/tcp writes it, or as an IPv4-mapped IPv6 address (::ffff:
        # 127.0.0.1, Java's socket); nothing on 0.0.0.0 or ::
        addresses = listening_addresses(state[key])
        assert addresses and addresses <= LOOPBACK, (key, addresses)
    metadata = AdminClient(kafka.client_config(kafka_stack.settings)).list_topics(timeout=10)
    assert [b.host for b in metadata.brokers.values()] == ["127.0.0.1"]


def test_a_payment_arrives_keyed_by_customer(followed: Followed) -> None:
    topic = followed.topics["transaction"]
    assert topic == "rt.public.transaction"
    # Made before any change (Connect makes a topic only at its first message): a consumer that
    # subscribes first is assigned its partitions at once.
    assert BEFORE_ANY_CHANGE[topic] == debezium.PARTITIONS
    c = consumer(followed, topic)
    try:
        with db.connect(followed.settings, autocommit=True) as conn:
            before = lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
            ids = []
            for customer, amount in ((13, "12.30"), (13, "7.05"), (14, "99.99")):
                ids.append(
                    conn.execute(
                        """INSERT INTO Transaction (TransactionStatusID, MerchantID, Amount,
                               CurrencyID, PaymentMethodID, CustomerID, DateTime)
                           VALUES (1, 3, %s, 1, 1, %s, '2026-03-04 05:06:07.891+00')
                           RETURNING ID""",
                        (Decimal(amount), customer),
                    ).fetchone()[0]
                )
            after = lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])

        def ours(messages: list) -> list:
            return [
                m for m in messages if m.value() and json.loads(m.value())["after"]["id"] in ids
            ]

        messages = ours(read_until(c, lambda ms: len(ours(ms)) == 3, "the three payments"))
    finally:
        c.close()
    by_id = {json.loads(m.value())["after"]["id"]: m for m in messages}
    first, second, third = (by_id[i] for i in ids)
    assert json.loads(first.key()) == {"customerid": 13}
    assert json.loads(third.key()) == {"customerid": 14}
    # One customer's payments share a partition (the key decides it), in commit order.
    assert first.partition() == second.partition()
    assert first.offset() < second.offset()
    value = json.loads(first.value())
    assert value["op"] == "c"
    assert value["before"] is None
    assert value["after"]["customerid"] == 13
    assert value["after"]["amount"] == "12.30"  # decimal.handling.mode=string: exact
    assert value["after"]["datetime"] == "2026-03-04T05:06:07.891000Z"  # ISO, UTC, in µs
    assert value["source"]["table"] == "transaction"  # the partition reported under its root
    assert before < value["source"]["lsn"] <= after
    assert isinstance(value["ts_ms"], int)


def test_heartbeats_move_and_confirm_the_slot(followed: Followed) -> None:
    topic = followed.heartbeat_topic
    assert topic == "__debezium-heartbeat.rt"
    c = consumer(followed, topic)
    try:
        read_until(c, lambda ms: len(ms) >= 1, "a first heartbeat")
        with db.connect(followed.settings, autocommit=True) as conn:
            # WAL written elsewhere than the followed tables: the slot must still move past it.
            conn.execute("CREATE TABLE heartbeat_probe (id int)")
            conn.execute("DROP TABLE heartbeat_probe")
            probe = lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
            read_until(c, lambda ms: len(ms) >= 3, "two more heartbeats")
            deadline = time.monotonic() + DEADLINE_S
            while True:
                confirmed = conn.execute(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                    "WHERE slot_name = %s",
                    (followed.attached.slot,),
                ).fetchone()[0]
                if lsn(confirmed) >= probe:
                    break
                assert time.monotonic() < deadline, f"slot stuck at {confirmed}"
                time.sleep(0.2)
    finally:
        c.close()


def test_a_bad_configuration_value_is_refused_with_its_name(
    kafka_stack: KafkaTestStack,
) -> None:
    with pytest.raises(RuntimeErrorWithHint, match=r"snapshot\.mode") as refused:
        kafka.attach(
            kafka_stack.settings,
            kafka_stack.stack,
            database=kafka_stack.database,
            extra={"snapshot.mode": "sometimes"},
        )
    assert "Traceback" not in str(refused.value)
    # The running connector is untouched.
    state = kafka.connector_state(
        kafka_stack.stack.connect_url, kafka_stack.attached.name, ca=kafka_stack.stack.ca
    )
    assert state["tasks"] == ["RUNNING"]


def test_a_database_that_does_not_exist_is_named(kafka_stack: KafkaTestStack) -> None:
    config = debezium.connector_config(
        kafka_stack.settings,
        db.conninfo(kafka_stack.settings, database="no_such_db", with_key=False),
    )
    with pytest.raises(RuntimeErrorWithHint, match=r'"no_such_db" does not exist'):
        kafka.deploy_connector(
            kafka_stack.stack.connect_url, "bad-database", config, ca=kafka_stack.stack.ca
        )
    assert "bad-database" not in kafka_stack.stack.status().connectors


def test_dates_are_iso_strings(followed: Followed) -> None:
    """Every column of a state change arrives as the normalizer expects (ids as numbers,
    timestamps as ISO strings)."""
    topic = followed.topics["transactionstatechanges"]
    c = consumer(followed, topic)
    try:
        with db.connect(followed.settings, autocommit=True) as conn:
            tx = conn.execute(
                "SELECT ID, DateTime FROM Transaction WHERE ID = %s",
                (brief_examples.BRIEF_TRANSACTION_ID,),
            ).fetchone()
            row = conn.execute(
                """INSERT INTO TransactionStateChanges (TransactionID, TransactionDateTime,
                       ToStatusID, Reason, UpdatedBy, UpdatedAt)
                   VALUES (%s, %s, 1, 'test', 'kafka-test', '2026-05-06 07:08:09+02')
                   RETURNING ID""",
                tx,
            ).fetchone()
        messages = read_until(
            c,
            lambda ms: any(json.loads(m.value())["after"]["id"] == row[0] for m in ms),
            "the state change",
        )
    finally:
        c.close()
    value = next(
        json.loads(m.value()) for m in messages if json.loads(m.value())["after"]["id"] == row[0]
    )
    assert value["after"]["transactionid"] == brief_examples.BRIEF_TRANSACTION_ID
    assert value["after"]["updatedat"] == "2026-05-06T05:08:09.000000Z"
    assert value["after"]["transactiondatetime"].endswith("Z")
    assert dt.datetime.fromisoformat(value["after"]["transactiondatetime"]) == tx[1]


def cli(monkeypatch: pytest.MonkeyPatch, *args: str, **env: str):
    from typer.testing import CliRunner

    from stripe_platform.cli import app
    from stripe_platform.config import get_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        get_settings.cache_clear()


def test_kafka_status_reports_the_running_stack(
    kafka_stack: KafkaTestStack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = cli(
        monkeypatch,
        "kafka",
        "status",
        "--json",
        STRIPE_PLATFORM_HOME=str(kafka_stack.base_settings.home_dir),
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["broker_running"] and info["connect_running"]
    assert info["bootstrap_servers"] == kafka_stack.bootstrap_servers
    assert info["connectors"][kafka_stack.attached.name]["tasks"] == ["RUNNING"]


def test_kafka_up_elsewhere_than_embedded_asks_for_connect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = cli(
        monkeypatch,
        "kafka",
        "up",
        STRIPE_PLATFORM_HOME=str(tmp_path),
        STRIPE_PLATFORM_PROFILE="compose",
        STRIPE_PLATFORM_PG_DSN="host=postgres dbname=stripe user=stripe",
        MONGODB_URI="mongodb://mongo:27017/",
    )
    assert result.exit_code == 1
    assert "--connect-url" in result.output
    assert "Traceback" not in result.output


def test_clients_find_the_embedded_broker_without_a_setting(
    kafka_stack: KafkaTestStack,
) -> None:
    s = kafka_stack.base_settings
    assert s.kafka_bootstrap_servers is None
    assert kafka.bootstrap_servers(s) == kafka_stack.bootstrap_servers
    named = s.model_copy(update={"kafka_bootstrap_servers": "broker.example:9092"})
    assert kafka.bootstrap_servers(named) == "broker.example:9092"


def test_no_broker_is_one_clear_error(tmp_path: Path) -> None:
    from stripe_platform.config import load_settings

    with pytest.raises(RuntimeErrorWithHint, match="kafka up"):
        kafka.bootstrap_servers(load_settings(home=tmp_path, profile="embedded"))
