"""`compliance`: the daily controls and the compliance dashboard (issue 23, docs/compliance.md).

This module holds the group; cli/compliance_controls.py and cli/compliance_dashboard.py register
their commands on `compliance_app`.
"""

from __future__ import annotations

from stripe_platform.cli.common import group

compliance_app = group(
    "Compliance: the daily controls (encryption, access, retention, PCI scope, transfers) and the "
    "dashboard's KPIs."
)
