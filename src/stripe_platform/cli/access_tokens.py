"""`access token issue|list|revoke`: the API's bearer tokens (security/sessions.py).

A token belongs to a user of the access policy provisioned on the API (`api` in its stores); it
never outlives the user's `until`. Its roles are the user's (or fewer, with --role), and at each
request the API keeps only those the policy still grants: a policy change or an expiry applies at
once, whatever the token says. The secret is printed once; only its SHA-256 digest is stored.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.audit import access_log
from stripe_platform.cli.access import access_app
from stripe_platform.cli.common import command, console, err, settings
from stripe_platform.errors import PlatformError
from stripe_platform.security import sessions
from stripe_platform.security.access import operator
from stripe_platform.security.policy import Policy, User, load_policy

DEFAULT_DAYS = 30  # a token without --expires/--days (never past the user's `until`)
MAX_DAYS = 366  # a token lives a year at most: machines rotate theirs

token_app = typer.Typer(
    help="API bearer tokens: issue (the secret is shown once), list, revoke.",
    no_args_is_help=True,
)
access_app.add_typer(token_app, name="token")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]


class TokenRefused(PlatformError, ValueError):
    """A token cannot be issued as asked; the message says why and where in the policy."""


def _state(token: sessions.TokenInfo, now: dt.datetime) -> str:
    if token.revoked_at is not None:
        return "revoked"
    return "expired" if token.expires_at <= now else "usable"


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


def _user(policy: Policy, name: str, now: dt.datetime) -> User:
    entry = policy.users.get(name.lower())
    if entry is None:
        known = ", ".join(u for u, e in sorted(policy.users.items()) if "api" in e.stores)
        raise TokenRefused(
            f"{name} is not a user of the access policy ({policy.source}); users on the API: "
            f"{known or 'none'}"
        )
    if "api" not in entry.stores:
        raise TokenRefused(
            f"user {entry.name} is not provisioned on the API ({policy.where(entry.line)}: "
            f"stores {', '.join(sorted(entry.stores))}): add `api` to its stores first"
        )
    if not entry.active(now):
        assert entry.until is not None
        raise TokenRefused(
            f"the access of {entry.name} ended at {_when(entry.until)} ({policy.where(entry.line)})"
        )
    return entry


def _expiry(
    entry: User, policy: Policy, expires: str | None, days: int | None, now: dt.datetime
) -> dt.datetime:
    if expires is not None and days is not None:
        raise TokenRefused("give --expires or --days, not both")
    if expires is not None:
        try:
            if len(expires) == 10:  # a date: through that day (UTC), as the policy reads `until`
                day = dt.date.fromisoformat(expires)
                at = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
            else:
                at = dt.datetime.fromisoformat(expires)
        except ValueError:
            raise TokenRefused(
                f"--expires {expires!r}: a date (YYYY-MM-DD) or an ISO time with its zone"
            ) from None
        if at.tzinfo is None:
            raise TokenRefused(f"--expires {expires!r}: give the time zone (Z or +hh:mm)")
    else:
        at = now + dt.timedelta(days=DEFAULT_DAYS if days is None else days)
    at = at.astimezone(dt.UTC)
    if at <= now:
        raise TokenRefused(f"the expiry {_when(at)} has passed already")
    if at > now + dt.timedelta(days=MAX_DAYS):
        raise TokenRefused(f"a token lives {MAX_DAYS} days at most (asked: until {_when(at)})")
    if entry.until is not None and at > entry.until:
        if expires is None and days is None:
            return entry.until  # the default shortened to the user's end
        raise TokenRefused(
            f"the token would outlive the access of {entry.name}, which ends at "
            f"{_when(entry.until)} ({policy.where(entry.line)}): expire it on or before that"
        )
    return at


@command(token_app, "issue")
def token_issue(
    user: Annotated[str, typer.Option("--user", help="A user of the access policy on the API")],
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="Last day (YYYY-MM-DD, through that day UTC) or ISO time"),
    ] = None,
    days: Annotated[
        int | None, typer.Option("--days", min=1, help=f"Days from now (default {DEFAULT_DAYS})")
    ] = None,
    role: Annotated[
        list[str] | None,
        typer.Option("--role", help="Limit the token to these of the user's roles (repeatable)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Issue a bearer token for a policy user; the secret is printed once, never stored."""
    s, now = settings(), dt.datetime.now(dt.UTC)
    policy = load_policy(s)
    entry = _user(policy, user, now)
    roles = set(entry.roles)
    if role:
        extra = set(role) - roles
        if extra:
            raise TokenRefused(
                f"user {entry.name} does not hold {', '.join(sorted(extra))} "
                f"({policy.where(entry.line)}: roles {', '.join(entry.roles)})"
            )
        roles = set(role)
    scopes = sorted({scope for r in roles for scope in policy.roles[r].api})
    if not scopes:
        raise TokenRefused(
            f"the roles {', '.join(sorted(roles))} grant no API scope: the API would refuse the "
            "token everywhere"
        )
    expires_at = _expiry(entry, policy, expires, days, now)
    by, source = operator()
    token_id, secret = sessions.issue_token(
        s, user=entry.name, roles=roles, expires_at=expires_at, created_by=by
    )
    access_log.record(
        s,
        kind="admin",
        user=by,
        source=source,
        via="cli",
        resource=f"api/token/{token_id}",
        action="token.issue",
        outcome="allow",
        detail={"for": entry.name, "roles": sorted(roles), "expires_at": expires_at.isoformat()},
    )
    if as_json:
        console.print_json(
            data={
                "token_id": token_id,
                "user": entry.name,
                "roles": sorted(roles),
                "scopes": scopes,
                "expires_at": expires_at.isoformat(),
                "secret": secret,
            }
        )
        return
    console.print(
        f"token {token_id} for {entry.name} (roles {', '.join(sorted(roles))}; scopes "
        f"{', '.join(scopes)}), expires {_when(expires_at)}"
    )
    err.print("The secret is shown this once (only its digest is kept): store it now.")
    console.print(secret)


