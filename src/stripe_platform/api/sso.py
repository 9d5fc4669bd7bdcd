"""Single sign-on: the API as a SAML 2.0 service provider (security/saml.py does the SAML).

- ``GET /saml/metadata``: the SP's metadata (entity id, ACS URL, signing certificate), for the IdP.
- ``GET /saml/login?next=/path``: redirects the browser to the IdP with a signed AuthnRequest.
- ``POST /saml/acs``: the IdP's answer (HTTP-POST). A valid assertion whose user the access policy
  grants a role (``Policy.roles_for``: the policy's own users and the IdP groups it maps) opens a
  session: the ``sp_session`` cookie (Secure, HttpOnly, SameSite=Lax), then 303 to ``next``.
  Anything else: refused with the reason, logged, no session.
- ``GET /saml/session``: who this browser's session is (401 without one).
- ``POST /saml/logout``: ends this browser's session.

Without ``STRIPE_PLATFORM_SAML_IDP_METADATA`` the login routes answer 503 saying so (the SP
metadata is still served: the IdP needs it before it can be set up). Every login outcome goes to
the access log (kind ``authn``, via ``saml``); the SAMLResponse itself never does.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Cookie, Depends, Form, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel

from stripe_platform.api.auth import (
    AUTH_RESPONSES,
    Principal,
    clear_session_cookie,
    principal,
    set_session_cookie,
)
from stripe_platform.audit import access_log
from stripe_platform.security import saml, sessions
from stripe_platform.security.policy import PolicyError, load_policy

if TYPE_CHECKING:
    from stripe_platform.config import Settings

router = APIRouter(prefix="/saml", tags=["sso"])

# The cookie that ties the IdP's answer to the browser that asked for the login. The answer is a
# cross-site POST from the IdP, which carries only SameSite=None cookies; its path keeps it to the
# SSO routes (the login reads it too: one value per browser, so two tabs logging in both work).
BROWSER_COOKIE = "sp_saml_browser"
BROWSER_COOKIE_PATH = "/saml"
ACS_PATH = "/saml/acs"


class Refusal(BaseModel):
    reason: str
    message: str


class SamlProblem(BaseModel):
    """Why the login was refused."""

    detail: Refusal


class SessionView(BaseModel):
    user: str
    roles: list[str]
    via: str  # "session" | "token"
    login: str | None  # how the session was opened ("saml")
    mfa_verified_at: dt.datetime | None


class LogoutResult(BaseModel):
    logged_out: bool  # False: there was no session to end


def _settings(request: Request) -> Settings:
    return request.app.state.services.settings


def _source(request: Request) -> str | None:
    return request.client.host if request.client else None


def _problem(error: saml.SamlError) -> JSONResponse:
    return JSONResponse(
        {"detail": {"reason": error.reason, "message": str(error)}}, status_code=error.status
    )


@router.get(
    "/metadata",
    summary="The service provider's SAML metadata (for the identity provider)",
    response_class=Response,
    responses={200: {"content": {"application/samlmetadata+xml": {}}}, 503: {"model": SamlProblem}},
)
def metadata(request: Request) -> Response:
    try:
        xml = saml.sp_metadata(_settings(request))
    except saml.SamlError as exc:
        return _problem(exc)
    return Response(xml, media_type="application/samlmetadata+xml")


@router.get(
    "/login",
    summary="Log in through the identity provider (redirects there)",
    response_class=RedirectResponse,
    status_code=303,
    responses={503: {"model": SamlProblem, "description": "SSO is not configured"}},
)
def login(
    request: Request,
    next_path: Annotated[
        str, Query(alias="next", description="A path on this site to return to")
    ] = "/",
    browser: Annotated[str | None, Cookie(alias=BROWSER_COOKIE)] = None,
) -> Response:
    settings = _settings(request)
    # One random value per browser, kept across logins (two tabs logging in at once both work).
    token = browser if browser and len(browser) == 43 else saml.new_browser_token()
    try:
        started = saml.start_login(
            settings, next_path=next_path, browser_token=token, source_ip=_source(request)
        )
    except saml.SamlError as exc:
        return _problem(exc)
    response = RedirectResponse(started.redirect_url, status_code=303)
    response.set_cookie(
        BROWSER_COOKIE,
        token,
        max_age=saml.REQUEST_SECONDS,
        path=BROWSER_COOKIE_PATH,
        secure=True,
        httponly=True,
        samesite="none",
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post(
    "/acs",
    summary="The identity provider's answer (HTTP-POST binding): opens a session",
    response_class=RedirectResponse,
    status_code=303,
    responses={
        400: {"model": SamlProblem, "description": "Not a SAML response"},
        403: {"model": SamlProblem, "description": "Refused: the reason says why; no session"},
        503: {"model": SamlProblem, "description": "SSO is not configured or unavailable"},
    },
)
def acs(
    request: Request,
    saml_response: Annotated[str, Form(alias="SAMLResponse")] = "",
    browser: Annotated[str | None, Cookie(alias=BROWSER_COOKIE)] = None,
) -> Response:
    settings = _settings(request)
    source = _source(request)

    def log(outcome: str, user: str | None, reason: str | None, detail: dict | None = None) -> None:
        access_log.record(
            settings,
            kind="authn",
            user=user,
            source=source,
            resource=ACS_PATH,
            action="login",
            outcome=outcome,
            reason=reason,
            via="saml",
            detail=detail,
        )

    try:
        found = saml.finish_login(settings, saml_response, browser_token=browser)
    except saml.SamlError as exc:
        log("error" if exc.status == 503 else "deny", exc.user, f"{exc.reason}: {exc}")
        return _problem(exc)
    # The ids name the exchange in the IdP's own logs (the access log drops keys that say
    # "assertion": they usually hold one).
    detail = {
        "groups": list(found.groups),
        "idp_reference": found.assertion_id,
        "authn_request": found.request_id,
    }

    def refuse(status: int, reason: str, message: str) -> JSONResponse:
        log("error" if status == 503 else "deny", found.user, f"{reason}: {message}", detail)
        return JSONResponse({"detail": {"reason": reason, "message": message}}, status)

    try:
        policy = load_policy(settings)
    except PolicyError as exc:  # fail closed; the operator fixes the file
        return refuse(503, "policy", f"the access policy cannot be read: {exc}")
    now = dt.datetime.now(dt.UTC)
    entry = policy.users.get(found.user.lower())
    if entry is not None and not entry.active(now):
        return refuse(
            403, "access_expired", f"the access of {found.user} ended ({policy.where(entry.line)})"
        )
    if entry is not None and "api" not in entry.stores:
        return refuse(
            403,
            "no_api_access",
            f"{found.user} is not provisioned on the API ({policy.where(entry.line)})",
        )
    roles = policy.roles_for(found.user, found.groups, now)
    if not roles:
        groups = ", ".join(found.groups) or "none"
        return refuse(
            403,
            "no_role",
            f"the access policy grants {found.user} no role (IdP groups: {groups}; "
            f"{policy.source.name} maps users and groups to roles)",
        )
    try:
        token = sessions.create_session(
            settings,
            user=found.user,
            roles=roles,
            via="saml",
            source_ip=source,
            idp_session_index=found.session_index,
            groups=found.groups,
        )
    except sessions.CredentialStoreError as exc:
        return refuse(503, "unavailable", str(exc))
    log("allow", found.user, None, {**detail, "roles": sorted(roles)})
    response = RedirectResponse(found.next_path, status_code=303)
    set_session_cookie(response, token, settings)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get(
    "/session",
    summary="Who this browser's session (or bearer token) is",
    responses=AUTH_RESPONSES,
)
def session(who: Annotated[Principal, Depends(principal)]) -> SessionView:
    return SessionView(
        user=who.user,
        roles=sorted(who.roles),
        via=who.via,
        login=who.login,
        mfa_verified_at=who.mfa_verified_at,
    )


@router.post("/logout", summary="End this browser's session")
def logout(
    request: Request,
    cookie: Annotated[str | None, Cookie(alias=sessions.SESSION_COOKIE)] = None,
) -> Response:
    settings = _settings(request)
    ended = None
    if cookie:
        try:
            ended = sessions.resolve_session(settings, cookie)  # None: unknown, expired, revoked
            if ended is not None:
                sessions.revoke_session(settings, ended.session_id, reason="logout")
        except sessions.CredentialStoreError as exc:
            return JSONResponse({"detail": {"reason": "unavailable", "message": str(exc)}}, 503)
    if ended is not None:
        access_log.record(
            settings,
            kind="authn",
            user=ended.user,
            source=_source(request),
            resource="/saml/logout",
            action="logout",
            outcome="allow",
            via="saml",
            detail={"session_ref": ended.session_id[:12]},
        )
    response = JSONResponse(LogoutResult(logged_out=ended is not None).model_dump())
    clear_session_cookie(response)
    return response
