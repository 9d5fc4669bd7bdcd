"""`access mfa enroll|confirm|reset|status`: the TOTP second factors (security/mfa.py).

An administrator enrols a user here (or the user enrols in the API: POST /v1/auth/mfa/enroll):
the otpauth:// URI and the secret are printed once, for the user's authenticator app; the
database keeps the secret encrypted. `confirm` takes the app's first code; `reset` destroys a
factor (a lost phone, a lockout to lift) so the user enrols again; `status` never shows a secret.
"""

from __future__ import annotations

import datetime as dt
import getpass
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.cli.access import access_app
from stripe_platform.cli.common import command, console, err, settings
from stripe_platform.security import mfa

mfa_app = typer.Typer(
    help="TOTP second factors: enroll (the secret is shown once), confirm, reset, status.",
    no_args_is_help=True,
)
access_app.add_typer(mfa_app, name="mfa")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]
UserArgument = Annotated[str, typer.Argument(help="The user (the SSO login name)")]


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return "unknown"


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@command(mfa_app, "enroll")
def mfa_enroll(user: UserArgument, as_json: JsonOption = False) -> None:
    """A new factor for USER: prints its otpauth:// URI and secret, once. Confirm it with the
    app's first code (`access mfa confirm USER CODE`)."""
    enrolment = mfa.enroll(settings(), user, source="cli", via="cli")
    err.print(
        "The secret is shown this once (the database keeps it encrypted): hand it to "
        f"{enrolment.user} privately, then confirm with the first code of their app."
    )
    if as_json:
        console.print_json(
            data={"user": enrolment.user, "otpauth_uri": enrolment.uri, "secret": enrolment.secret}
        )
        return
    console.print(enrolment.uri)
    console.print(f"secret: {enrolment.secret}")


@command(mfa_app, "confirm")
def mfa_confirm(
    user: UserArgument,
    code: Annotated[str, typer.Argument(help="The 6 digits the app shows now")],
    as_json: JsonOption = False,
) -> None:
    """Confirm USER's pending factor with a code from their app."""
    mfa.confirm(settings(), user, code, source="cli", via="cli")
    if as_json:
        console.print_json(data={"user": user, "confirmed": True})
        return
    console.print(f"{user}'s MFA factor is confirmed")


@command(mfa_app, "reset")
def mfa_reset(user: UserArgument, as_json: JsonOption = False) -> None:
    """Destroy USER's factor (secret erased, lock lifted): they enrol again."""
    by = _actor()
    mfa.reset(settings(), user, by, source="cli", via="cli")
    if as_json:
        console.print_json(data={"user": user, "reset_by": by})
        return
    console.print(f"{user}'s MFA factor is reset (by {by}): they enrol again")


@command(mfa_app, "status")
def mfa_status(
    user: Annotated[str | None, typer.Argument(help="One user (default: all)")] = None,
    as_json: JsonOption = False,
) -> None:
    """The factors: state, last verification, failures, lock, reset. Never a secret."""
    factors = mfa.status(settings(), user)
    if as_json:
        console.print_json(
            data=[
                {
                    "user": f.user,
                    "state": f.state,
                    "enrolled_at": _iso(f.enrolled_at),
                    "confirmed_at": _iso(f.confirmed_at),
                    "last_verified_at": _iso(f.last_verified_at),
                    "failures": f.failures,
                    "locked_until": _iso(f.locked_until),
                    "reset_at": _iso(f.reset_at),
                    "reset_by": f.reset_by,
                }
                for f in factors
            ]
        )
        return
    if user is not None and not factors:
        console.print(f"{user} has no MFA factor")
        return
    table = Table(title=f"MFA factors ({len(factors)})")
    for column in ("user", "state", "confirmed", "last verified", "failures", "locked until"):
        table.add_column(column)
    for f in factors:
        table.add_row(
            f.user,
            f.state,
            _when(f.confirmed_at),
            _when(f.last_verified_at),
            str(f.failures),
            _when(f.locked_until),
        )
    console.print(table)
