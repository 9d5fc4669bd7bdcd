"""Personal-data breaches (issue 23 §4, GDPR Art. 33, docs/compliance.md): a security incident
(audit/incidents.py) declared a breach; its affected subjects and data categories computed from
the incident's evidence (the Log documents: who read what) and the catalog; the 72-hour clock
(``breach_notify_hours``) from the declaration; the authority notification drafted with Art.
33(3)'s contents and tracked to its submission; an overdue clock raises an incident (so an alert,
the incidents' way). State in ``privacy.breach`` (sql/oltp/0026_breach_controls.sql).

What the evidence can tell, and what it cannot: statements reach the Log documents with their
literals redacted (audit/access_log.redact_sql), so a read of a PostgreSQL table names the table
and columns but not which rows: its subjects are estimated by the table's distinct subjects (an
upper bound) or the rows the log line reports. An API read of ``/v1/customers/{id}/pii`` names its
subject exactly. The draft says which figures are exact and which are estimates.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError

STATES = ("open", "submitted")
OVERDUE_RULE = "breach_notification_overdue"
# API routes whose Log line names one subject and reveals its personal data in clear.
_API_SUBJECT_READ = re.compile(r"/v1/customers/(\d+)/pii\b")


class BreachError(PlatformError, ValueError):
    """A breach operation that cannot be done as asked (the message says why)."""


class BreachNotFound(BreachError):
    """No breach with that id."""


@dataclass(frozen=True)
class Breach:
    id: int
    incident_id: int
    declared_at: dt.datetime
    declared_by: str
    deadline: dt.datetime
    state: str
    affected: dict[str, Any] = field(default_factory=dict)
    submitted_at: dt.datetime | None = None
    submitted_by: str | None = None
    reference: str | None = None
    overdue_alerted_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for key, value in out.items():
            if isinstance(value, dt.datetime):
                out[key] = value.astimezone(dt.UTC).isoformat()
        return out


@dataclass(frozen=True)
class BreachClock:
    """One breach's notification clock, for the dashboard and `privacy breach list`."""

    id: int
    incident_id: int
    declared_at: dt.datetime
    deadline: dt.datetime
    state: str  # open | submitted
    overdue: bool  # open past its deadline, or submitted after it
    submitted_at: dt.datetime | None
    hours_left: float  # until the deadline (negative once past); 0 when submitted

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "incident_id": self.incident_id,
            "declared_at": self.declared_at.astimezone(dt.UTC).isoformat(),
            "deadline": self.deadline.astimezone(dt.UTC).isoformat(),
            "state": self.state,
            "overdue": self.overdue,
            "submitted_at": (
                self.submitted_at.astimezone(dt.UTC).isoformat() if self.submitted_at else None
            ),
            "hours_left": self.hours_left,
        }


_COLUMNS = """id, incident_id, declared_at, declared_by, deadline, state, affected, submitted_at,
    submitted_by, reference, overdue_alerted_at"""


def _connect(settings: Settings) -> psycopg.Connection:
    from stripe_platform.oltp import db

    return db.connect_to_table(
        settings, "privacy.breach", what="breach table", migration=26, error=BreachError
    )


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo else now.replace(tzinfo=dt.UTC)


# -- declaring -----------------------------------------------------------------------------------
def declare(
    settings: Settings, incident_id: int, *, by: str, now: dt.datetime | None = None
) -> Breach:
    """Declare incident ``incident_id`` a personal-data breach: compute what it reached and start
    the clock (deadline = now + ``breach_notify_hours``). One breach per incident."""
    from stripe_platform.audit import access_log, incidents

    if not by:
        raise BreachError("who declares a breach must be named")
    now = _now(now)
    try:
        incident = incidents.get_incident(settings, incident_id)
    except incidents.IncidentNotFound:
        raise BreachError(f"no incident #{incident_id}: only an incident can be declared") from None
    with _connect(settings) as conn:
        existing = conn.execute(
            "SELECT id FROM privacy.breach WHERE incident_id = %s", (incident_id,)
        ).fetchone()
    if existing:
        raise BreachError(f"incident #{incident_id} is already declared: breach #{existing['id']}")
    affected = affected_by(settings, incident)
    deadline = now + dt.timedelta(hours=settings.breach_notify_hours)
    with _connect(settings) as conn:
        try:
            row = conn.execute(
                f"""INSERT INTO privacy.breach (incident_id, declared_at, declared_by, deadline,
                        affected) VALUES (%s, %s, %s, %s, %s::jsonb) RETURNING {_COLUMNS}""",
                (incident_id, now, by, deadline, json.dumps(affected, sort_keys=True)),
            ).fetchone()
        except psycopg.errors.UniqueViolation:  # declared meanwhile by someone else
            raise BreachError(f"incident #{incident_id} is already declared") from None
    breach = Breach(**row)
    access_log.record(
        settings,
        kind="admin",
        user=by,
        source=None,
        resource=f"breach:{breach.id}",
        action="breach.declare",
        outcome="allow",
        via="cli",
        detail={
            "incident_id": incident_id,
            "deadline": deadline.isoformat(),
            "subjects": affected["subjects_approx"],
        },
    )
    return breach


