"""The online features the API scores with: the stream's own feature state, kept current here.

:class:`OnlineFeatures` runs one thread: it opens a temporary replication slot on the platform's
PostgreSQL (``streaming.embedded.EmbeddedSource(temporary=True)``: dropped with its session, so
an API that dies holds no WAL), warms a ``streaming.state.LiveFeatureState`` with the recent
payments (``warm``), then applies every committed payment and fraud label the slot delivers, as
the stream scorer does (the same normalizer, the same state code). The slot is opened before the
warm-up reads, so nothing committed in between is missed; what both see is ingested once (the
state skips a payment it has seen).

The API follows PostgreSQL this way whatever the stream's backend: an API replica needs every
customer's payments, where a Kafka consumer group would give it a share of the partitions.

A failure (PostgreSQL gone, the slot lost) keeps the last state serving, says so in readiness,
and starts again (new slot, new warm-up) a few seconds later; the new state replaces the old one
once warm. A request only reads the state (``features``): no I/O in the request path.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from stripe_platform.errors import PlatformError

if TYPE_CHECKING:
    from stripe_platform.config import Settings
    from stripe_platform.ml.contract import TransactionRecord

log = logging.getLogger(__name__)

_apps = itertools.count()
RETRY_SECONDS = 5.0  # after a failure, before opening a new slot and warming again
POLL_EVENTS = 2000
POLL_TIMEOUT = 0.5  # seconds a poll waits when nothing is committed (the stop check's period)


class FeaturesNotReady(PlatformError, RuntimeError):
    """No warm feature state yet: scores would miss the payments' history."""


class OnlineFeatures:
    def __init__(self, settings: Settings, *, now: dt.datetime | None = None) -> None:
        self.settings = settings
        self.now = now  # warm up to this time instead of now (tests replay a seeded past)
        self.state: Any | None = None  # a warm LiveFeatureState
        self.error: str | None = None  # why following stopped (None: it runs)
        self.detail_text = "warming the feature state"
        self.checked_at: dt.datetime | None = None
        self.warmed = threading.Event()  # set once the first warm-up has ended, well or not
        self.applied = 0  # payments and labels applied since the last warm-up
        self.rejected = 0  # changes the normalizer refused (the stream scorer counts them)
        # A temporary slot of its own per app (a test process may make several apps).
        self.slot = f"stripe_fraud_api_{os.getpid()}_{next(_apps)}"

    def features(self, record: TransactionRecord) -> np.ndarray:
        state = self.state
        if state is None:
            raise FeaturesNotReady(f"online features: {self.detail()}")
        return state.features(record)

    def detail(self) -> str:
        text = self.detail_text
        if self.state is not None:
            text += f" ({self.applied:,} changes applied, {self.rejected:,} refused)"
        if self.error is not None:
            return f"{text}; following stopped: {self.error}"
        return text

    # -- the follower thread ---------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._follow(stop)
            except Exception as exc:  # the follower outlives any one failure
                log.exception("following the platform's changes failed")
                self.error = str(exc) if isinstance(exc, PlatformError) else repr(exc)
                self.checked_at = dt.datetime.now(dt.UTC)
                self.warmed.set()
            if stop.wait(RETRY_SECONDS):
                return

    def _follow(self, stop: threading.Event) -> None:
        from stripe_platform.ml.contract import TransactionRecord
        from stripe_platform.streaming.changes import Rejected
        from stripe_platform.streaming.embedded import EmbeddedSource
        from stripe_platform.streaming.normalize import LabelEvent, Normalizer
        from stripe_platform.streaming.state import LiveFeatureState

        source = EmbeddedSource(self.settings, slot=self.slot, temporary=True)
        normalizer = None
        try:
            normalizer = Normalizer(self.settings)
            state = LiveFeatureState.warm(self.settings, now=self.now)
            self.detail_text = (
                f"warm ({state.warmed:,} payments of the last {state.horizon.days} days); "
                "following the platform's changes"
            )
            self.state, self.error, self.applied, self.rejected = state, None, 0, 0
            self.checked_at = dt.datetime.now(dt.UTC)
            self.warmed.set()
            while not stop.is_set():
                polled = source.poll(POLL_EVENTS, POLL_TIMEOUT)
                items = []
                for event in polled.events:
                    item = normalizer.normalize(event)
                    if isinstance(item, TransactionRecord | LabelEvent):
                        items.append(item)
                    elif isinstance(item, Rejected):  # the stream scorer reports these
                        self.rejected += 1
                if items:
                    state.apply(items)
                source.checkpoint()
                self.applied += len(items)
                self.checked_at = dt.datetime.now(dt.UTC)
        finally:
            if normalizer is not None:
                normalizer.close()
            source.close()
