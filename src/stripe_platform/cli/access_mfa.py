"""Placeholder (issue 21): commands of the `access` group, filled by its owner (they register on
`access_app`)."""

from __future__ import annotations

from stripe_platform.cli.access import access_app  # noqa: F401
