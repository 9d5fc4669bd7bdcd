"""The one place the API authenticates and authorises (issue 21, docs/access.md).

Routes declare what they need as dependencies:

- :func:`principal`: who calls, from the ``sp_session`` cookie (an SSO session) or an
  ``Authorization: Bearer`` token (machines). 401 with ``WWW-Authenticate`` without valid ones.
- :func:`require_scope` (``Depends(require_scope("fraud.score"))``): the caller's roles grant the
  API scope, else 403.
- :func:`require_clear` (``Depends(require_clear("pii"))``, ``bulk=True`` for bulk exports): the
  roles may read those data classes in clear (else 403) and, where the policy's MFA rules ask for
  it, the session passed a second factor within ``mfa.step_up_seconds`` (else 401 with reason
  ``mfa_required``). Tokens cannot step up: 403 ``interactive_session_required``.

Refusals answer ``{"detail": {"reason": "<code>", "message": "<what and what to do>"}}``.

Roles are decided at request time: the roles a session or token carries, intersected with what
the access policy grants the user now (``Policy.roles_for``), so a policy change or the end of a
temporary grant takes effect at the next request. A policy user past its ``until`` is refused
whatever else it holds. Every decision goes to the access log; ``request.state.principal`` is set
for the request log.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from stripe_platform.audit import access_log
from stripe_platform.governance.classification import DataClass
from stripe_platform.security import sessions
from stripe_platform.security.policy import API_SCOPES, Policy, PolicyError, load_policy

if TYPE_CHECKING:
    from fastapi import Response

    from stripe_platform.config import Settings

log = logging.getLogger(__name__)
REALM = "stripe-platform"

Reason = Literal[
    "no_credentials",  # neither a session cookie nor a bearer token
    "invalid_token",  # unknown, expired or revoked bearer token
    "invalid_session",  # unknown, expired or revoked session
    "access_expired",  # the policy user's `until` passed
    "access_ended",  # the token's user is no longer in the policy
    "no_api_access",  # the policy user is not provisioned on the API (stores)
    "no_role",  # none of the credential's roles is granted by the policy any more
    "missing_scope",
    "not_cleared",  # the roles may not read these data classes in clear
    "mfa_required",  # a fresh second factor is needed (POST /v1/auth/mfa/verify)
    "interactive_session_required",  # a token on a route that needs a second factor
]


class AuthRefusal(BaseModel):
    reason: Reason
    message: str


class AuthProblem(BaseModel):
    """Why the API refused the caller (401: who; 403: what)."""

    detail: AuthRefusal


# For routes' `responses=`: what the auth dependencies may answer.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "model": AuthProblem,
        "description": "No valid credentials (session cookie or bearer token), an access that "
        "ended, or a fresh second factor needed (reason `mfa_required`)",
    },
    403: {"model": AuthProblem, "description": "Authenticated, not allowed: the reason says why"},
}


@dataclass(frozen=True)
class Principal:
    user: str
    roles: frozenset[str]  # as the policy grants them now
    via: str  # "session" | "token"
    session_id: str | None  # sha256 hex of the session's cookie (None for a token)
    mfa_verified_at: dt.datetime | None
    source_ip: str | None
    token_id: str | None = None
    login: str | None = None  # how the session was opened ("saml", ...)


# Documentation (the OpenAPI security schemes) and extraction; the checks are ours below.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearerToken",
    description="An API token (`stripe-platform access token issue`): `Authorization: Bearer "
    "spt_...`. For machines; cannot step up with a second factor.",
)
_cookie = APIKeyCookie(
    name=sessions.SESSION_COOKIE,
    auto_error=False,
    scheme_name="ssoSession",
    description="The SSO session set by `POST /saml/acs` after a SAML login (`GET /saml/login`).",
)


def _settings(request: Request) -> Settings:
    return request.app.state.services.settings


def _source(request: Request) -> str | None:
    return request.client.host if request.client else None


def refuse(
    request: Request,
    status: int,
    reason: Reason,
    message: str,
    *,
    kind: str,
    user: str | None = None,
    via: str | None = None,
    detail: dict | None = None,
) -> HTTPException:
    """The refusal, logged."""
    access_log.record(
        _settings(request),
        kind=kind,
        user=user,
        source=_source(request),
        resource=request.url.path,
        action=request.method,
        outcome="deny",
        reason=f"{reason}: {message}",
        via=via,
        detail=detail,
    )
    headers = None
    if status == 401:
        challenge = f'Bearer realm="{REALM}"'
        if reason == "mfa_required":  # RFC 9470's step-up challenge
            challenge += ', error="insufficient_user_authentication"'
        elif reason != "no_credentials":
            challenge += ', error="invalid_token"'
        headers = {"WWW-Authenticate": challenge}
    return HTTPException(status, {"reason": reason, "message": message}, headers=headers)


def _policy(request: Request) -> Policy:
    """The policy of this request: read once (cached by the file's mtime) and kept for it."""
    policy = getattr(request.state, "access_policy", None)
    if policy is not None:
        return policy
    try:
        request.state.access_policy = policy = load_policy(_settings(request))
        return policy
    except PolicyError as exc:  # fail closed, say why (the operator fixes the file)
        access_log.record(
            _settings(request),
            kind="authz",
            user=None,
            source=_source(request),
            resource=request.url.path,
            action=request.method,
            outcome="error",
            reason=str(exc),
        )
        log.error("access decisions refused: %s", exc)
        # The client learns that, not the server's paths: the operator reads the log.
        raise HTTPException(
            503, "the access policy cannot be read: every request is refused until it is fixed"
        ) from None


def _unavailable(request: Request, exc: sessions.CredentialStoreError) -> HTTPException:
    access_log.record(
        _settings(request),
        kind="authn",
        user=None,
        source=_source(request),
        resource=request.url.path,
        action=request.method,
        outcome="error",
        reason=str(exc),
    )
    log.error("credentials cannot be checked: %s", exc)
    return HTTPException(503, "credentials cannot be checked now: try again later")


async def principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> Principal:
    """Who calls: a bearer token if one is sent, else the session cookie. 401 otherwise.

    A credential resolved in the last seconds is decided in memory, on the event loop; otherwise
    on the thread pool (one database read)."""
    if bearer is None and not cookie:
        raise refuse(
            request,
            401,
            "no_credentials",
            "send `Authorization: Bearer <token>` (`stripe-platform access token issue`) or log "
            "in through SSO (GET /saml/login)",
            kind="authn",
        )
    secret = bearer.credentials if bearer is not None else cookie or ""
    via = "token" if bearer is not None else "session"
    if sessions.in_memory(secret):
        return _authenticate(request, secret, via)
    return await run_in_threadpool(_authenticate, request, secret, via)


def _authenticate(request: Request, secret: str, via: str) -> Principal:
    now = dt.datetime.now(dt.UTC)
    policy = _policy(request)
    try:
        if via == "token":
            found = _from_token(request, policy, secret, now)
        else:
            found = _from_session(request, policy, secret, now)
    except sessions.CredentialStoreError as exc:
        raise _unavailable(request, exc) from None
    who = replace(found, source_ip=_source(request))
    request.state.principal = who
    return who


def _from_token(request: Request, policy: Policy, secret: str, now: dt.datetime) -> Principal:
    info = sessions.lookup_token(_settings(request), secret)
    if info is None:
        raise refuse(
            request, 401, "invalid_token", "unknown bearer token", kind="authn", via="token"
        )
    refused = info.refusal(now)
    if refused is not None:
        raise refuse(
            request, 401, "invalid_token", refused, kind="authn", user=info.user, via="token",
            detail={"token_id": info.token_id},
        )  # fmt: skip
    if info.user.lower() not in policy.users:
        raise refuse(
            request, 401, "access_ended",
            f"user {info.user} is no longer in the access policy ({policy.source.name})",
            kind="authn", user=info.user, via="token", detail={"token_id": info.token_id},
        )  # fmt: skip
    roles = _roles(request, policy, info.user, info.roles, (), now, via="token")
    return Principal(
        user=info.user,
        roles=roles,
        via="token",
        session_id=None,
        mfa_verified_at=None,
        source_ip=None,
        token_id=info.token_id,
    )


def _from_session(request: Request, policy: Policy, token: str, now: dt.datetime) -> Principal:
    info = sessions.lookup_session(_settings(request), token)
    if info is None:
        raise refuse(
            request, 401, "invalid_session", "unknown session: log in again (GET /saml/login)",
            kind="authn", via="session",
        )  # fmt: skip
    refused = info.refusal(now)
    if refused is not None:
        raise refuse(
            request, 401, "invalid_session", f"{refused}: log in again (GET /saml/login)",
            kind="authn", user=info.user, via="session",
            detail={"session": info.session_id[:12]},
        )  # fmt: skip
    roles = _roles(request, policy, info.user, info.roles, info.groups, now, via="session")
    return Principal(
        user=info.user,
        roles=roles,
        via="session",
        session_id=info.session_id,
        mfa_verified_at=info.mfa_verified_at,
        source_ip=None,
        login=info.via,
    )


def _roles(
    request: Request,
    policy: Policy,
    user: str,
    carried: frozenset[str],
    groups: frozenset[str] | tuple[()] | None,
    now: dt.datetime,
    *,
    via: str,
) -> frozenset[str]:
    """The credential's roles the policy still grants ``user`` at ``now``
    (sessions.policy_roles); refused when the policy user's access ended or is not on the API."""
    entry = policy.users.get(user.lower())
    if entry is not None and not entry.active(now):
        assert entry.until is not None
        raise refuse(
            request, 401, "access_expired",
            f"the access of {user} ended at {entry.until:%Y-%m-%d %H:%M} UTC "
            f"({policy.source.name}:{entry.line})",
            kind="authn", user=user, via=via,
        )  # fmt: skip
    if entry is not None and "api" not in entry.stores:
        raise refuse(
            request, 403, "no_api_access",
            f"user {user} is not provisioned on the API (stores of {policy.source.name}:{entry.line})",
            kind="authn", user=user, via=via,
        )  # fmt: skip
    roles = carried & sessions.policy_roles(policy, user, groups, now)
    if not roles:
        raise refuse(
            request, 403, "no_role",
            f"none of the roles of this credential ({', '.join(sorted(carried))}) is granted to "
            f"{user} by the access policy now",
            kind="authn", user=user, via=via,
        )  # fmt: skip
    return roles


def _allow(request: Request, who: Principal, detail: dict) -> None:
    access_log.record(
        _settings(request),
        kind="authz",
        user=who.user,
        source=who.source_ip,
        resource=request.url.path,
        action=request.method,
        outcome="allow",
        via=who.via,
        detail={"roles": sorted(who.roles), **detail},
    )


def require_scope(scope: str) -> Callable[..., Principal]:
    """A dependency: the caller's roles grant the API ``scope`` (403 otherwise)."""
    if scope not in API_SCOPES:  # a typo in a route fails at import, not at request time
        raise ValueError(f"unknown API scope {scope!r}; known: {', '.join(sorted(API_SCOPES))}")

    async def check(request: Request, who: Annotated[Principal, Depends(principal)]) -> Principal:
        policy = _policy(request)
        if not policy.has_scope(who.roles, scope):
            raise refuse(
                request, 403, "missing_scope",
                f"{who.user} (roles {', '.join(sorted(who.roles))}) lacks the scope {scope}",
                kind="authz", user=who.user, via=who.via,
                detail={"scope": scope, "roles": sorted(who.roles)},
            )  # fmt: skip
        _allow(request, who, {"scope": scope})
        return who

    check.__name__ = f"require_scope_{scope.replace('.', '_')}"
    return check


_DATA_CLASSES = frozenset(c.value for c in DataClass)


def require_clear(*data_classes: str, bulk: bool = False) -> Callable[..., Principal]:
    """A dependency: the caller may read ``data_classes`` in clear (403 otherwise) and, where the
    policy's MFA rules ask (those classes, or ``bulk`` exports), passed a second factor within
    ``mfa.step_up_seconds`` in this session (401 ``mfa_required``; tokens: 403)."""
    unknown = set(data_classes) - _DATA_CLASSES
    if unknown:
        raise ValueError(
            f"unknown data class(es) {', '.join(sorted(unknown))}; known: "
            f"{', '.join(sorted(_DATA_CLASSES))}"
        )
    classes = tuple(data_classes)

    async def check(request: Request, who: Annotated[Principal, Depends(principal)]) -> Principal:
        policy = _policy(request)
        what = {"classes": list(classes), "bulk": bulk}
        hidden = [c for c in classes if not policy.may_read_clear(who.roles, c)]
        if hidden:
            raise refuse(
                request, 403, "not_cleared",
                f"{who.user} (roles {', '.join(sorted(who.roles))}) may not read "
                f"{', '.join(hidden)} data in clear",
                kind="authz", user=who.user, via=who.via, detail=what,
            )  # fmt: skip
        if policy.needs_step_up(classes, bulk=bulk):
            window = policy.mfa.step_up_seconds
            if who.via != "session":
                raise refuse(
                    request, 403, "interactive_session_required",
                    "an interactive session with MFA is required (SSO login, then "
                    "POST /v1/auth/mfa/verify); API tokens cannot step up",
                    kind="authz", user=who.user, via=who.via, detail=what,
                )  # fmt: skip
            now = dt.datetime.now(dt.UTC)
            verified = who.mfa_verified_at
            if verified is None or (now - verified).total_seconds() > window:
                when = "never" if verified is None else f"at {verified:%H:%M:%S} UTC"
                raise refuse(
                    request, 401, "mfa_required",
                    f"a second factor within the last {window} s is required (last verified "
                    f"{when}): POST /v1/auth/mfa/verify",
                    kind="authz", user=who.user, via=who.via, detail=what,
                )  # fmt: skip
            what["mfa_verified_at"] = verified.isoformat()
        _allow(request, who, what)
        return who

    check.__name__ = f"require_clear_{'_'.join(classes) or 'none'}{'_bulk' if bulk else ''}"
    return check


# -- the session cookie (set by the SSO login, cleared by logout) ---------------------------------
def set_session_cookie(response: Response, token: str, settings: Settings) -> None:
    response.set_cookie(
        sessions.SESSION_COOKIE,
        token,
        max_age=settings.api_session_seconds,
        path="/",
        secure=True,
        httponly=True,
        samesite="lax",
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(
        sessions.SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="lax"
    )
