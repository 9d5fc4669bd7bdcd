"""``/v1/auth/mfa``: the second factor (TOTP, security/mfa.py) of an SSO session.

- ``POST /enroll``: a new factor for the session's user: its secret and ``otpauth://`` URI, shown
  this once (an authenticator app scans the URI). Refused (409) over a confirmed factor: an
  administrator resets it first (``stripe-platform access mfa reset USER``).
- ``POST /confirm`` ``{"code": "123456"}``: the first code from the app makes the factor usable.
- ``POST /verify`` ``{"code": "123456"}``: the step-up. A correct code marks the session verified
  now; for the policy's ``mfa.step_up_seconds`` the routes that reveal sensitive data
  (``require_clear`` in api/auth.py) answer it. A wrong or replayed code: 401 with its reason and
  the attempts left; too many: 429 with ``Retry-After`` and the time the factor unlocks.

Only sessions (a person logged in through SSO) have a second factor: API tokens get 403.
Refusals answer ``{"detail": {"reason": "<code>", "message": "...", ...}}`` like api/auth.py.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field, StringConstraints

from stripe_platform.api.auth import AUTH_RESPONSES, REALM, Principal, principal, refuse
from stripe_platform.security import mfa, sessions
from stripe_platform.security.keys import KeyError_
from stripe_platform.security.policy import load_policy

if TYPE_CHECKING:
    from stripe_platform.config import Settings

router = APIRouter(prefix="/v1/auth/mfa", tags=["auth"])

# Reason -> HTTP status. Wrong codes say "who you are" is not proven (401); a factor in the wrong
# state for the operation is a conflict (409); a lockout is a rate limit (429, Retry-After).
STATUS = {
    "mfa_wrong_code": 401,
    "mfa_replayed_code": 401,
    "mfa_locked": 429,
    "mfa_not_enrolled": 409,
    "mfa_not_confirmed": 409,
    "mfa_already_enrolled": 409,
    "mfa_already_confirmed": 409,
    "bad_user": 400,
}


class CodeRequest(BaseModel):
    code: Annotated[
        str,
        StringConstraints(min_length=1, max_length=16),
        Field(description="The 6 digits the authenticator app shows now", examples=["123456"]),
    ]


class Enrolment(BaseModel):
    user: str
    secret: str = Field(description="Base32 secret, for apps without a camera: shown this once")
    otpauth_uri: str = Field(description="otpauth://totp/... for the app to scan: shown once")
    message: str


class Confirmed(BaseModel):
    user: str
    confirmed: bool
    message: str


class StepUp(BaseModel):
    user: str
    mfa_verified_at: dt.datetime
    step_up_until: dt.datetime = Field(
        description="Until then the session may call the routes that need a second factor"
    )


class MfaRefusal(BaseModel):
    reason: str
    message: str
    remaining: int | None = Field(None, description="Wrong codes left before the factor locks")
    until: dt.datetime | None = Field(None, description="When a locked factor unlocks")


class MfaProblem(BaseModel):
    detail: MfaRefusal


RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    401: {
        "model": MfaProblem,
        "description": "No valid session, or a wrong or replayed code (reason, attempts left)",
    },
    409: {"model": MfaProblem, "description": "The factor is not in the state this needs"},
    429: {"model": MfaProblem, "description": "Locked after too many wrong codes (until when)"},
}


def _settings(request: Request) -> Settings:
    return request.app.state.services.settings


def session_principal(request: Request, who: Annotated[Principal, Depends(principal)]) -> Principal:
    """The caller, who must be a person's session: a token has no second factor."""
    if who.via != "session" or who.session_id is None:
        raise refuse(
            request, 403, "interactive_session_required",
            "a second factor belongs to a person's SSO session (GET /saml/login); "
            "API tokens cannot enrol or step up",
            kind="authz", user=who.user, via=who.via,
        )  # fmt: skip
    return who


