"""The Kafka change source: Debezium's change events on Kafka as :class:`RowEvent`.

Debezium's PostgreSQL connector writes one topic per table (``<prefix>.public.<table>``), each
message's value an envelope (``before``, ``after``, ``source`` with ``lsn``/``ts_ms``/``table``,
``op``), alone or wrapped in ``{"schema": ..., "payload": ...}`` when the JSON converter keeps
schemas. :class:`KafkaSource` reads those topics as a consumer group and hands the scorer the
same :class:`RowEvent` the embedded source does.

Delivery: offsets are committed only in :meth:`KafkaSource.checkpoint` (never automatically), so a
crash or a rebalance between ``poll`` and ``checkpoint`` re-delivers (the scorer's writes are
idempotent by transaction id and LSN). A message that cannot be decoded (a poison message) is copied
to the dead-letter topic ``<prefix>.dlq``, its origin and the error in its headers, and returned as
a :class:`Rejected`; its offset then moves on like any other's, so it never blocks a partition.
Deletes' tombstones (null values) and heartbeats carry no row and are skipped.

Order: Kafka keeps each partition in order, and topics are partitioned by customer. The changes of
the partitions a member reads are handed out in commit order as far as Kafka shows it
(:func:`merge`): a change waits while another partition is behind (up to ``MAX_HOLD``), but one
Debezium has not yet written to another partition can still come after a later one, so windows that
span customers (a merchant's, a device's, an IP's) are in commit order only nearly; the embedded
source's are exactly. Members of a group share the partitions: each one's windows see only its own
customers' payments.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any, Final, TypeVar

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.runtime.kafka import client_config
from stripe_platform.streaming import debezium
from stripe_platform.streaming.changes import Lag, Operation, Poll, Rejected, RowEvent

__all__ = ["DLQ_HEADERS", "KafkaSource", "KafkaSourceError", "decode", "merge"]

log = logging.getLogger(__name__)

OPS: Final[Mapping[str, Operation]] = {
    "c": "insert",
    "u": "update",
    "d": "delete",
    "r": "snapshot",
}
# Operations with no row for the scorer: truncate ("t", only when skipped.operations lets it
# through) and logical decoding messages ("m").
ROWLESS_OPS: Final = frozenset({"t", "m"})

HEARTBEAT_SCHEMA: Final = "io.debezium.connector.common.Heartbeat"
MAX_HOLD: Final = 1.0
"""Longest a change waits for a partition that is behind (see merge) before it goes anyway: a
partition that cannot be read must not stop the others."""
K = TypeVar("K", bound=Hashable)

DLQ_HEADERS: Final = (
    "dlq.original.topic",
    "dlq.original.partition",
    "dlq.original.offset",
    "dlq.consumer.group",
    "dlq.error.reason",
    "dlq.error.detail",
)
"""Headers of a dead-lettered message, beside its original key, value and headers."""

# Commit failures that mean "this member no longer owns the partition": the events will be
# re-delivered to the new owner, so dropping the commit loses nothing.
_REBALANCE_ERRORS: Final = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError._ASSIGNMENT_LOST,
        KafkaError.STALE_MEMBER_EPOCH,
        KafkaError.FENCED_MEMBER_EPOCH,
    }
)


class KafkaSourceError(PlatformError, RuntimeError):
    """The Kafka source cannot go on (a dead-letter write refused, a fatal consumer error)."""


# Decoding (pure: no broker) ------------------------------------------------------------------


class _Undecodable(ValueError):
    pass


def decode(value: bytes | None, *, where: str) -> RowEvent | Rejected | None:
    """One Debezium message value -> its :class:`RowEvent`; ``None`` for what carries no row
    (a tombstone, a heartbeat, a truncate); a :class:`Rejected` (reason ``undecodable``) for
    anything else. ``where`` names the message (``topic[partition]@offset``)."""
    if value is None:
        return None  # the tombstone after a delete: compaction's marker, no change of its own
    try:
        return _decode(value)
    except _Undecodable as exc:
        return Rejected("debezium", where, "undecodable", str(exc))


def _decode(value: bytes) -> RowEvent | None:
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Undecodable(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _Undecodable(f"not a JSON object: {type(doc).__name__}")
    schema_name = None
    if doc.keys() == {"schema", "payload"}:  # JsonConverter with schemas.enable=true
        schema = doc["schema"]
        schema_name = schema.get("name") if isinstance(schema, dict) else None
        doc = doc["payload"]
        if doc is None:
            return None  # a tombstone as a converter with schemas may write it
        if not isinstance(doc, dict):
            raise _Undecodable(f"payload is not a JSON object: {type(doc).__name__}")
    if "op" not in doc:
        if schema_name == HEARTBEAT_SCHEMA or doc.keys() == {"ts_ms"}:
            return None  # a heartbeat: keeps the slot moving, no row
        raise _Undecodable("no 'op': not a Debezium change event")
    op = doc["op"]
    if isinstance(op, str) and op in ROWLESS_OPS:
        return None
    if not isinstance(op, str) or op not in OPS:
        raise _Undecodable(f"unknown op {op!r}")
    image = "before" if op == "d" else "after"
    row = doc.get(image)
    if not isinstance(row, dict):
        raise _Undecodable(f"op {op!r} without a row in {image!r}")
    source = doc.get("source")
    if not isinstance(source, dict):
        raise _Undecodable("no 'source' block")
    table = source.get("table")
    if not isinstance(table, str) or not table:
        raise _Undecodable("source.table missing")
    lsn = source.get("lsn")
    if not _is_int(lsn) or lsn < 0:
        raise _Undecodable(f"source.lsn is not a WAL position: {lsn!r}")
    return RowEvent(
        source="debezium",
        table=table.lower(),
        op=OPS[op],
        row={str(k).lower(): v for k, v in row.items()},
        lsn=lsn,
        commit_time=_commit_time(source),
    )


def _commit_time(source: Mapping[str, Any]) -> dt.datetime:
    """The source transaction's commit time: ``source.ts_us`` (Debezium 2.6+, PostgreSQL's own
    microsecond precision) or ``source.ts_ms``."""
    us = source.get("ts_us")
    if _is_int(us):
        seconds, micros = divmod(us, 1_000_000)
    else:
        ms = source.get("ts_ms")
        if not _is_int(ms):
            raise _Undecodable(f"source.ts_ms is not a time: {ms!r}")
        seconds, millis = divmod(ms, 1000)
        micros = millis * 1000
    try:
        return dt.datetime.fromtimestamp(seconds, dt.UTC).replace(microsecond=micros)
    except (OverflowError, OSError, ValueError) as exc:
        raise _Undecodable(f"source timestamp out of range: {exc}") from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


Held = tuple[int, RowEvent | Rejected | None]
"""A message read and not yet returned: its offset, and what it decoded to."""


def merge(
    held: Mapping[K, collections.deque[Held]], waiting: Collection[K], max_items: int
) -> list[tuple[K, int, RowEvent | Rejected | None]]:
    """Take the held messages of several partitions in commit order (commit time, LSN, row id).

    Kafka orders a partition, not a topic; the scorer's windows (a merchant's, a device's) span
    customers and so partitions. A change is taken only when every partition of ``waiting`` (not
    read to its end yet) has something held, so none of them can still bring an earlier one;
    what has no commit time (a rejected message, a tombstone) goes at once. Each partition's
    messages leave in offset order, and ``held`` keeps what is not taken.
    """
    out: list[tuple[K, int, RowEvent | Rejected | None]] = []
    while len(out) < max_items:
        heads = {key: queue[0] for key, queue in held.items() if queue}
        if not heads:
            break
        untimed = next(
            (k for k, (_, item) in heads.items() if not isinstance(item, RowEvent)), None
        )
        if untimed is None:
            if any(not held.get(key) for key in waiting):
                break
            untimed = min(heads, key=lambda k: _order(heads[k][1]))
        offset, item = held[untimed].popleft()
        out.append((untimed, offset, item))
    return out


def _order(event: RowEvent | Rejected | None) -> tuple[dt.datetime, int, int]:
    assert isinstance(event, RowEvent)
    # Rows of one multi-row INSERT share one WAL record, so one LSN, and may sit in different
    # partitions: their ids (identity-generated, in insert order) order them as the WAL does.
    row_id = event.row.get("id")
    return (event.commit_time, event.lsn, row_id if _is_int(row_id) else -1)


def _where(msg: Message) -> str:
    return f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"


# The consumer ----------------------------------------------------------------------------------


class KafkaSource:
    """Debezium's topics as a :class:`~stripe_platform.streaming.changes.ChangeSource`: a member
    of consumer group ``group`` (one per scorer; add members to share the partitions)."""

    name = "debezium"

    def __init__(
        self,
        settings: Settings,
        *,
        group: str | None = None,
        topics: Sequence[str] | None = None,
    ) -> None:
        # The brokers (the setting, else `stripe-platform kafka up`'s) and TLS to them.
        self._client = client_config(settings)
        servers = self._client["bootstrap.servers"]
        self.group = group or settings.kafka_consumer_group
        self.topics = list(topics) if topics else list(debezium.topics(settings).values())
        self.dlq_topic = debezium.dead_letter_topic(settings)
        self._servers = servers
        self._lock = threading.Lock()
        # Next offset to commit per partition: past every message poll returned since the last
        # checkpoint (tombstones, heartbeats and dead-lettered messages included).
        self._pending: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}  # durable positions known to us
        self._assigned: set[tuple[str, int]] = set()
        # A first assignment came (possibly empty: more members than partitions).
        self._joined = False
        self._closed = False
        self._producer: Producer | None = None
        self._dlq_ready = False
        self._dlq_failures: list[str] = []
        self._warned: set[int] = set()
        self._broken: str | None = None
        # Messages read but not yet returned, per partition, until the partitions that may still
        # bring an earlier change have been read (see merge).
        self._held: dict[tuple[str, int], collections.deque[Held]] = {}
        self._hold_deadline: float | None = None
        self._backlog = False
        conf: dict[str, Any] = {
            **self._client,
            "group.id": self.group,
            "client.id": f"stripe-platform-{self.group}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # Incremental rebalancing: a member joining or leaving moves only the partitions
            # that change owner, the others keep flowing.
            "partition.assignment.strategy": "cooperative-sticky",
            # Debezium creates a table's topic at its first change: find it within seconds,
            # not librdkafka's default 5 minutes.
            "topic.metadata.refresh.interval.ms": 5000,
            "allow.auto.create.topics": False,
            "logger": log,
        }
        self._consumer = Consumer(conf)
        self._consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    # Rebalance callbacks (run inside poll/consume/close, on this thread) ----------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self._assigned.update((tp.topic, tp.partition) for tp in partitions)
            self._joined = True
        log.info("kafka source %s: assigned %s", self.group, _names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Offsets of events returned but not yet checkpointed are dropped, never committed: the
        # scorer may not have written them yet; the partition's next owner re-reads them.
        self._forget(partitions)
        log.info("kafka source %s: revoked %s", self.group, _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget(partitions)
        log.warning("kafka source %s: lost %s", self.group, _names(partitions))

    def _forget(self, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                key = (tp.topic, tp.partition)
                self._assigned.discard(key)
                self._pending.pop(key, None)
                self._committed.pop(key, None)
                self._held.pop(key, None)

    # ChangeSource ---------------------------------------------------------------------------

    def poll(self, max_events: int, timeout: float) -> Poll:
        self._check_usable()
        now = time.monotonic()
        with self._lock:
            holding = any(self._held.values())
        wait = timeout
        if self._backlog:
            wait = 0.0  # released up to max_events last time: the rest is ready now
        elif holding and self._hold_deadline is not None:
            wait = min(timeout, max(0.0, self._hold_deadline - now))
        try:
            self._read(max_events, wait)
        except Exception as exc:
            # The consumer's position may be past messages nobody will get: commit nothing more
            # from this member; its restart re-reads from the last checkpoint.
            with self._lock:
                self._pending.clear()
            self._broken = self._broken or f"{type(exc).__name__}: {exc}"
            raise

        now = time.monotonic()
        with self._lock:
            assigned = sorted(self._assigned)
        behind = self._behind(assigned)
        force = self._hold_deadline is not None and now >= self._hold_deadline
        with self._lock:
            released = merge(self._held, set() if force else behind, max_events)
            for key, offset, _ in released:
                self._pending[key] = offset + 1
            holding = any(self._held.values())
        self._backlog = len(released) >= max_events
        if not holding or force:
            self._hold_deadline = None
        elif self._hold_deadline is None and not self._backlog:
            self._hold_deadline = now + MAX_HOLD
        return Poll(
            events=[item for _, _, item in released if isinstance(item, RowEvent)],
            rejected=[item for _, _, item in released if isinstance(item, Rejected)],
            caught_up=self._joined and not holding and not behind,
        )

    def checkpoint(self) -> None:
        self._check_usable()
        self._flush_dlq()  # a dead-lettered message's offset moves on only once the DLQ has it
        with self._lock:
            pending = dict(self._pending)
        if not pending:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in sorted(pending.items())]
        try:
            result = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() in _REBALANCE_ERRORS:
                log.warning("kafka source %s: commit dropped by a rebalance: %s", self.group, err)
                with self._lock:
                    self._pending.clear()
                return
            raise
        failed = [tp for tp in result or () if tp.error is not None]
        with self._lock:
            for tp in result or offsets:
                key = (tp.topic, tp.partition)
                if tp.error is None and self._pending.get(key) == tp.offset:
                    del self._pending[key]
                    if key in self._assigned:
                        self._committed[key] = tp.offset
        for tp in failed:
            if tp.error.code() not in _REBALANCE_ERRORS:
                raise KafkaSourceError(
                    f"commit of {tp.topic}[{tp.partition}]@{tp.offset} failed: {tp.error}"
                )

    def lag(self) -> Lag:
        with self._lock:
            assigned = sorted(self._assigned)
        committed = self._durable(assigned)
        total = 0
        parts = []
        for topic, partition in assigned:
            tp = TopicPartition(topic, partition)
            low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:  # nothing fetched yet: ask the broker
                low, high = self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            offset = committed.get((topic, partition), OFFSET_INVALID)
            if offset < 0:  # no commit yet: the group starts at the earliest offset
                offset = max(low, 0)
            total += max(high - offset, 0)
            parts.append(f"{topic}[{partition}]@{offset}")
        return Lag(
            consumer_lag_messages=total,
            position=",".join(parts) or None,
            extra={"group": self.group, "partitions": len(assigned)},
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._producer is not None:
                self._producer.flush(10)
        finally:
            self._consumer.close()  # leaves the group at once: its partitions move without delay

    # Internals --------------------------------------------------------------------------------

    def _read(self, max_events: int, wait: float) -> None:
        """Consume what is there (waiting up to ``wait`` for the first message) into ``_held``;
        poison messages to the dead-letter topic, durably."""
        # consume(n, timeout) waits for n messages or the whole timeout: wait for the first
        # message only, then take what is already fetched without waiting.
        first = self._consumer.poll(wait)
        messages: list[Message] = [] if first is None else [first]
        if first is not None and max_events > 1:
            messages += self._consumer.consume(max_events - 1, 0)
        dead = False
        for msg in messages:
            if msg.error() is not None:
                self._on_error(msg.error())
                continue
            decoded = decode(msg.value(), where=_where(msg))
            if isinstance(decoded, Rejected):
                self._dead_letter(msg, decoded)
                dead = True
            key = (msg.topic(), msg.partition())
            with self._lock:
                if key in self._assigned:  # else revoked meanwhile: its next owner reads it
                    self._held.setdefault(key, collections.deque()).append((msg.offset(), decoded))
        if dead:
            self._flush_dlq()

    def _behind(self, assigned: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """The assigned partitions not read up to their high-water mark (as the last fetch saw
        it): more may come from them at once, and an empty poll means "not yet"."""
        if not assigned:
            return set()
        positions = self._consumer.position([TopicPartition(t, p) for t, p in assigned])
        durable: dict[tuple[str, int], int] | None = None
        behind = set()
        for tp in positions:
            key = (tp.topic, tp.partition)
            low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            offset = tp.offset
            if offset < 0 and high >= 0:  # nothing consumed since assignment: from the commit
                durable = durable if durable is not None else self._durable(assigned)
                offset = durable.get(key, OFFSET_INVALID)
                if offset < 0:  # ... or, never committed, from the earliest offset
                    offset = low
            if high < 0 or offset < 0 or offset < high:  # (high < 0: not fetched from yet)
                behind.add(key)
        return behind

    def _durable(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The group's committed offset of each partition (OFFSET_INVALID: none yet), asked of the
        broker once per assignment, then kept current by :meth:`checkpoint`."""
        with self._lock:
            unknown = [TopicPartition(t, p) for t, p in keys if (t, p) not in self._committed]
        if unknown:
            answered = self._consumer.committed(unknown, timeout=10)
            with self._lock:
                for tp in answered:
                    key = (tp.topic, tp.partition)
                    if key in self._assigned and tp.error is None:
                        self._committed.setdefault(key, tp.offset)
        with self._lock:
            return {key: self._committed.get(key, OFFSET_INVALID) for key in keys}

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise KafkaSourceError(
                f"{self._broken}: restart the stream (it resumes at its last checkpoint)"
            )
        if self._closed:
            raise KafkaSourceError("the Kafka source is closed")

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            # Debezium has not written to this table yet: its topic appears with the first change.
            if err.code() not in self._warned:
                self._warned.add(err.code())
                log.info("kafka source %s: %s (waiting for the topic)", self.group, err.str())
            return
        if err.fatal():
            raise KafkaSourceError(f"Kafka consumer failed: {err.str()}")
        log.warning("kafka source %s: %s", self.group, err.str())

    def _dead_letter(self, msg: Message, why: Rejected) -> None:
        if self._producer is None:
            self._producer = Producer(
                {
                    **self._client,
                    "client.id": f"stripe-platform-{self.group}-dlq",
                    "enable.idempotence": True,  # acks=all, no duplicates on retry
                    "linger.ms": 0,
                    "logger": log,
                }
            )
        if not self._dlq_ready:
            self._ensure_dlq()
        headers = [
            *(msg.headers() or ()),
            ("dlq.original.topic", msg.topic()),
            ("dlq.original.partition", str(msg.partition())),
            ("dlq.original.offset", str(msg.offset())),
            ("dlq.consumer.group", self.group),
            ("dlq.error.reason", why.reason),
            ("dlq.error.detail", why.detail),
        ]
        self._producer.produce(
            self.dlq_topic,
            key=msg.key(),
            value=msg.value(),
            headers=headers,
            on_delivery=self._delivered,
        )
        log.warning(
            "kafka source %s: %s dead-lettered to %s: %s",
            self.group,
            why.where,
            self.dlq_topic,
            why.detail,
        )

    def _ensure_dlq(self) -> None:
        """Create the dead-letter topic if missing (replication: the broker's default)."""
        admin = AdminClient({**self._client, "logger": log})
        futures = admin.create_topics([NewTopic(self.dlq_topic, num_partitions=1)])
        try:
            futures[self.dlq_topic].result(timeout=30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise KafkaSourceError(
                    f"cannot create the dead-letter topic {self.dlq_topic}: {exc.args[0].str()}"
                ) from None
        except TimeoutError:
            raise KafkaSourceError(
                f"cannot create the dead-letter topic {self.dlq_topic}: no answer in 30 s"
            ) from None
        self._dlq_ready = True

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._dlq_failures.append(err.str())

    def _flush_dlq(self) -> None:
        if self._producer is None:
            return
        remaining = self._producer.flush(30)
        if remaining or self._dlq_failures:
            failures, self._dlq_failures = self._dlq_failures, []
            # The consumer's position is already past the message the DLQ does not hold: commit
            # nothing more from this member; its restart re-reads from the last checkpoint.
            with self._lock:
                self._pending.clear()
            self._broken = (
                f"the dead-letter topic {self.dlq_topic} did not take "
                f"{remaining or len(failures)} message(s): {'; '.join(failures) or 'timed out'}"
            )
            raise KafkaSourceError(self._broken)


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