@command(token_app, "list")
def token_list(
    usable: Annotated[bool, typer.Option("--usable", help="Only tokens still usable")] = False,
    as_json: JsonOption = False,
) -> None:
    """The API tokens, newest first (never their secrets)."""
    s, now = settings(), dt.datetime.now(dt.UTC)
    tokens = sessions.list_tokens(s, usable_only=usable)
    if as_json:
        console.print_json(
            data=[
                {
                    "token_id": t.token_id,
                    "user": t.user,
                    "roles": sorted(t.roles),
                    "state": _state(t, now),
                    "created_by": t.created_by,
                    "created_at": t.created_at.isoformat(),
                    "expires_at": t.expires_at.isoformat(),
                    "last_used_at": t.last_used_at and t.last_used_at.isoformat(),
                    "revoked_at": t.revoked_at and t.revoked_at.isoformat(),
                    "revoked_by": t.revoked_by,
                }
                for t in tokens
            ]
        )
        return
    table = Table(title=f"API tokens ({len(tokens)})")
    for column in ("id", "user", "roles", "state", "expires", "last used", "issued by"):
        table.add_column(column)
    for t in tokens:
        table.add_row(
            t.token_id,
            t.user,
            ", ".join(sorted(t.roles)),
            _state(t, now),
            _when(t.expires_at),
            _when(t.last_used_at),
            t.created_by,
        )
    console.print(table)


@command(token_app, "revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (tok_...)")],
    as_json: JsonOption = False,
) -> None:
    """Revoke a token now (another API process sees it within a few seconds)."""
    s, (by, source) = settings(), operator()
    before = sessions.get_token(s, token_id)
    token = sessions.revoke_token(s, token_id, by=by, reason="revoked with the CLI")
    already = before is not None and before.revoked_at is not None
    if not already:
        access_log.record(
            s,
            kind="admin",
            user=by,
            source=source,
            via="cli",
            resource=f"api/token/{token_id}",
            action="token.revoke",
            outcome="allow",
            detail={"for": token.user},
        )
    if as_json:
        console.print_json(
            data={
                "token_id": token.token_id,
                "user": token.user,
                "revoked_at": token.revoked_at and token.revoked_at.isoformat(),
                "already_revoked": already,
            }
        )
        return
    if already:
        console.print(
            f"token {token_id} ({token.user}) was revoked already, at {_when(token.revoked_at)}"
        )
    else:
        console.print(f"revoked token {token_id} ({token.user})")
