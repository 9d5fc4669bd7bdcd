"""`incidents`: security incidents raised by the audit rules and the log anomaly model (issue 22).

`list [--status] [--severity] [--since] [--json]`, `show ID [--json]`, `ack ID [--note]`,
`resolve ID [--note]`, `counts [--json]` (audit/incidents.py). An unknown id or a status change
the incident's status does not allow is refused with exit 1.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.audit import incidents
from stripe_platform.cli.common import command, console, group, settings

incidents_app = group("Security incidents: list, show, acknowledge, resolve.")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]
IdArgument = Annotated[int, typer.Argument(help="The incident's id (see `incidents list`)")]
NoteOption = Annotated[str | None, typer.Option("--note", help="Why (kept with the incident)")]
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


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


def _print_json(value) -> None:
    console.print_json(json.dumps(value, default=str))


@command(incidents_app, "list")
def incidents_list(
    status: Annotated[
        list[str] | None,
        typer.Option("--status", help="open, acknowledged or resolved (repeatable)"),
    ] = None,
    severity: Annotated[
        list[str] | None,
        typer.Option("--severity", help="low, medium, high or critical (repeatable)"),
    ] = None,
    since: Annotated[
        dt.datetime | None, typer.Option("--since", help="Last seen at or after (UTC if naive)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many")] = 200,
    as_json: JsonOption = False,
) -> None:
    """Incidents, newest activity first."""
    found = incidents.list_incidents(
        settings(), status=status or None, severity=severity or None, since=since, limit=limit
    )
    if as_json:
        _print_json([i.to_json() for i in found])
        return
    if not found:
        console.print("no incidents")
        return
    table = Table("id", "severity", "status", "rule", "user", "count", "last seen", "title")
    for i in found:
        table.add_row(
            str(i.id), i.severity, i.status, i.rule, i.user or "", str(i.count),
            _when(i.last_seen), i.title,
        )  # fmt: skip
    console.print(table)


@command(incidents_app, "show")
def incidents_show(incident_id: IdArgument, as_json: JsonOption = False) -> None:
    """One incident with its evidence (Log document ids, trail records)."""
    _show(incidents.get_incident(settings(), incident_id), as_json)


def _show(i: incidents.Incident, as_json: bool) -> None:
    if as_json:
        _print_json(i.to_json())
        return
    console.print(f"incident #{i.id}: {i.title}")
    console.print(f"  severity {i.severity}, status {i.status}, rule {i.rule}")
    console.print(f"  user {i.user or '-'}, source {i.source or '-'}")
    console.print(
        f"  seen {i.count} time(s), first {_when(i.first_seen)}, last {_when(i.last_seen)}"
    )
    if i.acknowledged_at is not None:
        note = f": {i.ack_note}" if i.ack_note else ""
        console.print(f"  acknowledged by {i.acknowledged_by} {_when(i.acknowledged_at)}{note}")
    if i.resolved_at is not None:
        note = f": {i.resolve_note}" if i.resolve_note else ""
        console.print(f"  resolved by {i.resolved_by} {_when(i.resolved_at)}{note}")
    console.print(f"  dedup key {i.dedup_key}")
    console.print(f"  evidence ({len(i.evidence)}):")
    for item in i.evidence:
        console.print(f"    {item}")
    if i.detail:
        console.print(f"  detail {json.dumps(i.detail, default=str, sort_keys=True)}")


@command(incidents_app, "ack")
def incidents_ack(
    incident_id: IdArgument,
    note: NoteOption = None,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Acknowledge an open incident (who, when and the note are kept)."""
    i = incidents.acknowledge(settings(), incident_id, by=_actor(by), note=note)
    if as_json:
        _print_json(i.to_json())
    else:
        console.print(f"incident #{i.id} acknowledged by {i.acknowledged_by}")


@command(incidents_app, "resolve")
def incidents_resolve(
    incident_id: IdArgument,
    note: NoteOption = None,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Resolve an open or acknowledged incident; a later finding with its key opens a new one."""
    i = incidents.resolve(settings(), incident_id, by=_actor(by), note=note)
    if as_json:
        _print_json(i.to_json())
    else:
        console.print(f"incident #{i.id} resolved by {i.resolved_by}")


@command(incidents_app, "counts")
def incidents_counts(as_json: JsonOption = False) -> None:
    """How many incidents by status, and unresolved ones by severity."""
    got = incidents.counts(settings())
    if as_json:
        _print_json(got)
        return
    by_status = ", ".join(f"{n} {status}" for status, n in got["by_status"].items())
    unresolved = ", ".join(f"{n} {sev}" for sev, n in got["unresolved_by_severity"].items())
    console.print(f"{got['total']} incidents: {by_status}")
    console.print(f"unresolved by severity: {unresolved}")
