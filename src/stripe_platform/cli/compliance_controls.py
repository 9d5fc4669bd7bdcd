"""`compliance check` and `compliance controls`: the daily compliance controls (issue 23 §5,
compliance/controls.py, docs/compliance.md).

`check [--only NAME ...] [--json]` runs the controls, records them, raises an incident per failure
and exits 1 if any failed; `controls [--days N] [--name NAME] [--json]` shows the recorded results
(the latest of each, or the history of the last N days).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.cli.common import command, console, settings
from stripe_platform.cli.compliance import compliance_app
from stripe_platform.compliance import controls

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]


def _table(results: list[controls.ControlResult]) -> Table:
    table = Table("control", "result", "value", "violations", "run at")
    for r in results:
        table.add_row(
            r.name,
            "pass" if r.passed else "FAIL",
            f"{r.value:g} {r.unit}",
            str(len(r.evidence.get("violations", []))),
            "" if r.run_at is None else f"{r.run_at.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC",
        )
    return table


@command(compliance_app, "check")
def compliance_check(
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only", help=f"Only this control (repeatable): {', '.join(controls.CONTROLS)}"
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run the controls now, record them; exit 1 if any failed (each failure is an incident)."""
    results = controls.run_controls(settings(), only=only or None)
    if as_json:
        console.print_json(json.dumps([r.to_json() for r in results], default=str))
    else:
        console.print(_table(results))
        for r in results:
            for v in r.evidence.get("violations", [])[:10]:
                console.print(f"{r.name}: {json.dumps(v, default=str)}")
            if "error" in r.evidence:
                console.print(f"{r.name}: could not run: {r.evidence['error']}")
    if not all(r.passed for r in results):
        raise typer.Exit(1)


@command(compliance_app, "controls")
def compliance_controls(
    days: Annotated[
        int | None, typer.Option("--days", min=1, help="The history of the last N days")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="One control's history")] = None,
    as_json: JsonOption = False,
) -> None:
    """The recorded results: the latest of each control, or the history with --days."""
    s = settings()
    results = controls.latest(s) if days is None else controls.history(s, days, name=name)
    if as_json:
        console.print_json(json.dumps([r.to_json() for r in results], default=str))
        return
    if not results:
        console.print("no control results recorded: run `stripe-platform compliance check`")
        return
    console.print(_table(results))
