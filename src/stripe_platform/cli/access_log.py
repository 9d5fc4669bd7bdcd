"""`access log`: the centralised access log (the API's events and PostgreSQL's connections and
statements, literals redacted), filtered and in time order (audit/access_log.py)."""

from __future__ import annotations

import collections
import datetime as dt
import re
from typing import Annotated

import typer
from rich.text import Text

from stripe_platform.cli.access import access_app
from stripe_platform.cli.common import command, console, err, settings

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_OUTCOME_STYLE = {"allow": "green", "deny": "bold red", "error": "yellow"}


def parse_when(value: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """``1h``/``30m``/``2d`` ago, or an ISO date or time (``2026-12-07``, ``2026-12-07T10:00``;
    without a zone: UTC)."""
    now = now or dt.datetime.now(dt.UTC)
    text = value.strip()
    if match := _RELATIVE.match(text):
        return now - dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither a duration (30m, 1h, 2d, 1w) nor an ISO time "
            "(2026-12-07T10:00, UTC unless it says otherwise)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _what(event) -> str:
    """The statement for PostgreSQL's statements (redacted already), else the resource."""
    text = event.statement or event.resource or "-"
    return text if len(text) <= 200 else text[:199] + "…"


@command(access_app, "log")
def access_log_command(
    since: Annotated[
        str, typer.Option(help="From: a duration ago (30m, 1h, 2d) or an ISO time (UTC)")
    ] = "24h",
    until: Annotated[str | None, typer.Option(help="Until (exclusive), same forms")] = None,
    user: Annotated[str | None, typer.Option(help="Only this user's events")] = None,
    outcome: Annotated[
        str | None, typer.Option(help="Only this outcome: allow, deny or error")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="Only this log: api or postgres (default: both)")
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            help="Only this kind (authn, authz, read, admin, request, statement, session)"
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=0, help="The most recent N matching events (0: all)")
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array on stdout")] = False,
) -> None:
    """Access events of the API (authentication, authorisation, sensitive reads, requests) and of
    PostgreSQL (logins, refused logins, statements with their literals redacted, errors), oldest
    first: who, from where, what, and the outcome."""
    from stripe_platform.audit.access_log import ORIGINS, OUTCOMES, events

    if outcome is not None and outcome not in OUTCOMES:
        raise typer.BadParameter(f"--outcome must be one of {sorted(OUTCOMES)}")
    if source is not None and source not in ORIGINS:
        raise typer.BadParameter(f"--source must be one of {list(ORIGINS)}")
    stream = events(
        settings(),
        since=parse_when(since),
        until=parse_when(until) if until else None,
        user=user,
        origins=[source] if source else ORIGINS,
    )
    chosen = (
        e
        for e in stream
        if (outcome is None or e.outcome == outcome) and (kind is None or e.kind == kind)
    )
    shown = list(collections.deque(chosen, maxlen=limit or None))
    for problem in stream.problems:
        err.print(f"warning: {problem}")
    for path, count in stream.skipped.items():
        err.print(f"warning: {path}: {count} unreadable line(s) skipped")
    if as_json:
        console.print_json(data=[e.as_dict() for e in shown])
        return
    # One line per event (a log, not a table: a statement keeps its length whatever the width).
    for e in shown:
        where = e.origin if e.database is None else f"{e.origin}/{e.database}"
        who = f"{e.user or '-'}@{e.source or '-'}"
        verdict = e.outcome if not e.reason else f"{e.outcome} ({e.reason})"
        console.print(
            Text.assemble(
                f"{e.time:%Y-%m-%d %H:%M:%S.%f}"[:-3],
                f"  {where}  {e.kind}  {who}  {e.action}  {_what(e)}  ",
                (verdict, _OUTCOME_STYLE.get(e.outcome, "")),
            )
        )
    err.print(f"{len(shown)} event(s)")
