"""The live feature state shared by the stream scorer and the API: ``ml.features.OnlineFeatureState``
(the one feature definition's online engine) kept current from the change stream.

- :meth:`LiveFeatureState.warm` (a new state) or :meth:`~LiveFeatureState.load` reads the last
  feature horizon of the platform's payments (and their fraud labels, with the time each became
  known) with ``load_platform_transactions``: the same rows training reads.
- :meth:`LiveFeatureState.apply` takes the stream's payments and labels in commit order and returns
  each payment's feature vector, computed *before* the payment is ingested (features look strictly
  before the payment). A payment already ingested (in the warm-up, or re-delivered after a
  restart) is scored again but not ingested twice: re-delivery never counts a payment twice. Its
  vector is the same as the first time while it is within the allowed lateness (an hour) of the
  newest payment; older entries have left the windows' memory.
- A label for a payment not ingested yet (Kafka may deliver the state change before the payment:
  they are different topics) waits for its payment; labels and ingested ids are kept for the
  feature horizon (plus the allowed lateness) behind the latest payment, so memory stays bounded.
- :meth:`LiveFeatureState.features` is the API's read: a vector, nothing ingested.

Thread-safe: one lock around the state (the API reads it from request threads while a follower
thread applies changes), taken per event so that a reader never waits for a whole batch.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from stripe_platform.ml.contract import EmptyTransactions, TransactionRecord, Transactions
from stripe_platform.ml.features import FEATURES, FeatureSpec, OnlineFeatureState, _epoch_us
from stripe_platform.streaming.normalize import LabelEvent

if TYPE_CHECKING:
    from stripe_platform.config import Settings

# How far behind the newest payment a payment may be and still get exactly its training features:
# the state keeps (and the warm-up loads) this much beyond the longest window. A status change
# re-scores its payment, and refunds and disputes come weeks later (the seed refunds up to 60 days
# back): with an hour, their windows were cut (measured: 219 of 246 such re-scores differed from
# the point-in-time score). The cost is memory: 60 more days of payments beside the 90 of the
# horizon. Older payments are still scored, from whatever their windows kept.
ALLOWED_LATENESS = dt.timedelta(days=60)


def _us(delta: dt.timedelta) -> int:
    return delta // dt.timedelta(microseconds=1)


class LiveFeatureState:
    """See the module. ``specs`` and ``allowed_lateness`` as for ``OnlineFeatureState``."""

    def __init__(
        self,
        specs: Sequence[FeatureSpec] = FEATURES,
        *,
        allowed_lateness: dt.timedelta = ALLOWED_LATENESS,
    ) -> None:
        from stripe_platform.ml.drift import feature_horizon

        self.specs = tuple(specs)
        self.names = tuple(s.name for s in self.specs)
        self.horizon = feature_horizon(self.specs)
        self._state = OnlineFeatureState(self.specs, allowed_lateness=allowed_lateness)
        self.lateness = allowed_lateness
        self._keep = _us(self.horizon + allowed_lateness)
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}  # ingested payment -> its timestamp (us)
        self._seen_order: deque[tuple[int, str]] = deque()
        # labels of payments not ingested yet: id -> when known
        self._waiting: dict[str, dt.datetime] = {}
        self._waiting_order: deque[tuple[int, str]] = deque()  # (known us, id), to evict
        self._latest: int | None = None  # the latest payment's timestamp (us)
        self.payments = 0  # ingested (warm-up included)
        self.labels = 0  # applied to an ingested payment
        self.warmed = 0  # payments the last load ingested

    # -- public API ----------------------------------------------------------------------------
    @classmethod
    def warm(
        cls, settings: Settings, now: dt.datetime | None = None, **options: object
    ) -> LiveFeatureState:
        """A new state holding the platform's payments of the feature horizon (plus the allowed
        lateness) before ``now`` and their fraud labels (:meth:`load`). ``options`` go to the
        constructor."""
        state = cls(**options)  # type: ignore[arg-type]
        state.load(settings, now)
        return state

    def load(self, settings: Settings, now: dt.datetime | None = None) -> int:
        """Ingest the platform's payments of the feature horizon (plus the allowed lateness) before
        ``now`` and their fraud labels; returns how many payments were new. ``now=None``: the current time, and payments
        dated after it too (a clock ahead of ours); a given ``now`` reads up to it only (a
        point-in-time warm-up, e.g. for a replay). Create the change source *before* warming:
        what is committed after the source's start position is then delivered, and what both
        see is deduplicated.
        """
        from stripe_platform.ml.contract import load_platform_transactions

        end = now
        if now is None:
            now = dt.datetime.now(dt.UTC)
        try:
            history = load_platform_transactions(
                settings,
                start=now - self.horizon - self.lateness,
                end=end,
                require_labels=False,
            )
        except EmptyTransactions:
            return 0
        self.warmed = self.ingest_history(history)
        return self.warmed

    def ingest_history(self, transactions: Transactions | pa.Table) -> int:
        """Ingest a canonical table (payments, then labels with their known times), skipping the
        payments already ingested; returns how many payments were new."""
        table = transactions.table if isinstance(transactions, Transactions) else transactions
        ids = table["transaction_id"].to_pylist()
        ts = table["timestamp"].cast(pa.int64()).to_pylist()
        with self._lock:
            new = [i for i, tid in enumerate(ids) if tid not in self._seen]
            if len(new) < len(ids):
                table = table.take(pa.array(new, pa.int64()))
                ids = [ids[i] for i in new]
                ts = [ts[i] for i in new]
            if not ids:
                return 0
            self._state.ingest_history(table)
            for tid, t in zip(ids, ts, strict=True):
                self._remember(tid, t)
            for tid in ids:  # labels that arrived before their payment
                known = self._waiting.pop(tid, None)
                if known is not None:
                    self._label(tid, known)
            self.payments += len(ids)
            self._evict()
            return len(ids)

    def seen(self, transaction_id: str) -> bool:
        """Whether this payment is ingested (a re-delivered one is scored, not ingested again)."""
        with self._lock:
            return transaction_id in self._seen

    def apply(self, events: Iterable[TransactionRecord | LabelEvent]) -> np.ndarray:
        """Payments and labels in stream order: each payment's features (one row per payment, in
        their order; ``len(names)`` columns), each computed from everything before it, then the
        payment ingested (unless it already was); each label applied."""
        raws: list[dict[str, object]] = []
        lock = self._lock
        for event in events:
            # The lock per event, not per batch: a reader (an API request) waits for one payment
            # at most, not for a whole catch-up batch.
            with lock:
                if isinstance(event, LabelEvent):
                    self._add_label(event.transaction_id, event.known_at)
                    continue
                raws.append(self._state.record_raw(event))
                if event.transaction_id not in self._seen:
                    self._state.ingest(event)
                    self._remember(event.transaction_id, _epoch_us(event.timestamp))
                    self.payments += 1
                    known = self._waiting.pop(event.transaction_id, None)
                    if known is not None:
                        self._label(event.transaction_id, known)
        with lock:
            self._evict()
        # One vectorised finalize for the batch (the raw quantities were taken in order above).
        return self._state.finalize(raws)

    def features(self, record: TransactionRecord) -> np.ndarray:
        """One payment's feature vector from the state as it is; nothing is ingested."""
        with self._lock:
            return self._state.features(record)

    def retained(self) -> dict[str, int]:
        """What the state holds (entries per entity, ids, waiting labels): its memory."""
        with self._lock:
            held = self._state.retained()
            held["ingested_ids"] = len(self._seen)
            held["waiting_labels"] = len(self._waiting)
            return held

    # -- internals (under the lock) ------------------------------------------------------------
    def _remember(self, transaction_id: str, t: int) -> None:
        self._seen[transaction_id] = t
        self._seen_order.append((t, transaction_id))
        if self._latest is None or t > self._latest:
            self._latest = t

    def _add_label(self, transaction_id: str, known: dt.datetime) -> None:
        if transaction_id in self._seen:
            self._label(transaction_id, known)
        elif transaction_id not in self._waiting:  # the first report counts
            self._waiting[transaction_id] = known
            self._waiting_order.append((_epoch_us(known), transaction_id))

    def _label(self, transaction_id: str, known: dt.datetime) -> None:
        if self._state.add_label(transaction_id, known):
            self.labels += 1

    def _evict(self) -> None:
        if self._latest is None:
            return
        cutoff = self._latest - self._keep
        while self._seen_order and self._seen_order[0][0] < cutoff:
            t, tid = self._seen_order.popleft()
            if self._seen.get(tid) == t:
                del self._seen[tid]
        while self._waiting_order and self._waiting_order[0][0] < cutoff:
            _, tid = self._waiting_order.popleft()
            self._waiting.pop(tid, None)
