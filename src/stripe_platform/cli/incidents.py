"""`incidents`: security incidents raised by the audit rules and the log anomaly model (issue 22)."""

from __future__ import annotations

from stripe_platform.cli.common import group

incidents_app = group("Security incidents: list, show, acknowledge, resolve.")
