"""The jobs of the ``audit_collect``, ``audit_watch`` and ``audit_retention`` DAGs (issue 22),
callable without Airflow:

- ``collect``: one collector pass (audit/collector.py): PostgreSQL's jsonlog and the API's access
  log since the saved positions, into the Log collection, the trail and the lake. Every 5 minutes;
  a pass is incremental, so a late or skipped run only makes the next one longer.
- ``watch``: the last ``hours`` of the Log collection through the detection rules (audit/detect.py)
  and, when a champion is registered, the log anomaly model (ml/log_anomaly.py); the findings raised
  as incidents (audit/incidents.py). Hourly, over two hours by default: a document collected late
  is still looked at, and a finding seen twice is grouped, not alerted twice.
- ``retention``: the trail's retention (lake export, expired records removed, itself recorded), a
  checkpoint, then ``verify`` against the lake copy; a failed verify raises a critical incident and
  fails the task (``AuditVerifyFailed``), so the Airflow failure alert fires as well.

The other modules are imported inside the functions: each job only needs its own.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError

log = logging.getLogger("stripe_platform.orchestration.audit")

WATCH_HOURS = 2  # the hourly watch looks at two hours: a late-collected document is still seen
MODEL_RULE = "model:log_anomaly"


class AuditVerifyFailed(PlatformError, RuntimeError):
    """The trail did not verify after the retention run (an incident has been raised)."""


def collect(settings: Settings) -> dict[str, Any]:
    """One collector pass, up to the log files' sizes when it started."""
    from stripe_platform.audit.collector import collect as collect_pass

    return collect_pass(settings, until_idle=True).as_dict()


def _window(logs: Any, start: dt.datetime, rules: Any) -> tuple[list[dict], list[dict]]:
    """The Log documents with a line since ``start``, and the history the rules need before it
    (minutes of everything for bursts cut by the window's start; days of row-reporting documents
    for the baselines), as ``audit rules run`` reads them."""
    from stripe_platform.cli.audit_rules import history_spans

    bursts, baselines = history_spans(rules)
    docs = list(logs.find({"lines.timestamp": {"$gte": start}}))
    history = list(logs.find({"lines.timestamp": {"$gte": start - bursts, "$lt": start}}))
    if baselines > bursts:
        history += logs.find(
            {
                "lines.timestamp": {"$gte": start - baselines, "$lt": start - bursts},
                "lines.message": {"$regex": "rows: [0-9]"},
            }
        )
    return docs, history


def _model_findings(settings: Settings, docs: list[dict], notes: list[str]) -> list:
    """The log anomaly model's findings, or none (with a note) when there is no model module or no
    champion registered yet: the rules still run."""
    try:
        from stripe_platform.ml import log_anomaly
    except ImportError:
        notes.append("log anomaly model not available (ml/log_anomaly.py): rules only")
        return []
    from stripe_platform.ml.registry import NoChampion

    try:
        return list(log_anomaly.score(settings, docs))
    except NoChampion as exc:
        notes.append(f"log anomaly model: no champion registered ({exc}): rules only")
        return []


def watch(
    settings: Settings, *, hours: float = WATCH_HOURS, now: dt.datetime | None = None
) -> dict[str, Any]:
    """Rules (and the model) over the last ``hours`` of Log documents; findings -> incidents."""
    from stripe_platform.audit.detect import detect, load_context, load_rules
    from stripe_platform.audit.incidents import raise_findings
    from stripe_platform.docstore import client as docstore

    now = now or dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(hours=hours)
    rules = load_rules()
    database = docstore.connect(settings)
    try:
        docs, history = _window(database["Log"], start, rules)
    finally:
        database.client.close()
    context = load_context(settings)
    notes = list(context.notes)
    findings = detect(settings, docs, now=now, history=history, rules=rules, context=context)
    # The rules' incidents first: a model that fails (registry down) fails the task after them.
    incidents = raise_findings(settings, findings)
    model = _model_findings(settings, docs, notes) if docs else []
    incidents += raise_findings(settings, model)
    for note in notes:
        log.warning("audit watch: %s", note)
    return {
        "window": {"from": start.isoformat(), "to": now.isoformat()},
        "documents": len(docs),
        "history_documents": len(history),
        "rule_findings": len(findings),
        "model_findings": len(model),
        "incidents": {
            change: sorted({i.id for i in incidents if i.change == change})
            for change in ("new", "escalated", "grouped")
        },
        "notes": notes,
    }


def retention(settings: Settings, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Retention (with the lake export first), a checkpoint, then verify against the lake copy."""
    from stripe_platform.audit import trail

    applied = trail.apply_retention(settings, now)
    checkpoints = trail.checkpoint(settings)
    report = trail.verify(settings, lake=True)
    result = {
        "retention": applied.as_dict(),
        "checkpoints": len(checkpoints),
        "verify": report.as_dict(),
    }
    if not report.ok:
        incidents = trail.raise_incident(settings, report) or []
        bad = report.first_bad
        raise AuditVerifyFailed(
            f"audit trail verification failed after retention: stream {bad.stream} seq {bad.seq} "
            f"{bad.why} (incident(s) {', '.join(f'#{i.id}' for i in incidents) or 'none'}; "
            "`stripe-platform audit verify` says more)"
        )
    return result
