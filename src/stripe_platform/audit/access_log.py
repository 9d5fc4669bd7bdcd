"""Placeholder (issue 21): the centralised access log, filled by its owner."""

from __future__ import annotations

from typing import Any


def record(settings: Any, **event: Any) -> None:
    """Record one access event (authn, authz, read, admin). Placeholder: does nothing yet."""


def install(app: Any) -> None:
    """Add the request-logging middleware to the API app. Placeholder: does nothing yet."""
