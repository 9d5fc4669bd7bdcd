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

from stripe_platform.api import compliance, consent, customers, fraud, health, mfa, privacy, sso
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
    privacy.router,
    consent.router,
    compliance.router,
)

DESCRIPTION = """The payments platform's API.

- **fraud**: score a payment with the fraud model's champion (`models:/fraud@champion` in MLflow),
  its features computed from the platform's recent payments as the stream scorer computes them.
- **health**: liveness (`/healthz`) and readiness (`/readyz`: the model serving and the state of
  the online features; 503 until both are there).
- **sso**: single sign-on through the configured SAML identity provider (`/saml/login`,
  `/saml/acs`, `/saml/metadata`, `/saml/logout`): a session cookie whose roles come from the access
  policy (access/policy.yaml) and the IdP's groups.
- **mfa**: the TOTP second factor (`/v1/auth/mfa/enroll`, `/confirm`, `/verify`): a verified code
  steps the session up for the policy's window.
- **customers**: customers masked; their personal data and card numbers in clear and bulk exports
  only to roles the policy clears for those classes, with a fresh second factor.

Every route but health, sso and the docs needs a bearer token (`stripe-platform access token
issue`) or an SSO session, and the scope the policy gives the caller's roles; every decision is in
the access log (`stripe-platform access log`). docs/access.md.
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
