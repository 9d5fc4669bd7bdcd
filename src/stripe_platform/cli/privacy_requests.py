"""`privacy request access|rectify|erase|opt-out|run|show`, `privacy requests`, `privacy hold`,
`privacy release` (issue 23 §1: compliance/requests.py, docs/compliance.md).

`privacy request KIND --customer ID --identity HOW` records the request with its legal clock and
runs it at once; `privacy request run ID` re-runs a failed or on-hold one from where it stopped.
An access request writes the subject's JSON export: it is their personal data, so the operator
proves a second factor first (`--otp CODE`, the TOTP of `access mfa enroll`, checked as for the
API's sensitive reads). A request that does not end `done` (refused, failed, on hold) exits 1 with
its reason.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.cli.common import command, console, err, group, settings
from stripe_platform.cli.privacy import privacy_app
from stripe_platform.compliance import requests
from stripe_platform.security import mfa

request_app = group(
    "Data-subject requests: access (JSON export), rectify, erase, opt-out; run, show."
)
privacy_app.add_typer(request_app, name="request")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]
CustomerOption = Annotated[
    int, typer.Option("--customer", min=1, help="The customer (data subject) id")
]
LawOption = Annotated[
    str, typer.Option("--law", help="gdpr (one month to answer) or ccpa (45 days)")
]
IdentityOption = Annotated[
    str,
    typer.Option(
        "--identity",
        help="How the requester's identity was verified (e.g. 'signed-in account + ID check, "
        "ticket 4411'); kept with the request",
    ),
]
ByOption = Annotated[
    str | None, typer.Option("--by", help="Who records it (default: the operating-system user)")
]
IdArgument = Annotated[int, typer.Argument(help="The request's id (see `privacy requests`)")]


def _actor(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return "unknown"


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


def _show(request: requests.PrivacyRequest, as_json: bool, *, fail: bool = True) -> None:
    """Print the request; ``fail``: exit 1 with its reason when it is not done."""
    if as_json:
        console.print_json(json.dumps(request.to_json(), default=str))
    else:
        console.print(
            f"request {request.id}: {request.kind} of customer {request.customer_id} "
            f"({request.law.upper()}), {request.state}; due {_when(request.due_at)} "
            f"({request.days_left()} days left)"
        )
        if request.steps:
            table = Table("step", "state", "counts", "detail", "finished")
            for step in request.steps:
                counts = ", ".join(f"{k}={v}" for k, v in (step.counts or {}).items())
                table.add_row(step.store, step.state, counts, step.detail, _when(step.finished_at))
            console.print(table)
        if request.export_path:
            console.print(f"export (personal data, mode 0600): {request.export_path}")
    if fail and request.state != "done":
        err.print(f"request {request.id} is {request.state}: {request.error or 'not run yet'}")
        raise typer.Exit(1)


def _submit_and_run(
    kind: requests.Kind,
    customer: int,
    law: str,
    identity: str,
    by: str | None,
    as_json: bool,
    changes: dict[str, str] | None = None,
) -> None:
    s = settings()
    request = requests.submit(
        s,
        kind,
        customer,
        law=law,  # type: ignore[arg-type]
        requested_by=_actor(by),
        source="cli",
        identity=identity,
        changes=changes,
    )
    if request.state == "received":
        request = requests.run(s, request.id)
    _show(request, as_json)


@command(request_app, "access")
def request_access(
    customer: CustomerOption,
    identity: IdentityOption,
    otp: Annotated[
        str,
        typer.Option(
            "--otp", help="Your current TOTP code (the export is personal data: second factor)"
        ),
    ],
    law: LawOption = "gdpr",
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Everything held about the subject, in one JSON export naming where each item came from."""
    operator = _actor(by)
    mfa.verify(settings(), operator, otp, source="cli", via="cli")
    _submit_and_run("access", customer, law, identity, operator, as_json)


@command(request_app, "rectify")
def request_rectify(
    customer: CustomerOption,
    identity: IdentityOption,
    set_: Annotated[
        list[str],
        typer.Option(
            "--set",
            help="FIELD=VALUE, repeatable: email, fullname, phone, username, or "
            "address:ROW_ID.line1 / address:ROW_ID.postalcode",
        ),
    ],
    law: LawOption = "gdpr",
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Correct the subject's data at the source; the pipelines carry it downstream."""
    changes = {}
    for item in set_:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise requests.RequestError(f"--set {item!r}: expected FIELD=VALUE")
        changes[field.strip()] = value
    _submit_and_run("rectify", customer, law, identity, by, as_json, changes)


@command(request_app, "erase")
def request_erase(
    customer: CustomerOption,
    identity: IdentityOption,
    law: LawOption = "gdpr",
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Erase the subject everywhere (financial records kept without identity; their key shredded
    last). Ends on_hold under a legal hold; a failed step is re-run by `privacy request run`."""
    _submit_and_run("erase", customer, law, identity, by, as_json)


@command(request_app, "opt-out")
def request_opt_out(
    customer: CustomerOption,
    identity: IdentityOption,
    law: LawOption = "ccpa",
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """CCPA: do not sell or share the subject's data (recorded in the consent registry)."""
    _submit_and_run("opt_out", customer, law, identity, by, as_json)


@command(request_app, "run")
def request_run(request_id: IdArgument, as_json: JsonOption = False) -> None:
    """Run a request's remaining steps (a failed one from its failed step, an on-hold erasure
    once its hold is released); a done one is shown as it is."""
    _show(requests.run(settings(), request_id), as_json)


@command(request_app, "show")
def request_show(request_id: IdArgument, as_json: JsonOption = False) -> None:
    """One request: its clock, state, steps and error."""
    # Showing a request that is not done is not a failure of `show`.
    _show(requests.get_request(settings(), request_id), as_json, fail=False)


@command(privacy_app, "requests")
def requests_list(
    state: Annotated[str | None, typer.Option("--state", help=", ".join(requests.STATES))] = None,
    customer: Annotated[int | None, typer.Option("--customer", min=1)] = None,
    as_json: JsonOption = False,
) -> None:
    """The data-subject requests, oldest first, with their deadlines."""
    found = requests.list_requests(settings(), state=state, customer_id=customer)
    if as_json:
        console.print_json(json.dumps([r.to_json() for r in found], default=str))
        return
    table = Table("id", "kind", "customer", "law", "state", "received", "due", "days left", "error")
    for r in found:
        table.add_row(
            str(r.id),
            r.kind,
            str(r.customer_id),
            r.law,
            r.state,
            _when(r.received_at),
            _when(r.due_at),
            "" if r.state in ("done", "refused") else str(r.days_left()),
            r.error or "",
        )
    console.print(table)


@command(privacy_app, "hold")
def hold(
    customer: CustomerOption,
    reason: Annotated[str, typer.Option("--reason", help="The case or authority (kept)")],
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Place a legal hold: erasures of the subject end on_hold, erasing nothing."""
    placed = requests.hold(settings(), customer, reason=reason, by=_actor(by))
    if as_json:
        console.print_json(json.dumps(placed.__dict__, default=str))
        return
    console.print(f"customer {customer} is under legal hold: {placed.reason}")


@command(privacy_app, "release")
def release(
    customer: CustomerOption,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Release the subject's legal hold (then `privacy request run ID` for an on-hold erasure)."""
    released = requests.release(settings(), customer, by=_actor(by))
    if as_json:
        console.print_json(json.dumps(released.__dict__, default=str))
        return
    console.print(f"customer {customer}'s legal hold is released ({released.reason})")