def _refusal(exc: mfa.MfaError, now: dt.datetime) -> HTTPException:
    body: dict[str, Any] = {"reason": exc.reason, "message": str(exc)}
    status = STATUS.get(exc.reason, 400)
    headers = None
    if exc.remaining is not None:
        body["remaining"] = exc.remaining
    if isinstance(exc, mfa.MfaLocked):
        body["until"] = exc.until.isoformat()
        headers = {"Retry-After": str(max(1, math.ceil((exc.until - now).total_seconds())))}
    elif status == 401:  # the step-up is still owed (RFC 9470's challenge, as api/auth.py)
        headers = {
            "WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_user_authentication"'
        }
    return HTTPException(status, body, headers=headers)


def _unreadable(exc: KeyError_) -> HTTPException:
    # The stored secret does not decrypt (altered, or its key unavailable): nothing the user can
    # fix by retrying with another code.
    return HTTPException(
        503,
        {
            "reason": "mfa_unavailable",
            "message": f"the MFA factor cannot be read now ({exc}); if it persists an "
            "administrator resets it (`stripe-platform access mfa reset USER`)",
        },
    )


@router.post(
    "/enroll",
    summary="Enrol a TOTP second factor",
    description="A new factor for the session's user; the secret and its otpauth:// URI are "
    "shown this once. Confirm it with POST /v1/auth/mfa/confirm.",
    responses=RESPONSES,
)
def enroll(
    request: Request, response: Response, who: Annotated[Principal, Depends(session_principal)]
) -> Enrolment:
    try:
        enrolment = mfa.enroll(_settings(request), who.user, source=who.source_ip, via=who.via)
    except mfa.MfaError as exc:
        raise _refusal(exc, dt.datetime.now(dt.UTC)) from None
    response.headers["Cache-Control"] = "no-store"  # a secret: no cache keeps this answer
    return Enrolment(
        user=enrolment.user,
        secret=enrolment.secret,
        otpauth_uri=enrolment.uri,
        message="scan the URI with an authenticator app (or type the secret), then confirm with "
        "its code: neither is shown again",
    )


@router.post(
    "/confirm",
    summary="Confirm the enrolment with a first code",
    responses=RESPONSES,
)
def confirm(
    request: Request, body: CodeRequest, who: Annotated[Principal, Depends(session_principal)]
) -> Confirmed:
    now = dt.datetime.now(dt.UTC)
    try:
        mfa.confirm(_settings(request), who.user, body.code, now, source=who.source_ip, via=who.via)
    except mfa.MfaError as exc:
        raise _refusal(exc, now) from None
    except KeyError_ as exc:
        raise _unreadable(exc) from None
    return Confirmed(
        user=who.user,
        confirmed=True,
        message="the factor is ready: POST /v1/auth/mfa/verify with the app's next code to step up",
    )


@router.post(
    "/verify",
    summary="Step up: prove the second factor",
    description="A correct code marks the session verified now: for the policy's "
    "mfa.step_up_seconds it may call the routes that reveal sensitive data.",
    responses=RESPONSES,
)
def verify(
    request: Request, body: CodeRequest, who: Annotated[Principal, Depends(session_principal)]
) -> StepUp:
    settings = _settings(request)
    now = dt.datetime.now(dt.UTC)
    try:
        mfa.verify(settings, who.user, body.code, now, source=who.source_ip, via=who.via)
    except mfa.MfaError as exc:
        raise _refusal(exc, now) from None
    except KeyError_ as exc:
        raise _unreadable(exc) from None
    assert who.session_id is not None  # session_principal
    try:
        sessions.mark_step_up(settings, who.session_id, now)
    except sessions.CredentialStoreError as exc:  # revoked meanwhile
        raise HTTPException(
            401,
            {"reason": "invalid_session", "message": f"{exc}: log in again"},
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
        ) from None
    window = load_policy(settings).mfa.step_up_seconds
    return StepUp(
        user=who.user, mfa_verified_at=now, step_up_until=now + dt.timedelta(seconds=window)
    )
