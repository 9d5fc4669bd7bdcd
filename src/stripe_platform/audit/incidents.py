"""Security incidents (issue 22): what the detection rules (audit/detect.py), the log anomaly model
(ml/log_anomaly.py) and a failed trail verification (audit/trail.py) found, grouped and tracked to
resolution in ``audit.incident`` (sql/oltp/0022_incidents.sql).

- ``raise_findings``: each finding becomes an incident, or is grouped into the unresolved incident
  with its dedup key (count, last_seen, evidence appended, severity raised when higher). A finding
  that brings nothing new (all its evidence already in the incident, seen no later: the hourly
  watch re-reads overlapping windows) changes nothing, and neither reopens a resolved incident
  holding all its evidence: no alert storm from re-reading.
- The sinks: a new incident and a severity escalation are sent, after commit, to the alert path of
  Airflow's failed tasks (orchestration/alerts.send_alert: logged, POSTed to
  ``alert_webhook_url`` when set) and to the access log (kind "admin", action "incident.raise" /
  "incident.escalate"); acknowledgements and resolutions go to the access log with who did them.
- Status: open -> acknowledged -> resolved, or open -> resolved. Anything else is refused
  (``IncidentStateError``), so is an unknown id (``IncidentNotFound``).
- ``list_incidents`` and ``counts`` are what the compliance dashboard (issue 23) reads.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError

log = logging.getLogger("stripe_platform.incidents")

SEVERITIES = ("low", "medium", "high", "critical")  # in increasing order
STATUSES = ("open", "acknowledged", "resolved")
_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


class IncidentError(PlatformError, ValueError):
    """An incident operation that cannot be done as asked."""


class IncidentNotFound(IncidentError):
    """No incident with that id."""


class IncidentStateError(IncidentError):
    """A status change the incident's current status does not allow."""


@dataclass(frozen=True)
class Incident:
    id: int
    dedup_key: str
    rule: str
    title: str
    severity: str
    status: str
    user: str | None
    source: str | None
    first_seen: dt.datetime
    last_seen: dt.datetime
    count: int
    evidence: tuple[str, ...]
    detail: dict
    created_at: dt.datetime
    updated_at: dt.datetime
    acknowledged_at: dt.datetime | None = None
    acknowledged_by: str | None = None
    ack_note: str | None = None
    resolved_at: dt.datetime | None = None
    resolved_by: str | None = None
    resolve_note: str | None = None
    # What raise_findings did to it this call: "new", "grouped", "escalated" (None elsewhere).
    change: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["evidence"] = list(self.evidence)
        for key, value in data.items():
            if isinstance(value, dt.datetime):
                data[key] = value.astimezone(dt.UTC).isoformat()
        return data


_COLUMNS = """id, dedup_key, rule, title, severity, status, user_name AS "user", source, first_seen,
    last_seen, count, evidence, detail, created_at, updated_at, acknowledged_at, acknowledged_by,
    ack_note, resolved_at, resolved_by, resolve_note"""


def _incident(row: dict[str, Any], change: str | None = None) -> Incident:
    return Incident(**{**row, "evidence": tuple(row["evidence"] or ()), "change": change})


def _connect(settings: Settings) -> psycopg.Connection:
    from stripe_platform.oltp import db

    return db.connect_to_table(
        settings, "audit.incident", what="incident table", migration=22, error=IncidentError
    )