def affected_by(settings: Settings, incident: Any) -> dict[str, Any]:
    """What the incident's evidence reached: datasets with the catalog fields, classes and
    categories read, subjects (exact ids where the log names them, an estimate otherwise) and
    records. Trail references in the evidence (``trail:...``) carry no statement: counted only."""
    from stripe_platform.audit import detect
    from stripe_platform.audit.collector import COLLECTION
    from stripe_platform.docstore import client as docstore
    from stripe_platform.governance.classification import load_catalog

    catalog = load_catalog()
    ctx = detect.load_context(settings, database=False)
    ids = [e for e in incident.evidence if not e.startswith("trail:")]
    database = docstore.connect(settings)
    try:
        docs = list(database[COLLECTION].find({"_id": {"$in": ids}})) if ids else []
    finally:
        database.client.close()
    found = {str(d["_id"]) for d in docs}

    subjects: set[int] = set()
    reads: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"fields": set(), "rows": 0, "rows_known": True, "statements": 0}
    )
    users, sources = set(), set()
    for doc in docs:
        if doc.get("user"):
            users.add(str(doc["user"]))
        if doc.get("remote_host"):
            sources.add(str(doc["remote_host"]))
        # One Log document is one query: its statement line names what was read, a later line
        # of it (the duration) may say how many rows.
        events = [
            detect.Event(doc, line, ctx, detect.DEFAULT_HOURS) for line in doc.get("lines") or ()
        ]
        counted = [e.get("rows") for e in events if e.get("rows") is not None]
        rows = sum(counted) if counted else None
        for event in events:
            line = event.line
            match = _API_SUBJECT_READ.search(line.get("message") or "")
            if doc.get("source") == "api" and match and line.get("error_severity") == "LOG":
                subjects.add(int(match.group(1)))
                for table, fields in _api_pii_fields(ctx).items():
                    reads[table]["fields"].update(fields)
                    reads[table]["rows"] += 1
                    reads[table]["statements"] += 1
                continue
            statement = event.get("statement")
            if not statement or line.get("error_severity") != "LOG":
                continue  # a refused or failed statement read nothing
            # The rules' own parse of a statement (cached there): relations and names read.
            _command, relations, names, everything = detect._statement_shape(statement)
            for relation in relations:
                columns = ctx.columns.get(relation)
                if not columns:
                    continue  # no personal column in that table
                read = set(columns) if everything else {c for c in columns if c in names}
                if not read:
                    continue
                entry = reads[relation]
                entry["fields"].update(read)
                entry["statements"] += 1
                if rows is None:
                    entry["rows_known"] = False
                else:
                    entry["rows"] += rows

    datasets, categories, classes = [], set(), set()
    estimate = len(subjects)
    for table in sorted(reads):
        entry = reads[table]
        fields = sorted(entry["fields"])
        entries = [catalog.get("postgres", table, f) for f in fields]
        table_classes = sorted({e.data_class.value for e in entries})
        table_categories = sorted({e.category for e in entries if e.category})
        classes.update(table_classes)
        categories.update(table_categories)
        subject = catalog.subject("postgres", table)
        bound = _distinct_subjects(settings, table, subject) if subject else None
        table_subjects = (
            min(entry["rows"], bound) if entry["rows_known"] and bound is not None else bound
        )
        if table_subjects is not None:
            estimate = max(estimate, table_subjects)
        datasets.append(
            {
                "store": "postgres",
                "dataset": table,
                "fields": fields,
                "classes": table_classes,
                "categories": table_categories,
                "statements": entry["statements"],
                "records": entry["rows"] if entry["rows_known"] else bound,
                "records_exact": entry["rows_known"],
                "subjects": table_subjects,
            }
        )
    return {
        "evidence": len(incident.evidence),
        "evidence_read": len(found),
        "evidence_missing": sorted(set(ids) - found),
        "users": sorted(users),
        "sources": sorted(sources),
        "datasets": datasets,
        "classes": sorted(classes),
        "categories": sorted(categories),
        "subject_ids": sorted(subjects),
        "subjects_exact": len(subjects),
        "subjects_approx": estimate,
        "records_approx": sum(d["records"] or 0 for d in datasets),
    }


