"""The compliance dashboard's KPIs (issue 23, docs/compliance.md): one function, :func:`kpis`,
that the page (``GET /compliance``), the API (``GET /v1/compliance/kpis``) and the CLI
(``compliance kpis``) all show, and :func:`evidence`, the drill-down behind each KPI.

Every figure is read from the module that owns it, never recomputed here:

- the daily controls (compliance/controls.py ``latest``/``history``): encryption coverage,
  access-policy drift, expired access, retention, PCI scope, unauthorised transfers;
- security incidents (audit/incidents.py ``counts``/``list_incidents``);
- data-subject requests (compliance/requests.py ``summary``/``list_requests``);
- personal-data breaches and their 72-hour clocks (compliance/breach.py ``clocks``);
- consent and do-not-sell (compliance/consent.py ``rates``).

Each KPI has a value, a unit, a status (``ok``, ``warn``, ``bad``; ``info`` for rates that are
no pass/fail; ``unavailable`` when its source failed: the other KPIs still show, and the page
says what failed), a trend over ``dashboard_trend_days`` where the source keeps history, and the
path of its evidence.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from stripe_platform.audit import incidents
from stripe_platform.compliance import breach, consent, controls, requests
from stripe_platform.errors import PlatformError

if TYPE_CHECKING:
    from stripe_platform.config import Settings

log = logging.getLogger(__name__)

Status = Literal["ok", "warn", "bad", "info", "unavailable"]

# The daily controls as the dashboard names them (the control's name -> the KPI's title).
CONTROL_TITLES: dict[str, str] = {
    "encryption_coverage": "Encryption coverage",
    "access_policy_drift": "Access-policy compliance",
    "expired_access": "Expired access",
    "retention": "Retention compliance",
    "pci_scope": "PCI scope",
    "unauthorised_transfers": "Unauthorised transfers",
}
# The other sources of evidence (drill-down keys beside the controls' names).
SOURCES = ("incidents", "privacy_requests", "breaches", "consent")
PURPOSES = ("analytics", "ml_training", "marketing")  # compliance/consent.py's purposes
# A daily control whose latest run is older than this is stale: the DAG did not run.
STALE_AFTER = dt.timedelta(hours=36)
# An open privacy request due within this many days is a warning before it is overdue.
DUE_SOON_DAYS = 7


class EvidenceNotFound(PlatformError, LookupError):
    """No evidence under that name (the message lists the names there are)."""


class TrendPoint(BaseModel):
    day: dt.date
    value: float
    passed: bool | None = None  # a control's outcome that day (its last run); None for counts


class Kpi(BaseModel):
    key: str
    title: str
    value: float | None  # None: never measured (a control never run) or its source failed
    unit: str
    status: Status
    detail: str  # one line: why this status
    as_of: dt.datetime | None = None  # when the figure was measured
    breakdown: dict[str, float] = {}  # e.g. unresolved incidents by severity, requests by state
    trend: list[TrendPoint] = []  # oldest first, one point a day that has data
    evidence: str  # the drill-down: GET /v1/compliance/evidence/{source}, page /compliance/...
    source: str  # the evidence's key: a control's name or one of SOURCES


class Deadline(BaseModel):
    """An open data-subject request or breach against its legal clock (the deadlines chart)."""

    kind: str  # "request" | "breach"
    id: str
    label: str  # "erase (gdpr)", "breach of incident #12"
    due_at: dt.datetime
    days_left: float
    overdue: bool


class Kpis(BaseModel):
    generated_at: dt.datetime
    trend_days: int
    kpis: list[Kpi]
    deadlines: list[Deadline]  # open requests and breach clocks, soonest first

    def get(self, key: str) -> Kpi:
        for kpi in self.kpis:
            if kpi.key == key:
                return kpi
        raise KeyError(key)


# --- reading the sources ------------------------------------------------------------------------


def _read(what: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``fn()``, or its failure as one line: one source down must not blank the whole dashboard
    (the page shows that KPI unavailable, with the reason, and the others)."""
    try:
        return fn(), None
    except Exception as exc:  # shown on the KPI, logged with its traceback
        log.exception("compliance KPIs: %s cannot be read", what)
        return None, f"{what} cannot be read: {type(exc).__name__}: {exc}"


def _unavailable(key: str, title: str, unit: str, source: str, error: str) -> Kpi:
    return Kpi(
        key=key,
        title=title,
        value=None,
        unit=unit,
        status="unavailable",
        detail=error,
        evidence=_evidence_path(source),
        source=source,
    )


def _evidence_path(source: str) -> str:
    return f"/v1/compliance/evidence/{source}"


