"""The job of the ``compliance_daily`` DAG (issue 23, docs/compliance.md), callable without
Airflow: the daily compliance controls (compliance/controls.py: recorded, an incident per failure)
then the breach clocks (compliance/breach.py: an incident per overdue notification). A failed
control is an incident and an alert, not a failed task: the task fails only when a control could
not run at all, so Airflow's failure alert says the check itself is broken."""

from __future__ import annotations

import datetime as dt
from typing import Any

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError


class ComplianceCheckBroken(PlatformError, RuntimeError):
    """A control could not run (its error is recorded in its evidence and in the message)."""


def daily(settings: Settings, now: dt.datetime | None = None) -> dict[str, Any]:
    from stripe_platform.compliance import breach, controls

    now = now or dt.datetime.now(dt.UTC)
    results = controls.run_controls(settings, now=now)
    overdue = breach.check_overdue(settings, now=now)
    summary = {
        "controls": {
            r.name: {"passed": r.passed, "value": r.value, "unit": r.unit} for r in results
        },
        "failed": [r.name for r in results if not r.passed],
        "overdue_breaches": [i.id for i in overdue],
    }
    broken = [f"{r.name}: {r.evidence['error']}" for r in results if "error" in r.evidence]
    if broken:
        raise ComplianceCheckBroken("compliance controls could not run: " + "; ".join(broken))
    return summary
