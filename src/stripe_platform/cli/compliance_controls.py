"""`compliance` commands (issue 23): placeholder until its owner fills it in."""

from __future__ import annotations

from stripe_platform.cli.compliance import compliance_app  # noqa: F401
