"""`privacy breach`: personal-data breaches and their 72-hour clock (issue 23 §4,
compliance/breach.py, docs/compliance.md).

`declare INCIDENT_ID`, `list`, `show ID [--draft]` (the Art. 33(3) notification draft), `submit ID
--reference REF`; each with `--json`. An unknown incident or breach, a second declaration of the
same incident or a second submission is refused with exit 1.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.cli.common import command, console, group, settings
from stripe_platform.cli.privacy import privacy_app
from stripe_platform.compliance import breach

breach_app = group("Personal-data breaches: declare, list, show (with the draft), submit.")
privacy_app.add_typer(breach_app, name="breach")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]
BreachId = Annotated[int, typer.Argument(help="The breach's id (see `privacy breach list`)")]
ByOption = Annotated[
    str | None, typer.Option("--by", help="Who does it (default: the operating-system user)")
]


def _actor(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return "unknown"


def _print_json(value) -> None:
    console.print_json(json.dumps(value, default=str))


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


@command(breach_app, "declare")
def breach_declare(
    incident_id: Annotated[int, typer.Argument(help="The incident (see `incidents list`)")],
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Declare an incident a personal-data breach: what it reached, and the clock starts."""
    b = breach.declare(settings(), incident_id, by=_actor(by))
    if as_json:
        _print_json(b.to_json())
        return
    a = b.affected
    console.print(
        f"breach #{b.id} (incident #{b.incident_id}): notify the authority by "
        f"{_when(b.deadline)}; about {a['subjects_approx']} subjects "
        f"({a['subjects_exact']} named), {a['records_approx']} records, "
        f"categories: {', '.join(a['categories']) or 'none'}"
    )


@command(breach_app, "list")
def breach_list(as_json: JsonOption = False) -> None:
    """Every breach's clock, open ones first by deadline."""
    found = breach.clocks(settings())
    if as_json:
        _print_json([c.to_json() for c in found])
        return
    if not found:
        console.print("no breaches")
        return
    table = Table("id", "incident", "state", "declared", "deadline", "hours left", "overdue")
    for c in found:
        table.add_row(
            str(c.id), str(c.incident_id), c.state, _when(c.declared_at), _when(c.deadline),
            f"{c.hours_left:.1f}" if c.state == "open" else "", "yes" if c.overdue else "",
        )  # fmt: skip
    console.print(table)


@command(breach_app, "show")
def breach_show(
    breach_id: BreachId,
    draft: Annotated[bool, typer.Option("--draft", help="With the Art. 33 draft")] = False,
    as_json: JsonOption = False,
) -> None:
    """One breach: its clock, what it reached and, with --draft, the notification draft."""
    s = settings()
    b = breach.get_breach(s, breach_id)
    out = b.to_json()
    if draft:
        out["draft"] = breach.draft_notification(s, breach_id)
    if as_json:
        _print_json(out)
        return
    console.print_json(json.dumps(out, default=str))


@command(breach_app, "submit")
def breach_submit(
    breach_id: BreachId,
    reference: Annotated[
        str, typer.Option("--reference", help="The authority's reference for the notification")
    ],
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record the notification as submitted to the authority."""
    b = breach.submit(settings(), breach_id, by=_actor(by), reference=reference)
    if as_json:
        _print_json(b.to_json())
        return
    late = " (late)" if b.submitted_at > b.deadline else ""
    console.print(f"breach #{b.id} submitted{late}: reference {b.reference}")
