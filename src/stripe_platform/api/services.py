"""What the API's routers share: the model holder and the online features, with their threads.

One :class:`Services` per app (``app.state.services``); a router reaches it through the
:func:`services` dependency. Its threads start with the app (the lifespan) and stop with it.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from stripe_platform.api.online import OnlineFeatures
from stripe_platform.api.serving import REFRESH_SECONDS, ModelHolder

if TYPE_CHECKING:
    from stripe_platform.config import Settings
    from stripe_platform.ml.registry import Registry


@dataclass
class Services:
    settings: Settings
    model: ModelHolder
    features: OnlineFeatures
    refresh_seconds: float = REFRESH_SECONDS
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    _users: int = 0
    _users_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        registry: Registry | None = None,
        refresh_seconds: float = REFRESH_SECONDS,
        features_now: dt.datetime | None = None,
    ) -> Services:
        return cls(
            settings,
            ModelHolder(settings, registry=registry),
            OnlineFeatures(settings, now=features_now),
            refresh_seconds,
        )

    def start(self) -> None:
        """The champion's refresher and the features' follower (daemon threads: a server that
        exits does not wait on a poll). Counted: an app run by two servers at once (a test
        client inside another) starts them once and stops them with the last."""
        with self._users_lock:
            self._users += 1
            if self._users > 1:
                return
            self.stopping.clear()
            self.threads = [
                threading.Thread(
                    target=self.model.run,
                    args=(self.stopping, self.refresh_seconds),
                    name="api-champion-refresher",
                    daemon=True,
                ),
                threading.Thread(
                    target=self.features.run,
                    args=(self.stopping,),
                    name="api-features-follower",
                    daemon=True,
                ),
            ]
            for thread in self.threads:
                thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._users_lock:
            self._users -= 1
            if self._users > 0:
                return
            self.stopping.set()
            for thread in self.threads:
                thread.join(timeout)

    def wait_started(self, timeout: float) -> bool:
        """True once the first champion check and the first warm-up have ended (well or not)."""
        return self.model.checked.wait(timeout) and self.features.warmed.wait(timeout)

    @property
    def ready(self) -> bool:
        return self.model.current is not None and self.features.state is not None


def services(request: Request) -> Services:
    """The app's services (a FastAPI dependency)."""
    return request.app.state.services