def _check_severity(severity: str, where: str) -> str:
    if severity not in _RANK:
        raise IncidentError(f"{where}: severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    return severity


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


# -- raising -------------------------------------------------------------------------------------
def raise_findings(settings: Settings, findings: Iterable[Any]) -> list[Incident]:
    """Each finding (audit.detect.Finding) as an incident, new or grouped; returns the incidents
    created or changed (``change`` says how), in the order of the findings. All in one
    transaction; the sinks are told after it commits."""
    findings = list(findings)
    for f in findings:
        _check_severity(f.severity, f"finding of rule {f.rule!r}")
        if not f.dedup_key:
            raise IncidentError(f"finding of rule {f.rule!r} has no dedup key")
    if not findings:
        return []
    changed: dict[int, Incident] = {}
    with _connect(settings) as conn, conn.transaction():
        for f in findings:
            incident = _raise_one(conn, f)
            if incident is not None:
                # A later finding of the same batch may group into an incident just created:
                # it stays "new" (one alert), an escalation of an existing one stays "escalated".
                before = changed.get(incident.id)
                if before is not None and before.change in ("new", "escalated"):
                    incident = _replace_change(incident, before.change)
                changed[incident.id] = incident
    incidents = list(changed.values())
    for incident in incidents:
        if incident.change in ("new", "escalated"):
            _notify(settings, incident)
    return incidents


def _replace_change(incident: Incident, change: str) -> Incident:
    return Incident(**{**asdict(incident), "change": change})


def _raise_one(conn: psycopg.Connection, f: Any) -> Incident | None:
    at = _aware(f.at)
    evidence = list(dict.fromkeys(str(e) for e in f.evidence))
    # One raiser per key at a time (a watch and an `audit verify` may run together): without it,
    # two would both find no incident and the second insert would break the unique index.
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 22))", (f.dedup_key,))
    current = conn.execute(
        f"SELECT {_COLUMNS} FROM audit.incident WHERE dedup_key = %s AND status <> 'resolved' "
        "FOR UPDATE",
        (f.dedup_key,),
    ).fetchone()
    if current is None:
        # Re-detection of what a resolved incident already holds (an overlapping window): nothing.
        if (
            evidence
            and conn.execute(
                "SELECT 1 FROM audit.incident WHERE dedup_key = %s AND status = 'resolved' "
                "AND evidence @> %s::text[] AND last_seen >= %s LIMIT 1",
                (f.dedup_key, evidence, at),
            ).fetchone()
        ):
            return None
        row = conn.execute(
            f"""INSERT INTO audit.incident (dedup_key, rule, title, severity, user_name, source,
                    first_seen, last_seen, evidence, detail)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)
                RETURNING {_COLUMNS}""",
            (
                f.dedup_key,
                f.rule,
                f.title,
                f.severity,
                f.user,
                f.source,
                at,
                at,
                evidence,
                _json(f.detail or {}),
            ),
        ).fetchone()
        return _incident(row, "new")
    known = set(current["evidence"])
    fresh = [e for e in evidence if e not in known]
    higher = _RANK[f.severity] > _RANK[current["severity"]]
    if not fresh and not higher and at <= current["last_seen"]:
        return None  # the same finding again
    row = conn.execute(
        f"""UPDATE audit.incident SET count = count + 1, last_seen = greatest(last_seen, %s),
                first_seen = least(first_seen, %s), evidence = evidence || %s::text[],
                severity = %s, title = %s, detail = %s::jsonb, updated_at = clock_timestamp()
            WHERE id = %s RETURNING {_COLUMNS}""",
        (
            at,
            at,
            fresh,
            f.severity if higher else current["severity"],
            f.title if higher else current["title"],
            _json(f.detail or {}),
            current["id"],
        ),
    ).fetchone()
    return _incident(row, "escalated" if higher else "grouped")


def _notify(settings: Settings, incident: Incident) -> None:
    """The sinks: the alert path (log + webhook) and the access log. Neither ever raises."""
    from stripe_platform.audit import access_log
    from stripe_platform.orchestration.alerts import send_alert

    event = "incident_raised" if incident.change == "new" else "incident_escalated"
    verb = "new" if incident.change == "new" else "escalated to"
    payload = {
        "event": event,
        "incident_id": incident.id,
        "severity": incident.severity,
        "rule": incident.rule,
        "title": incident.title,
        "user": incident.user,
        "source": incident.source,
        "first_seen": incident.first_seen.isoformat(),
        "last_seen": incident.last_seen.isoformat(),
        "count": incident.count,
        "evidence": list(incident.evidence[:20]),
        "evidence_total": len(incident.evidence),
        "dedup_key": incident.dedup_key,
        "text": f"[stripe-platform] incident #{incident.id} {verb} {incident.severity}: "
        f"{incident.title}",
    }
    try:
        send_alert(payload, settings)
    except Exception:  # an alert sink must never undo or hide the incident itself
        log.exception("incident #%s: alert not sent", incident.id)
    # The platform raises it: the suspect is in the detail, not the event's user (who acted).
    access_log.record(
        settings,
        kind="admin",
        user=None,
        source=None,
        resource=f"incident:{incident.id}",
        action="incident.raise" if incident.change == "new" else "incident.escalate",
        outcome="allow",
        reason=incident.rule,
        via="audit",
        detail={
            "severity": incident.severity,
            "title": incident.title,
            "subject_user": incident.user,
            "subject_source": incident.source,
            "count": incident.count,
            "dedup_key": incident.dedup_key,
        },
    )


# -- status changes ------------------------------------------------------------------------------
def acknowledge(
    settings: Settings, incident_id: int, *, by: str, note: str | None = None
) -> Incident:
    """open -> acknowledged, recording who, when and why."""
    return _transition(settings, incident_id, "acknowledged", by=by, note=note)


def resolve(settings: Settings, incident_id: int, *, by: str, note: str | None = None) -> Incident:
    """open or acknowledged -> resolved, recording who, when and why."""
    return _transition(settings, incident_id, "resolved", by=by, note=note)


