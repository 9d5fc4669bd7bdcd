"""`compliance kpis [--json]` and `compliance dashboard` (issue 23, docs/compliance.md).

`kpis` prints what the dashboard shows (compliance/kpis.py: each KPI's value, status and why);
`dashboard` prints where the page is (the API serves it: `stripe-platform api`) and starts
nothing.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.cli.common import command, console, settings
from stripe_platform.cli.compliance import compliance_app
from stripe_platform.compliance import kpis as kpis_module

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]


@command(compliance_app, "kpis")
def compliance_kpis(as_json: JsonOption = False) -> None:
    """The compliance dashboard's KPIs: value, status (ok, warn, bad; info for rates) and why."""
    found = kpis_module.kpis(settings())
    if as_json:
        console.print_json(json.dumps(found.model_dump(mode="json")))
        return
    table = Table("KPI", "value", "status", "why", "trend (days)", "evidence")
    for k in found.kpis:
        table.add_row(
            k.title, kpis_module.figure(k), k.status, k.detail, str(len(k.trend)), k.evidence
        )
    console.print(table)
    for d in found.deadlines:
        state = "OVERDUE" if d.overdue else f"{d.days_left:.1f} days left"
        console.print(f"{d.kind} {d.id} ({d.label}): due {d.due_at:%Y-%m-%d %H:%M} UTC, {state}")


@command(compliance_app, "dashboard")
def compliance_dashboard() -> None:
    """Where the compliance dashboard is (served by `stripe-platform api`, behind SSO)."""
    console.print(f"{settings().api_url}/compliance")
