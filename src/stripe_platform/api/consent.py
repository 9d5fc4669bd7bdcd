"""The API's consent and do-not-sell routes (issue 23, compliance/consent.py, docs/compliance.md),
behind the scope ``privacy.requests``:

- ``GET /v1/privacy/consent/{customer_id}``: what holds now for the subject (each purpose, the
  do-not-sell flag, the records they come from). A read: it changes nothing, whatever its headers.
- ``POST /v1/privacy/consent``: the subject gives or withdraws consent for a purpose (source api).
- ``POST /v1/privacy/opt-out``: the subject opts out of the sale or sharing of their data.

**Global Privacy Control.** The two POST routes are made on behalf of the subject: the
customer-facing front end relays what the subject chose, with the headers of the subject's own
browser. A request carrying ``Sec-GPC: 1`` is the subject's do-not-sell signal (CCPA regulations
§ 7025): the opt-out is recorded with source ``gpc`` before anything else the request asks (once:
an opt-out in force is not recorded again), and a request that would grant ``sale`` in the same
breath is refused (409) after the opt-out is recorded, since the signal says the opposite. A GET
carrying the header is someone reading (staff, whose own browser may send it): it says nothing of
the subject's wishes and is not an opt-out.

Every change goes to the access log (kind admin) with who made it, the subject and the source.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from pydantic import BaseModel, Field

from stripe_platform.api.auth import AUTH_RESPONSES, Principal, require_scope
from stripe_platform.api.models import Problem
from stripe_platform.audit import access_log
from stripe_platform.compliance import consent

if TYPE_CHECKING:
    from stripe_platform.config import Settings

router = APIRouter(tags=["privacy"])

GPC_HEADER = "Sec-GPC"
PrivacyScope = Annotated[Principal, Depends(require_scope("privacy.requests"))]
BIGINT_MAX = 2**63 - 1  # Customer.ID is a bigint: a larger id names no one (422, not a 500)
CustomerId = Annotated[int, Path(gt=0, le=BIGINT_MAX, description="The customer (data subject)")]


class ConsentRecord(BaseModel):
    customer_id: int
    purpose: str
    granted: bool
    source: str
    recorded_at: dt.datetime
    recorded_by: str


class SubjectConsent(BaseModel):
    """What holds now: each opt-in purpose (null: never asked, so no consent) and do-not-sell."""

    customer_id: int
    purposes: dict[str, bool | None]
    opted_out: bool
    records: list[ConsentRecord] = Field(description="The latest record of each purpose")


class ConsentChange(BaseModel):
    customer_id: int = Field(gt=0, le=BIGINT_MAX)
    purpose: Literal["analytics", "ml_training", "marketing", "sale"] = Field(
        description="sale: granted false is the do-not-sell opt-out"
    )
    granted: bool


class OptOut(BaseModel):
    customer_id: int = Field(gt=0, le=BIGINT_MAX)


class Recorded(BaseModel):
    """What the request recorded (``gpc``: the opt-out recorded or in force from Sec-GPC: 1)."""

    recorded: list[ConsentRecord]
    gpc: ConsentRecord | None = None
    consent: SubjectConsent


ERRORS = {
    **AUTH_RESPONSES,
    404: {"model": Problem, "description": "No such customer"},
    409: {"model": Problem, "description": "Sec-GPC: 1 with a grant of sale"},
}


def _settings(request: Request) -> Settings:
    return request.app.state.services.settings


def gpc_signal(request: Request) -> bool:
    """The request carries the Global Privacy Control signal (``Sec-GPC: 1``, the spec's only
    value that means anything)."""
    return request.headers.get(GPC_HEADER, "").strip() == "1"


def _record(r: consent.ConsentRecord) -> ConsentRecord:
    return ConsentRecord(**r.to_json())


def _subject(settings: Settings, customer_id: int) -> SubjectConsent:
    state = consent.subject(settings, customer_id)
    return SubjectConsent(
        customer_id=state.customer_id,
        purposes=state.purposes,
        opted_out=state.opted_out,
        records=[_record(r) for r in state.records],
    )


def _not_found(exc: consent.UnknownSubject) -> HTTPException:
    return HTTPException(404, str(exc))


def _logged(request: Request, who: Principal, action: str, record: consent.ConsentRecord) -> None:
    access_log.record(
        _settings(request),
        kind="admin",
        user=who.user,
        source=who.source_ip,
        resource=request.url.path,
        action=action,
        outcome="allow",
        via=who.via,
        detail={
            "customer_id": record.customer_id,
            "purpose": record.purpose,
            "granted": record.granted,
            "source": record.source,
        },
    )


def _honour_gpc(request: Request, who: Principal, customer_id: int) -> consent.ConsentRecord | None:
    if not gpc_signal(request):
        return None
    record = consent.opt_out(_settings(request), customer_id, source="gpc", by=who.user)
    _logged(request, who, "consent.opt_out", record)
    return record


@router.get(
    "/v1/privacy/consent/{customer_id}",
    response_model=SubjectConsent,
    responses=ERRORS,
    summary="A subject's consents and do-not-sell flag",
)
def get_consent(customer_id: CustomerId, request: Request, who: PrivacyScope) -> SubjectConsent:
    try:
        return _subject(_settings(request), customer_id)
    except consent.UnknownSubject as exc:
        raise _not_found(exc) from None


@router.post(
    "/v1/privacy/consent",
    response_model=Recorded,
    responses=ERRORS,
    summary="Record a subject's consent given or withdrawn (Sec-GPC: 1 also opts out of sale)",
)
def post_consent(change: ConsentChange, request: Request, who: PrivacyScope) -> Recorded:
    settings = _settings(request)
    try:
        gpc = _honour_gpc(request, who, change.customer_id)
        if gpc is not None and change.purpose == consent.SALE and change.granted:
            raise HTTPException(
                409,
                f"customer {change.customer_id}: the request carries {GPC_HEADER}: 1 (do not sell "
                "or share), so its grant of sale is refused; the opt-out is recorded",
            )
        record = consent.record(
            settings,
            change.customer_id,
            change.purpose,
            change.granted,
            source="api",
            by=who.user,
        )
        _logged(request, who, "consent.record", record)
        return Recorded(
            recorded=[_record(record)],
            gpc=None if gpc is None else _record(gpc),
            consent=_subject(settings, change.customer_id),
        )
    except consent.UnknownSubject as exc:
        raise _not_found(exc) from None


@router.post(
    "/v1/privacy/opt-out",
    response_model=Recorded,
    responses=ERRORS,
    summary="Opt a subject out of the sale or sharing of their data (CCPA do not sell)",
)
def post_opt_out(body: OptOut, request: Request, who: PrivacyScope) -> Recorded:
    settings = _settings(request)
    try:
        gpc = _honour_gpc(request, who, body.customer_id)
        if gpc is not None:
            return Recorded(
                recorded=[_record(gpc)],
                gpc=_record(gpc),
                consent=_subject(settings, body.customer_id),
            )
        record = consent.opt_out(settings, body.customer_id, source="api", by=who.user)
        _logged(request, who, "consent.opt_out", record)
        return Recorded(recorded=[_record(record)], consent=_subject(settings, body.customer_id))
    except consent.UnknownSubject as exc:
        raise _not_found(exc) from None