_ALLOWED = {"acknowledged": ("open",), "resolved": ("open", "acknowledged")}


def _transition(
    settings: Settings, incident_id: int, to: str, *, by: str, note: str | None
) -> Incident:
    if not by:
        raise IncidentError("who changes an incident's status must be named")
    with _connect(settings) as conn, conn.transaction():
        row = conn.execute(
            "SELECT status FROM audit.incident WHERE id = %s FOR UPDATE", (incident_id,)
        ).fetchone()
        if row is None:
            raise IncidentNotFound(f"no incident #{incident_id}")
        if row["status"] not in _ALLOWED[to]:
            raise IncidentStateError(
                f"incident #{incident_id} is {row['status']}: it cannot be "
                f"{'acknowledged' if to == 'acknowledged' else 'resolved'} "
                f"(only from {' or '.join(_ALLOWED[to])})"
            )
        if to == "acknowledged":
            sets = "acknowledged_at = clock_timestamp(), acknowledged_by = %s, ack_note = %s"
        else:
            sets = "resolved_at = clock_timestamp(), resolved_by = %s, resolve_note = %s"
        updated = conn.execute(
            f"UPDATE audit.incident SET status = %s, {sets}, updated_at = clock_timestamp() "
            f"WHERE id = %s RETURNING {_COLUMNS}",
            (to, by, note, incident_id),
        ).fetchone()
    incident = _incident(updated)
    from stripe_platform.audit import access_log

    access_log.record(
        settings,
        kind="admin",
        user=by,
        source=None,
        resource=f"incident:{incident_id}",
        action="incident.acknowledge" if to == "acknowledged" else "incident.resolve",
        outcome="allow",
        via="cli",
        detail={"note": note, "severity": incident.severity, "rule": incident.rule},
    )
    return incident


# -- reading -------------------------------------------------------------------------------------
def get_incident(settings: Settings, incident_id: int) -> Incident:
    with _connect(settings) as conn:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM audit.incident WHERE id = %s", (incident_id,)
        ).fetchone()
    if row is None:
        raise IncidentNotFound(f"no incident #{incident_id}")
    return _incident(row)


def list_incidents(
    settings: Settings,
    status: str | Sequence[str] | None = None,
    severity: str | Sequence[str] | None = None,
    since: dt.datetime | None = None,
    *,
    limit: int | None = None,
) -> list[Incident]:
    """Incidents, newest activity first; ``status``/``severity`` one value or several; ``since``:
    last seen at or after it."""
    statuses = _values(status, STATUSES, "status")
    severities = _values(severity, SEVERITIES, "severity")
    where, params = ["true"], []
    if statuses is not None:
        where.append("status = ANY(%s)")
        params.append(statuses)
    if severities is not None:
        where.append("severity = ANY(%s)")
        params.append(severities)
    if since is not None:
        where.append("last_seen >= %s")
        params.append(_aware(since))
    query = (
        f"SELECT {_COLUMNS} FROM audit.incident WHERE {' AND '.join(where)} "
        "ORDER BY last_seen DESC, id DESC"
    )
    if limit is not None:
        query += " LIMIT %s"
        params.append(limit)
    with _connect(settings) as conn:
        return [_incident(row) for row in conn.execute(query, params).fetchall()]


def _values(value: str | Sequence[str] | None, allowed: Sequence[str], what: str) -> list | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    wrong = [v for v in values if v not in allowed]
    if wrong:
        raise IncidentError(f"{what} {', '.join(map(repr, wrong))}: one of {', '.join(allowed)}")
    return values


def counts(settings: Settings) -> dict[str, Any]:
    """For the compliance dashboard: incidents by status, by severity among the unresolved, and by
    status x severity; plus the oldest unresolved incident's first_seen."""
    with _connect(settings) as conn:
        rows = conn.execute(
            "SELECT status, severity, count(*) AS n, min(first_seen) AS oldest "
            "FROM audit.incident GROUP BY status, severity"
        ).fetchall()
    by_status = dict.fromkeys(STATUSES, 0)
    unresolved = dict.fromkeys(SEVERITIES, 0)
    matrix = {status: dict.fromkeys(SEVERITIES, 0) for status in STATUSES}
    oldest = None
    for row in rows:
        by_status[row["status"]] += row["n"]
        matrix[row["status"]][row["severity"]] = row["n"]
        if row["status"] != "resolved":
            unresolved[row["severity"]] += row["n"]
            oldest = row["oldest"] if oldest is None else min(oldest, row["oldest"])
    return {
        "total": sum(by_status.values()),
        "by_status": by_status,
        "unresolved_by_severity": unresolved,
        "by_status_severity": matrix,
        "oldest_unresolved": oldest.astimezone(dt.UTC).isoformat() if oldest else None,
    }