def _utc(when: dt.datetime) -> dt.datetime:
    return when.astimezone(dt.UTC) if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _days(now: dt.datetime, days: int) -> list[dt.date]:
    """The trend's days, oldest first, today (UTC) last."""
    today = _utc(now).date()
    return [today - dt.timedelta(days=n) for n in range(days - 1, -1, -1)]


def _end_of(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def _open_per_day(
    intervals: Iterable[tuple[dt.datetime, dt.datetime | None]],
    days: list[dt.date],
    now: dt.datetime,
) -> list[TrendPoint]:
    """How many (opened, closed) intervals were open at the end of each day (today: now)."""
    spans = [(_utc(a), _utc(b) if b else None) for a, b in intervals]
    points = []
    for day in days:
        at = min(_end_of(day), _utc(now))
        n = sum(1 for opened, closed in spans if opened <= at and (closed is None or closed > at))
        points.append(TrendPoint(day=day, value=n))
    return points


# --- the KPIs -----------------------------------------------------------------------------------


def _control_kpis(settings: Settings, now: dt.datetime, days: int) -> list[Kpi]:
    latest, error = _read("the daily controls", lambda: controls.latest(settings))
    if error is not None:
        return [
            _unavailable(name, title, "", name, error) for name, title in CONTROL_TITLES.items()
        ]
    history, history_error = _read(
        "the controls' history", lambda: controls.history(settings, days, now=now)
    )
    by_name = {r.name: r for r in latest}
    out = []
    for name, title in CONTROL_TITLES.items():
        result = by_name.get(name)
        if result is None:
            out.append(
                Kpi(
                    key=name,
                    title=title,
                    value=None,
                    unit="",
                    status="warn",
                    detail="never run: `stripe-platform compliance check` (the daily DAG "
                    "compliance_daily runs it)",
                    evidence=_evidence_path(name),
                    source=name,
                )
            )
            continue
        run_at = _utc(result.run_at) if result.run_at else None
        if not result.passed:
            status, detail = "bad", f"failed: {_figure(result.value, result.unit)}"
        elif run_at is None or now - run_at > STALE_AFTER:
            status, detail = "warn", "passed, but the latest run is stale (over 36 h old)"
        else:
            status, detail = "ok", "passed"
        if history_error is not None:
            detail += f"; no trend ({history_error})"
        # One point a day: that day's last run (history is oldest first).
        daily: dict[dt.date, TrendPoint] = {}
        for r in history or ():
            if r.name == name and r.run_at is not None:
                day = _utc(r.run_at).date()
                daily[day] = TrendPoint(day=day, value=r.value, passed=r.passed)
        out.append(
            Kpi(
                key=name,
                title=title,
                value=result.value,
                unit=result.unit,
                status=status,
                detail=detail,
                as_of=run_at,
                trend=sorted(daily.values(), key=lambda p: p.day),
                evidence=_evidence_path(name),
                source=name,
            )
        )
    return out


def _incidents_kpi(settings: Settings, now: dt.datetime, days: int) -> Kpi:
    title, unit = "Open security incidents", "incidents"
    counts, error = _read("the incidents", lambda: incidents.counts(settings))
    if error is not None:
        return _unavailable("incidents", title, unit, "incidents", error)
    by_severity = counts["unresolved_by_severity"]
    value = sum(by_severity.values())
    if by_severity.get("critical") or by_severity.get("high"):
        status = "bad"
    elif value:
        status = "warn"
    else:
        status = "ok"
    detail = (
        ", ".join(f"{n} {s}" for s, n in reversed(by_severity.items()) if n) or "none unresolved"
    )
    found, trend_error = _read("the incidents' history", lambda: incidents.list_incidents(settings))
    trend = []
    if trend_error is None:
        trend = _open_per_day(((i.created_at, i.resolved_at) for i in found), _days(now, days), now)
    return Kpi(
        key="incidents",
        title=title,
        value=value,
        unit=unit,
        status=status,
        detail=detail,
        as_of=now,
        breakdown={s: float(n) for s, n in by_severity.items()},
        trend=trend,
        evidence=_evidence_path("incidents"),
        source="incidents",
    )


def _requests_kpi(settings: Settings, now: dt.datetime, days: int) -> tuple[Kpi, list[Deadline]]:
    title, unit = "Open privacy requests", "requests"
    summary, error = _read("the privacy requests", lambda: requests.summary(settings, now=now))
    if error is not None:
        return _unavailable("privacy_requests", title, unit, "privacy_requests", error), []
    open_ = summary["open"]
    overdue = summary["overdue"]
    soon = [r for r in open_ if 0 <= r["days_left"] <= DUE_SOON_DAYS]
    if overdue:
        status, detail = "bad", f"{overdue} past the legal deadline"
    elif soon:
        status, detail = "warn", f"{len(soon)} due within {DUE_SOON_DAYS} days"
    else:
        status, detail = "ok", "none near its deadline" if open_ else "none open"
    deadlines = [
        Deadline(
            kind="request",
            id=str(r["id"]),
            label=f"{r['kind']} ({r['law']})",
            due_at=r["due_at"],
            days_left=r["days_left"],
            overdue=r["days_left"] < 0,
        )
        for r in open_
    ]
    found, trend_error = _read(
        "the privacy requests' history", lambda: requests.list_requests(settings)
    )
    trend = []
    if trend_error is None:
        trend = _open_per_day(
            ((r.received_at, _finished_at(r)) for r in found), _days(now, days), now
        )
    return Kpi(
        key="privacy_requests",
        title=title,
        value=len(open_),
        unit=unit,
        status=status,
        detail=detail,
        as_of=now,
        breakdown={state: float(n) for state, n in summary["by_state"].items()},
        trend=trend,
        evidence=_evidence_path("privacy_requests"),
        source="privacy_requests",
    ), deadlines


def _finished_at(request: requests.PrivacyRequest) -> dt.datetime | None:
    """When a finished request finished (its last step; received, for one refused before any
    step); None while it is open."""
    if request.state in requests.OPEN_STATES:
        return None
    ends = [s.finished_at for s in request.steps if s.finished_at is not None]
    return max(ends) if ends else request.received_at


def _breach_kpi(settings: Settings, now: dt.datetime, days: int) -> tuple[Kpi, list[Deadline]]:
    title, unit = "Breaches awaiting notification", "breaches"
    clocks, error = _read("the breach clocks", lambda: breach.clocks(settings, now=now))
    if error is not None:
        return _unavailable("breaches", title, unit, "breaches", error), []
    open_ = [c for c in clocks if c.state == "open"]
    overdue = [c for c in open_ if c.overdue]
    hours = settings.breach_notify_hours
    if overdue:
        status, detail = "bad", f"{len(overdue)} past the {hours}-hour notification deadline"
    elif open_:
        left = min(c.hours_left for c in open_)
        status, detail = "warn", f"next notification due in {left:.0f} h"
    else:
        status, detail = "ok", "none awaiting notification"
    deadlines = [
        Deadline(
            kind="breach",
            id=str(c.id),
            label=f"breach of incident #{c.incident_id}",
            due_at=c.deadline,
            days_left=c.hours_left / 24,
            overdue=c.overdue,
        )
        for c in open_
    ]
    trend = _open_per_day(((c.declared_at, c.submitted_at) for c in clocks), _days(now, days), now)
    late = sum(1 for c in clocks if c.state == "submitted" and c.overdue)
    return Kpi(
        key="breaches",
        title=title,
        value=len(open_),
        unit=unit,
        status=status,
        detail=detail,
        as_of=now,
        breakdown={
            "open": float(len(open_)),
            "overdue": float(len(overdue)),
            "submitted late": float(late),
        },
        trend=trend,
        evidence=_evidence_path("breaches"),
        source="breaches",
    ), deadlines


def _consent_kpis(settings: Settings, now: dt.datetime) -> list[Kpi]:
    titles = {p: f"Consent: {p.replace('_', ' ')}" for p in PURPOSES}
    rates, error = _read("the consent registry", lambda: consent.rates(settings))
    if error is not None:
        return [
            *(_unavailable(f"consent_{p}", t, "%", "consent", error) for p, t in titles.items()),
            _unavailable("opt_out", "Do not sell (opted out)", "%", "consent", error),
        ]
    subjects = rates["subjects"]
    out = []
    for purpose, title in titles.items():
        found = rates["by_purpose"].get(purpose, {"granted": 0, "rate": 0.0})
        out.append(
            Kpi(
                key=f"consent_{purpose}",
                title=title,
                value=100 * found["rate"],
                unit="%",
                status="info",
                detail=f"{found['granted']} of {subjects} subjects consent",
                as_of=now,
                evidence=_evidence_path("consent"),
                source="consent",
            )
        )
    out.append(
        Kpi(
            key="opt_out",
            title="Do not sell (opted out)",
            value=100 * rates["opt_out_rate"],
            unit="%",
            status="info",
            detail=f"{rates['opted_out']} of {subjects} subjects opted out (CCPA, incl. GPC)",
            as_of=now,
            evidence=_evidence_path("consent"),
            source="consent",
        )
    )
    return out


def kpis(settings: Settings, *, now: dt.datetime | None = None) -> Kpis:
    """Every KPI of the compliance dashboard, as of ``now`` (default: now), with its trend over
    ``settings.dashboard_trend_days``."""
    now = _utc(now or dt.datetime.now(dt.UTC))
    days = settings.dashboard_trend_days
    # The sources are independent reads, each on its own connection: read at once, the page
    # waits for the slowest, not for their sum (the first paint's goal is 1 s).
    with ThreadPoolExecutor(max_workers=5, thread_name_prefix="kpis") as pool:
        controls_f = pool.submit(_control_kpis, settings, now, days)
        incidents_f = pool.submit(_incidents_kpi, settings, now, days)
        requests_f = pool.submit(_requests_kpi, settings, now, days)
        breaches_f = pool.submit(_breach_kpi, settings, now, days)
        consent_f = pool.submit(_consent_kpis, settings, now)
    controls_ = controls_f.result()
    requests_, request_deadlines = requests_f.result()
    breaches_, breach_deadlines = breaches_f.result()
    ordered = [
        controls_[0],  # encryption coverage first: the brief names it first
        controls_[1],  # access-policy compliance
        controls_[3],  # retention
        incidents_f.result(),
        requests_,
        breaches_,
        controls_[2],  # expired access
        controls_[5],  # unauthorised transfers
        controls_[4],  # PCI scope
        *consent_f.result(),
    ]
    deadlines = sorted([*request_deadlines, *breach_deadlines], key=lambda d: d.due_at)
    return Kpis(generated_at=now, trend_days=days, kpis=ordered, deadlines=deadlines)


# --- drill-down ---------------------------------------------------------------------------------


def evidence_names() -> tuple[str, ...]:
    return (*CONTROL_TITLES, *SOURCES)


def evidence(settings: Settings, name: str, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """What a KPI rests on, as JSON: a control's latest result with its evidence and its runs over
    the trend window; the unresolved incidents; the privacy requests' summary; the breach clocks;
    the consent rates. Counts, ids and names: never a subject's personal data."""
    now = _utc(now or dt.datetime.now(dt.UTC))
    days = settings.dashboard_trend_days
    if name in CONTROL_TITLES:
        latest = next((r for r in controls.latest(settings) if r.name == name), None)
        runs = controls.history(settings, days, name=name, now=now)
        return _jsonable(
            {
                "name": name,
                "title": CONTROL_TITLES[name],
                "latest": latest.to_json() if latest else None,
                "runs": [  # newest first
                    {"run_at": r.run_at, "passed": r.passed, "value": r.value, "unit": r.unit}
                    for r in reversed(runs)
                ],
            }
        )
    if name == "incidents":
        unresolved = incidents.list_incidents(settings, status=["open", "acknowledged"])
        return _jsonable(
            {
                "name": name,
                "title": "Security incidents",
                "counts": incidents.counts(settings),
                # What an incident is, not its evidence lines (they may quote logs).
                "unresolved": [
                    {
                        "id": i.id,
                        "severity": i.severity,
                        "status": i.status,
                        "rule": i.rule,
                        "title": i.title,
                        "count": i.count,
                        "first_seen": i.first_seen,
                        "last_seen": i.last_seen,
                    }
                    for i in unresolved
                ],
            }
        )
    if name == "privacy_requests":
        summary = requests.summary(settings, now=now)
        return _jsonable({"name": name, "title": "Privacy requests", **summary})
    if name == "breaches":
        clocks = breach.clocks(settings, now=now)
        return {
            "name": name,
            "title": "Personal-data breaches",
            "notify_hours": settings.breach_notify_hours,
            "clocks": [c.to_json() for c in clocks],
        }
    if name == "consent":
        return _jsonable(
            {"name": name, "title": "Consent and do not sell", **consent.rates(settings)}
        )
    raise EvidenceNotFound(
        f"no compliance evidence named {name!r}; there is: {', '.join(evidence_names())}"
    )


def _jsonable(value: Any) -> Any:
    return to_jsonable_python(value)


def _figure(value: float | None, unit: str) -> str:
    """A KPI's value as the page and the CLI show it: one decimal for percentages, whole counts."""
    if value is None:
        return "—"
    if unit == "%":
        return f"{value:.1f} %"
    shown = f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    if value == 1:  # "1 breach", "1 item": the units are English plurals
        unit = (
            unit[:-2] if unit.endswith(("ches", "shes", "sses", "xes")) else unit.removesuffix("s")
        )
    return f"{shown} {unit}".strip()


def figure(kpi: Kpi) -> str:
    return _figure(kpi.value, kpi.unit)
