"""The contract between the stream scorer and its sources of change events.

One scorer, two sources: the embedded engine's replication slot (``streaming/embedded.py``) and
Debezium's topics on Kafka (``streaming/kafka.py``). Each adapter turns its wire format into
:class:`RowEvent`; everything after that (rows to payments, feature state, scoring, writes) is
shared. A source moves its durable position (slot ``confirmed_flush_lsn``, consumer-group offsets)
only in :meth:`ChangeSource.checkpoint`, which the scorer calls once every event returned so far
is durably written: a crash between ``poll`` and ``checkpoint`` re-delivers, never loses.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

SourceName = Literal["embedded", "debezium"]
Operation = Literal["insert", "update", "delete", "snapshot"]


@dataclass(frozen=True, slots=True)
class RowEvent:
    """One committed row change of a table the stream follows."""

    source: SourceName
    table: str
    """Unqualified, lower case, as PostgreSQL names it: ``transaction``,
    ``transactionstatechanges`` (partitioned tables under their root)."""
    op: Operation
    row: Mapping[str, Any]
    """Column name (lower case) to value: Python values from the embedded source, Debezium's JSON
    values (strings for numerics and timestamps) from Kafka; the normalizer accepts both."""
    lsn: int
    """WAL position of the change: with the transaction id, the idempotency key of a score."""
    commit_time: dt.datetime
    """When the source transaction committed (aware, UTC): commit-to-score delay starts here."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A change the scorer cannot use: recorded, counted, skipped; never fatal."""

    source: SourceName
    where: str
    """Where it came from: table and LSN, or topic/partition/offset."""
    reason: str
    """A metric label: ``unknown_table``, ``missing_column``, ``bad_value``, ``undecodable``."""
    detail: str


@dataclass(frozen=True, slots=True)
class Poll:
    events: Sequence[RowEvent] = ()
    rejected: Sequence[Rejected] = ()
    caught_up: bool = True
    """False when more is already waiting (read again at once)."""


@dataclass(frozen=True, slots=True)
class Lag:
    slot_lag_bytes: int | None = None
    """WAL the server keeps for this consumer (current WAL LSN - confirmed position)."""
    consumer_lag_messages: int | None = None
    """Messages behind the partitions' high-water marks (Kafka)."""
    position: str | None = None
    """The durable position, human-readable (``0/16B3748``, ``topic[p]@offset,...``)."""
    extra: dict[str, Any] = field(default_factory=dict)


class ChangeSource(Protocol):
    name: SourceName

    def poll(self, max_events: int, timeout: float) -> Poll:
        """The next committed changes, waiting up to ``timeout`` seconds when none is ready."""
        ...

    def checkpoint(self) -> None:
        """Everything returned by ``poll`` so far is durable: move the source's position past it."""
        ...

    def lag(self) -> Lag: ...

    def close(self) -> None: ...


TABLES: tuple[str, ...] = ("transaction", "transactionstatechanges")
"""The tables the stream follows: payments, and the state changes that carry fraud reports."""
