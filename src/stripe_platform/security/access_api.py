"""The API target of `access plan|apply|expired|revoke-expired` (security/access.py).

What the API grants lives in its credentials (security/sessions.py): bearer tokens and SSO
sessions, each carrying roles. The API already decides every request against the policy as it is
then (api/auth.py), so drift here is not a hole: it is credentials that the policy no longer backs
and that should go rather than linger. The plan revokes:

- tokens of users no longer in the policy, or no longer on the API (`stores`), or carrying a role
  the user no longer holds, or outliving the user's `until` (moved earlier since issued);
- open sessions of users no longer on the API, or carrying a role the policy no longer grants them.

Expired access: usable tokens and sessions of policy users whose `until` passed. The API refuses
them at request time already; the row is still there until `access revoke-expired` revokes it.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from stripe_platform.audit import access_log
from stripe_platform.security import sessions
from stripe_platform.security.access import Change, ExpiredAccess, operator
from stripe_platform.security.policy import Policy, PolicyError, check_policy

if TYPE_CHECKING:
    from stripe_platform.config import Settings

NAME = "api"
REVOKE_TOKEN = "revoke_token"  # noqa: S105 - an action name
REVOKE_SESSION = "revoke_session"
REMEDY = "`stripe-platform access revoke-expired` revokes it (the API refuses it already)"


def _when(value: dt.datetime) -> str:
    return f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


def _token_drift(policy: Policy, token: sessions.TokenInfo, now: dt.datetime) -> str | None:
    """Why the policy no longer backs this usable token (None: it does, or it ended: expiry)."""
    entry = policy.users.get(token.user.lower())
    if entry is None:
        return f"user {token.user} is not in the access policy ({policy.source.name})"
    where = policy.where(entry.line)
    if "api" not in entry.stores:
        return f"user {entry.name} is not provisioned on the API ({where}: stores)"
    if not entry.active(now):
        return None  # expired access: `access expired` reports it
    lost = sorted(token.roles - sessions.policy_roles(policy, entry.name, (), now))
    if lost:
        return (
            f"the token carries {', '.join(lost)}, which the policy no longer grants "
            f"{entry.name} ({where})"
        )
    if entry.until is not None and token.expires_at > entry.until:
        return (
            f"the token expires {_when(token.expires_at)}, after the end of {entry.name}'s "
            f"access, {_when(entry.until)} ({where})"
        )
    return None


def _session_drift(policy: Policy, session: sessions.SessionInfo, now: dt.datetime) -> str | None:
    entry = policy.users.get(session.user.lower())
    if entry is not None:
        if "api" not in entry.stores:
            where = policy.where(entry.line)
            return f"user {entry.name} is not provisioned on the API ({where}: stores)"
        if not entry.active(now):
            return None  # expired access
    lost = sorted(session.roles - sessions.policy_roles(policy, session.user, session.groups, now))
    if lost:
        return f"the session carries {', '.join(lost)}, which the policy no longer grants"
    return None


def plan(settings: Settings, policy: Policy, now: dt.datetime) -> list[Change]:
    """Usable tokens and sessions the policy no longer backs: revoke them."""
    changes = []
    for token in sessions.list_tokens(settings, usable_only=True):
        why = _token_drift(policy, token, now)
        if why is not None:
            changes.append(
                Change(NAME, REVOKE_TOKEN, token.user, f"token {token.token_id}", None, why)
            )
    for session in sessions.list_sessions(settings, usable_only=True):
        why = _session_drift(policy, session, now)
        if why is not None:
            changes.append(
                Change(
                    NAME, REVOKE_SESSION, session.user, f"session {session.session_id}", None, why
                )
            )
    return changes


def _ids(changes: list[Change]) -> tuple[list[str], list[str]]:
    tokens, session_ids = [], []
    for change in changes:
        kind, _, ident = change.object.partition(" ")
        if change.action == REVOKE_TOKEN and kind == "token":
            tokens.append(ident)
        elif change.action == REVOKE_SESSION and kind == "session":
            session_ids.append(ident)
        else:
            raise ValueError(f"not a change of the API target: {change}")
    return tokens, session_ids


def apply(settings: Settings, policy: Policy, changes: list[Change]) -> list[Change]:
    """Revoke the tokens and sessions of ``changes`` in one transaction (all or nothing).
    Refused, nothing applied, when the policy grants access already ended."""
    problems = check_policy(policy, dt.datetime.now(dt.UTC))
    if problems:
        raise PolicyError(
            "access apply refused, nothing applied: the policy grants access already ended\n  "
            + "\n  ".join(problems)
        )
    mine = [c for c in changes if c.target == NAME]
    if not mine:
        return []
    tokens, session_ids = _ids(mine)
    user, source = operator()
    sessions.revoke_many(
        settings, tokens=tokens, session_ids=session_ids, by=user, reason="access apply"
    )
    access_log.record(
        settings, kind="admin", user=user, source=source, resource="api:credentials",
        action="access.apply", outcome="allow", via="cli",
        detail={"tokens": tokens, "sessions": [s[:12] for s in session_ids],
                "reasons": [c.reason for c in mine]},
    )  # fmt: skip
    return mine


def _expired(
    settings: Settings, policy: Policy, now: dt.datetime
) -> list[tuple[ExpiredAccess, str, str]]:
    """(found, "token"|"session", id) for each usable credential of a user whose access ended."""
    found = []

    def ended(user: str) -> dt.datetime | None:
        entry = policy.users.get(user.lower())
        if entry is None or entry.active(now):
            return None
        return entry.until

    for token in sessions.list_tokens(settings, usable_only=True):
        until = ended(token.user)
        if until is not None:
            still = (
                f"token {token.token_id} not revoked (valid until {_when(token.expires_at)}): "
                "refused at request time, row still present"
            )
            found.append(
                (ExpiredAccess(NAME, token.user, until, still, REMEDY), "token", token.token_id)
            )
    for session in sessions.list_sessions(settings, usable_only=True):
        until = ended(session.user)
        if until is not None:
            still = (
                f"{session.via} session {session.session_id[:12]} open (until "
                f"{_when(session.expires_at)}): refused at request time, row still present"
            )
            found.append(
                (
                    ExpiredAccess(NAME, session.user, until, still, REMEDY),
                    "session",
                    session.session_id,
                )
            )
    return found


def expired(settings: Settings, policy: Policy, now: dt.datetime) -> list[ExpiredAccess]:
    """Tokens and sessions not revoked of users whose `until` passed."""
    return [found for found, _, _ in _expired(settings, policy, now)]


def revoke_expired(settings: Settings, policy: Policy, now: dt.datetime) -> list[ExpiredAccess]:
    """Revoke them (one transaction); returns what was revoked."""
    found = _expired(settings, policy, now)
    if not found:
        return []
    user, source = operator()
    tokens = [ident for _, kind, ident in found if kind == "token"]
    session_ids = [ident for _, kind, ident in found if kind == "session"]
    sessions.revoke_many(
        settings, tokens=tokens, session_ids=session_ids, by=user, reason="access ended"
    )
    access_log.record(
        settings, kind="admin", user=user, source=source, resource="api:credentials",
        action="access.revoke_expired", outcome="allow", via="cli",
        detail={"tokens": tokens, "sessions": [s[:12] for s in session_ids]},
    )  # fmt: skip
    return [
        ExpiredAccess(f.target, f.principal, f.ended_at, f.still, remedy="revoked")
        for f, _, _ in found
    ]
