"""The platform's one FastAPI application.

``create_app(settings)`` builds it: the routers of :data:`ROUTERS` (adding a section of the API is
one line there) and the services they share (``api/services.py``: the champion and the online
features, with their background threads, started and stopped by the app's lifespan).
``stripe-platform api`` serves it with uvicorn over TLS (``cli/api.py``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from stripe_platform.api import customers, fraud, health, mfa, sso
from stripe_platform.api.services import Services
from stripe_platform.api.serving import REFRESH_SECONDS
from stripe_platform.audit import access_log

if TYPE_CHECKING:
    from stripe_platform.config import Settings
    from stripe_platform.ml.registry import Registry

ROUTERS = (
    health.router,
    fraud.router,
    sso.router,
    mfa.router,
    customers.router,
)

DESCRIPTION = """The payments platform's API.

- **fraud**: score a payment with the fraud model's champion (`models:/fraud@champion` in MLflow),
  its features computed from the platform's recent payments as the stream scorer computes them.
- **health**: liveness (`/healthz`) and readiness (`/readyz`: the model serving and the state of
  the online features; 503 until both are there).
"""


def create_app(
    settings: Settings,
    *,
    registry: Registry | None = None,
    refresh_seconds: float = REFRESH_SECONDS,
    features_now: dt.datetime | None = None,
) -> FastAPI:
    """The app for ``settings``. ``registry``: another MLflow store than the settings name;
    ``refresh_seconds``: how often the champion alias is read; ``features_now``: warm the online
    features up to this time instead of now (a replayed past)."""
    services = Services.create(
        settings, registry=registry, refresh_seconds=refresh_seconds, features_now=features_now
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.start()
        try:
            yield
        finally:
            services.stop()

    app = FastAPI(
        title="stripe-platform",
        description=DESCRIPTION,
        version=_version(),
        lifespan=lifespan,
    )
    app.state.services = services
    for router in ROUTERS:
        app.include_router(router)
    access_log.install(app)  # every request, authentication and authorisation decision, logged
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stripe-platform")
    except PackageNotFoundError:
        return "0"
