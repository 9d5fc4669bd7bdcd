"""Placeholder (issue 22): commands of the `audit` group, filled by its owner (they register on
`audit_app`)."""

from __future__ import annotations

from stripe_platform.cli.audit import audit_app  # noqa: F401