def _api_pii_fields(ctx: Any) -> dict[str, set[str]]:
    """The personal catalog fields GET /v1/customers/{id}/pii returns, from the route's own
    column lists (api/customers.py), per table."""
    from stripe_platform.api.customers import ADDRESS, CUSTOMER

    fields: dict[str, set[str]] = defaultdict(set)
    for column in (*CUSTOMER, *ADDRESS):
        table, name = column.source.split(".")
        if name in ctx.columns.get(table, {}):
            fields[table].add(name)
    return fields


def _distinct_subjects(settings: Settings, table: str, subject: str) -> int | None:
    """The table's distinct subjects: the most a read of it can have reached."""
    from stripe_platform.oltp import db

    try:
        with db.connect(settings, with_key=False, autocommit=True) as conn:
            (n,) = conn.execute(
                sql.SQL("SELECT count(DISTINCT {}) FROM {}").format(
                    sql.Identifier(subject), sql.Identifier(table)
                )
            ).fetchone()
    except psycopg.Error:
        return None
    return int(n)


# -- reading -------------------------------------------------------------------------------------
def get_breach(settings: Settings, breach_id: int) -> Breach:
    with _connect(settings) as conn:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM privacy.breach WHERE id = %s", (breach_id,)
        ).fetchone()
    if row is None:
        raise BreachNotFound(f"no breach #{breach_id}")
    return Breach(**row)


def list_breaches(settings: Settings, *, state: str | None = None) -> list[Breach]:
    if state is not None and state not in STATES:
        raise BreachError(f"state {state!r}: one of {', '.join(STATES)}")
    with _connect(settings) as conn:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM privacy.breach WHERE (%s::text IS NULL OR state = %s) "
            "ORDER BY id",
            (state, state),
        ).fetchall()
    return [Breach(**row) for row in rows]


def _clock(b: Breach, now: dt.datetime) -> BreachClock:
    if b.state == "submitted":
        overdue = b.submitted_at > b.deadline  # type: ignore[operator]
        left = 0.0
    else:
        overdue = now > b.deadline
        left = round((b.deadline - now).total_seconds() / 3600, 2)
    return BreachClock(
        id=b.id,
        incident_id=b.incident_id,
        declared_at=b.declared_at,
        deadline=b.deadline,
        state=b.state,
        overdue=overdue,
        submitted_at=b.submitted_at,
        hours_left=left,
    )


def clocks(settings: Settings, now: dt.datetime | None = None) -> list[BreachClock]:
    """Every breach's clock: open ones first by deadline, then submitted ones newest first."""
    now = _now(now)
    found = [_clock(b, now) for b in list_breaches(settings)]
    open_ = sorted((c for c in found if c.state == "open"), key=lambda c: c.deadline)
    done = sorted(
        (c for c in found if c.state != "open"), key=lambda c: c.submitted_at, reverse=True
    )
    return open_ + done


# -- the notification ----------------------------------------------------------------------------
def declarations() -> dict[str, Any]:
    """compliance/declarations.yaml: the controller, the DPO, PCI scope, allowed destinations."""
    from stripe_platform.compliance.controls import load_declarations

    return load_declarations()


