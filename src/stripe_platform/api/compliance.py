"""The compliance dashboard (issue 23, docs/compliance.md): KPIs with their trends and the evidence
behind them, for people (HTML) and machines (JSON), all from compliance/kpis.py.

- ``GET /compliance``: the page (inline SVG charts, no script). A browser without a session is
  sent to the SSO login (``/saml/login?next=/compliance``) and comes back; a session whose roles
  lack the scope ``compliance.read`` gets 403 with the reason.
- ``GET /compliance/evidence/{name}``: the drill-down page of one KPI's evidence.
- ``GET /v1/compliance/kpis``: the same KPIs as JSON (scope ``compliance.read``; session or token).
- ``GET /v1/compliance/evidence/{name}``: one KPI's evidence as JSON (404 for an unknown name).

The KPIs and the evidence are counts, ids and names, never a subject's personal data: the scope
needs no clearance for a data class and no second factor. Every decision is in the access log
(api/auth.py's dependencies).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import psycopg
from fastapi import APIRouter, Cookie, Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from stripe_platform.api.auth import AUTH_RESPONSES, Principal, principal, require_scope
from stripe_platform.api.dashboard import page
from stripe_platform.compliance import kpis as kpis_module
from stripe_platform.compliance.kpis import EvidenceNotFound, Kpis
from stripe_platform.errors import PlatformError
from stripe_platform.security import sessions

if TYPE_CHECKING:
    from stripe_platform.config import Settings

log = logging.getLogger(__name__)
router = APIRouter(tags=["compliance"])

SCOPE = "compliance.read"
_allowed = require_scope(SCOPE)
EvidenceName = Annotated[
    str, Path(pattern=r"^[a-z_]{1,40}$", description="A control's name or a source of evidence")
]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No evidence of that name"},
    503: {"description": "The evidence's source cannot be read now (the message says why)"},
}


def _settings(request: Request) -> Settings:
    return request.app.state.services.settings


async def _viewer(request: Request, cookie: str | None) -> Principal | Response:
    """The browser's principal with the scope, or the answer to give instead: to the SSO login
    when it has no valid session (401), the refusal page when it may not see the dashboard."""
    try:
        who = await principal(request, None, cookie)
        return await _allowed(request, who)
    except HTTPException as exc:
        if exc.status_code == 401:
            return RedirectResponse(
                f"/saml/login?next={quote(request.url.path)}",
                status_code=303,
                headers={"Cache-Control": "no-store"},
            )
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        return HTMLResponse(
            page.message_page(exc.status_code, str(detail.get("message", ""))),
            status_code=exc.status_code,
            headers=page.security_headers(),
        )


@router.get(
    "/compliance",
    summary="The compliance dashboard (HTML, SSO session)",
    response_class=HTMLResponse,
    responses={303: {"description": "No session: to the SSO login, then back"}, 403: {}},
)
async def dashboard(
    request: Request,
    cookie: Annotated[str | None, Cookie(alias=sessions.SESSION_COOKIE)] = None,
) -> Response:
    who = await _viewer(request, cookie)
    if isinstance(who, Response):
        return who
    found = await run_in_threadpool(kpis_module.kpis, _settings(request))
    return HTMLResponse(page.dashboard(found, user=who.user), headers=page.security_headers())


@router.get(
    "/compliance/evidence/{name}",
    summary="One KPI's evidence (HTML, SSO session)",
    response_class=HTMLResponse,
    responses={303: {"description": "No session: to the SSO login, then back"}, 403: {}, 404: {}},
)
async def evidence_page(
    request: Request,
    name: EvidenceName,
    cookie: Annotated[str | None, Cookie(alias=sessions.SESSION_COOKIE)] = None,
) -> Response:
    who = await _viewer(request, cookie)
    if isinstance(who, Response):
        return who
    try:
        data = await run_in_threadpool(kpis_module.evidence, _settings(request), name)
    except (PlatformError, psycopg.OperationalError) as exc:  # unknown name 404, source down 503
        status = 404 if isinstance(exc, EvidenceNotFound) else 503
        return HTMLResponse(
            page.message_page(status, _said(exc)),
            status_code=status,
            headers=page.security_headers(),
        )
    return HTMLResponse(
        page.evidence_page(name, data, user=who.user), headers=page.security_headers()
    )


@router.get(
    "/v1/compliance/kpis",
    summary="The compliance KPIs with their trends (JSON)",
    responses=AUTH_RESPONSES,
    dependencies=[Depends(_allowed)],
)
def kpis(request: Request) -> Kpis:
    return kpis_module.kpis(_settings(request))


@router.get(
    "/v1/compliance/evidence/{name}",
    summary="One KPI's evidence (JSON): a control's latest result and runs, incidents, requests, "
    "breach clocks, consent rates",
    responses={**AUTH_RESPONSES, **NOT_FOUND},
    dependencies=[Depends(_allowed)],
)
def evidence(request: Request, name: EvidenceName) -> dict[str, Any]:
    try:
        return kpis_module.evidence(_settings(request), name)
    except EvidenceNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except (PlatformError, psycopg.OperationalError) as exc:  # the source cannot be read now
        raise HTTPException(503, _said(exc)) from None


def _said(exc: Exception) -> str:
    """What the client is told: the platform's own errors say what to do; a database error's text
    (hosts, sockets) is for the operator's log only."""
    if isinstance(exc, PlatformError):
        return str(exc)
    log.error("compliance evidence cannot be read: %s", exc)
    return "the platform's database cannot be reached now: try again later"
