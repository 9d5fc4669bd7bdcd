"""The API's data-subject requests (issue 23 §1, compliance/requests.py, docs/compliance.md):

- ``POST /v1/privacy/requests``: record a request (access, rectify, erase, opt_out) for a subject
  and run it; answers the request with its state, legal deadline and steps (201). A duplicate
  open request answers 409 naming it; an unknown subject is recorded ``refused``.
- ``GET /v1/privacy/requests/{id}``: a request's state, deadline, steps and error.
- ``POST /v1/privacy/requests/{id}/run``: re-run a failed (or released on-hold) request.
- ``GET /v1/privacy/requests/{id}/export``: a done access request's JSON export.

Who: the staff handling the request (a DPO, support) on the subject's behalf, in an SSO session
with the scope ``privacy.requests`` and a second factor within the policy's step-up window (the
export is every personal datum of the subject: a bulk export, ``require_clear(..., bulk=True)``);
API tokens cannot step up. The requester records how the subject's identity was verified
(``identity``). Every call goes to the access log with the request id and subject, never a value.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from stripe_platform.api.auth import AUTH_RESPONSES, Principal, require_clear, require_scope
from stripe_platform.api.models import Problem
from stripe_platform.audit import access_log
from stripe_platform.compliance import requests

if TYPE_CHECKING:
    from stripe_platform.config import Settings

router = APIRouter(tags=["privacy"])

# The export holds the subject's pii and pii_quasi in clear (card numbers and password hashes are
# never exported): the caller must be cleared for both, with a fresh second factor (bulk).
EXPORT_CLASSES = ("pii", "pii_quasi")
Staff = Annotated[Principal, Depends(require_clear(*EXPORT_CLASSES, bulk=True))]
SCOPE = [Depends(require_scope("privacy.requests"))]
RequestId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The request's id")]


class NewRequest(BaseModel):
    kind: Literal["access", "rectify", "erase", "opt_out"]
    customer_id: int = Field(ge=1, le=2**63 - 1, description="The data subject")
    law: Literal["gdpr", "ccpa"] = "gdpr"
    identity: str = Field(
        min_length=3,
        max_length=500,
        description="How the subject's identity was verified (kept with the request)",
    )
    changes: dict[str, str] | None = Field(
        None,
        description="rectify: FIELD -> corrected value (email, fullname, phone, username, "
        "address:ROW_ID.line1, address:ROW_ID.postalcode)",
    )


class Step(BaseModel):
    store: str
    state: str
    detail: str
    counts: dict[str, int]
    finished_at: dt.datetime | None


class PrivacyRequest(BaseModel):
    id: int
    kind: str
    customer_id: int
    law: str
    state: str = Field(description="received, running, done, failed, refused or on_hold")
    received_at: dt.datetime
    due_at: dt.datetime = Field(description="The legal deadline (GDPR one month, CCPA 45 days)")
    days_left: float
    requested_by: str
    source: str
    identity: str
    steps: list[Step]
    has_export: bool
    error: str | None


ERRORS = {
    **AUTH_RESPONSES,
    404: {"model": Problem, "description": "No such request"},
    409: {"model": Problem, "description": "A duplicate, or a request not in a state for this"},
    422: {"model": Problem, "description": "Bad input (kind, law, a field not rectifiable)"},
}


def _settings(request: Request) -> Settings:
    return request.app.state.services.settings


def _answer(r: requests.PrivacyRequest) -> PrivacyRequest:
    return PrivacyRequest(
        id=r.id,
        kind=r.kind,
        customer_id=r.customer_id,
        law=r.law,
        state=r.state,
        received_at=r.received_at,
        due_at=r.due_at,
        days_left=r.days_left(),
        requested_by=r.requested_by,
        source=r.source,
        identity=r.identity,
        steps=[Step(**s.to_json()) for s in r.steps],
        has_export=r.export_path is not None,
        error=r.error,
    )


def _logged(
    request: Request, who: Principal, action: str, r: requests.PrivacyRequest, **extra: Any
) -> None:
    access_log.record(
        _settings(request),
        kind="read" if action == "privacy.export" else "admin",
        user=who.user,
        source=who.source_ip,
        resource=request.url.path,
        action=action,
        outcome="allow",
        via=who.via,
        detail={
            "request_id": r.id,
            "kind": r.kind,
            "customer_id": r.customer_id,
            "state": r.state,
            **extra,
        },
    )


def _get(settings: Settings, request_id: int) -> requests.PrivacyRequest:
    try:
        return requests.get_request(settings, request_id)
    except requests.UnknownRequest as exc:
        raise HTTPException(404, str(exc)) from None


@router.post(
    "/v1/privacy/requests",
    status_code=201,
    response_model=PrivacyRequest,
    responses=ERRORS,
    summary="Record a data-subject request and run it",
    dependencies=SCOPE,
)
async def create_request(body: NewRequest, request: Request, who: Staff) -> PrivacyRequest:
    s = _settings(request)

    def submit_and_run() -> requests.PrivacyRequest:
        recorded = requests.submit(
            s,
            body.kind,
            body.customer_id,
            law=body.law,
            requested_by=who.user,
            source="api",
            identity=f"{body.identity.strip()} (recorded by {who.user}: SSO session, MFA)",
            changes=body.changes,
        )
        return requests.run(s, recorded.id) if recorded.state == "received" else recorded

    try:
        done = await run_in_threadpool(submit_and_run)
    except requests.DuplicateRequest as exc:
        raise HTTPException(409, str(exc)) from None
    except requests.RequestError as exc:
        raise HTTPException(422, str(exc)) from None
    _logged(request, who, "privacy.request", done)
    return _answer(done)


@router.get(
    "/v1/privacy/requests/{request_id}",
    response_model=PrivacyRequest,
    responses=ERRORS,
    summary="A data-subject request: state, deadline, steps",
    dependencies=SCOPE,
)
async def get_request(request_id: RequestId, request: Request, who: Staff) -> PrivacyRequest:
    found = await run_in_threadpool(_get, _settings(request), request_id)
    _logged(request, who, "privacy.request_show", found)
    return _answer(found)


@router.post(
    "/v1/privacy/requests/{request_id}/run",
    response_model=PrivacyRequest,
    responses=ERRORS,
    summary="Run a request's remaining steps (a failed or released on-hold one)",
    dependencies=SCOPE,
)
async def run_request(request_id: RequestId, request: Request, who: Staff) -> PrivacyRequest:
    s = _settings(request)
    await run_in_threadpool(_get, s, request_id)
    try:
        done = await run_in_threadpool(requests.run, s, request_id)
    except requests.RequestError as exc:
        raise HTTPException(409, str(exc)) from None
    _logged(request, who, "privacy.request_run", done)
    return _answer(done)


@router.get(
    "/v1/privacy/requests/{request_id}/export",
    responses=ERRORS,
    summary="A done access request's export (JSON: every item held, with where it came from)",
    dependencies=SCOPE,
)
async def export(request_id: RequestId, request: Request, who: Staff) -> dict[str, Any]:
    s = _settings(request)
    found = await run_in_threadpool(_get, s, request_id)
    try:
        document = await run_in_threadpool(requests.read_export, s, request_id)
    except requests.RequestError as exc:
        raise HTTPException(409, str(exc)) from None
    _logged(request, who, "privacy.export", found, items=len(document["items"]))
    return document