def draft_notification(settings: Settings, breach_id: int) -> dict[str, Any]:
    """The authority notification with GDPR Art. 33(3)'s contents: (a) the nature of the breach,
    categories and approximate numbers of subjects and records; (b) the DPO's contact; (c) its
    likely consequences; (d) the measures taken or proposed. Plus the clock (Art. 33(1)) and, when
    late, the reasons field Art. 33(1) asks for."""
    from stripe_platform.audit import incidents

    breach = get_breach(settings, breach_id)
    incident = incidents.get_incident(settings, breach.incident_id)
    a = breach.affected
    classes = set(a.get("classes", ()))
    consequences = []
    if "pci" in classes:
        consequences.append("financial fraud with the card data read (PAN)")
    if classes & {"pii", "pii_quasi"}:
        consequences.append(
            "phishing, identity theft or unwanted contact using the identifiers read"
        )
    if "credential" in classes:
        consequences.append("account takeover if the credential hashes are cracked")
    if not consequences:
        consequences.append("none identified: no personal field of the catalog was read")
    measures_taken = [f"incident #{incident.id} opened {incident.first_seen.isoformat()}"]
    if incident.status != "open":
        measures_taken.append(
            f"incident {incident.status} by {incident.acknowledged_by or incident.resolved_by}"
        )
    if incident.user:
        measures_taken.append(f"access of {incident.user} under review (`access review`)")
    now = dt.datetime.now(dt.UTC)
    clock = _clock(breach, now)
    return {
        "breach_id": breach.id,
        "incident_id": incident.id,
        "controller": declarations()["controller"],
        "dpo_contact": declarations()["dpo"],
        "nature": {
            "description": incident.title,
            "rule": incident.rule,
            "severity": incident.severity,
            "first_seen": incident.first_seen.isoformat(),
            "last_seen": incident.last_seen.isoformat(),
            "who": a.get("users", []),
            "from": a.get("sources", []),
            "datasets": [f"{d['store']} {d['dataset']}" for d in a.get("datasets", [])],
        },
        "categories_of_data": a.get("categories", []),
        "classes_of_data": a.get("classes", []),
        "subjects_approx": a.get("subjects_approx", 0),
        "subjects_exact": a.get("subjects_exact", 0),
        "records_approx": a.get("records_approx", 0),
        "likely_consequences": consequences,
        "measures_taken": measures_taken,
        "measures_proposed": [
            "revoke or rotate the access used (access apply / keys rotate)",
            "inform the affected subjects if the risk is high (Art. 34)",
        ],
        "declared_at": breach.declared_at.isoformat(),
        "deadline": breach.deadline.isoformat(),
        "late": clock.overdue,
        "reasons_for_delay": "(required: the notification is late)" if clock.overdue else None,
        "state": breach.state,
        "reference": breach.reference,
    }


def submit(
    settings: Settings,
    breach_id: int,
    *,
    by: str,
    reference: str,
    now: dt.datetime | None = None,
) -> Breach:
    """Record the notification as submitted to the authority under ``reference``."""
    from stripe_platform.audit import access_log

    if not by:
        raise BreachError("who submits a notification must be named")
    if not reference or not reference.strip():
        raise BreachError("submit needs the authority's reference for the notification")
    now = _now(now)
    with _connect(settings) as conn, conn.transaction():
        row = conn.execute(
            "SELECT state FROM privacy.breach WHERE id = %s FOR UPDATE", (breach_id,)
        ).fetchone()
        if row is None:
            raise BreachNotFound(f"no breach #{breach_id}")
        if row["state"] != "open":
            raise BreachError(f"breach #{breach_id} is already {row['state']}")
        row = conn.execute(
            f"""UPDATE privacy.breach SET state = 'submitted', submitted_at = %s,
                    submitted_by = %s, reference = %s WHERE id = %s RETURNING {_COLUMNS}""",
            (now, by, reference.strip(), breach_id),
        ).fetchone()
    breach = Breach(**row)
    access_log.record(
        settings,
        kind="admin",
        user=by,
        source=None,
        resource=f"breach:{breach_id}",
        action="breach.submit",
        outcome="allow",
        via="cli",
        detail={"reference": breach.reference, "late": breach.submitted_at > breach.deadline},
    )
    return breach


def check_overdue(settings: Settings, now: dt.datetime | None = None) -> list[Any]:
    """An incident (critical) per open breach past its deadline, once per breach: the alert goes
    the incidents' way (webhook, access log). Returns the incidents raised."""
    from stripe_platform.audit import incidents
    from stripe_platform.audit.detect import Finding

    now = _now(now)
    overdue = [c for c in clocks(settings, now) if c.state == "open" and c.overdue]
    findings = [
        Finding(
            rule=OVERDUE_RULE,
            severity="critical",
            title=f"breach #{c.id} (incident #{c.incident_id}): the authority notification is "
            f"overdue since {c.deadline.isoformat()}",
            user=None,
            source=None,
            at=now,
            evidence=(f"breach:{c.id}",),
            dedup_key=f"{OVERDUE_RULE}:{c.id}",
            detail={
                "breach_id": c.id,
                "incident_id": c.incident_id,
                "deadline": c.deadline.isoformat(),
                "hours_late": -c.hours_left,
            },
        )
        for c in overdue
    ]
    raised = incidents.raise_findings(settings, findings)
    if overdue:
        with _connect(settings) as conn:
            conn.execute(
                "UPDATE privacy.breach SET overdue_alerted_at = coalesce(overdue_alerted_at, %s) "
                "WHERE id = ANY(%s)",
                (now, [c.id for c in overdue]),
            )
    return raised
