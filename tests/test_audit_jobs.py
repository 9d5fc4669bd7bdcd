"""The audit DAGs' job functions (orchestration/audit.py) on the session's real PostgreSQL and
document server: collect ships a fresh API access-log line into the Log collection; watch raises
hand-made Log documents of the last hours as incidents, alerts each once, and a second run over the
same window alerts nothing; retention keeps a clean trail verifying, and a tampered one raises a
critical incident and fails the task."""

from __future__ import annotations

import datetime as dt
import secrets
import sys
import types

import pytest
from pydantic import SecretStr

from stripe_platform.audit import access_log, incidents, trail
from stripe_platform.oltp import db
from stripe_platform.orchestration import audit as jobs
from webhook import Webhook


@pytest.fixture(scope="module")
def webhook():
    with Webhook() as hook:
        yield hook


@pytest.fixture
def s(settings, database, docdb, webhook, tmp_path):
    webhook.bodies.clear()
    return settings.model_copy(
        update={
            "pg_database": database,
            "mongodb_database": docdb.name,
            "lake_uri": str(tmp_path / "lake"),
            "alert_webhook_url": SecretStr(webhook.url),
        }
    )


def test_collect_ships_new_lines_into_the_log_collection(s, docdb):
    probe = f"/w5-probe/{secrets.token_hex(6)}"
    access_log.record(
        s, kind="request", user="bob", source="10.0.0.9", resource=probe, action="GET",
        outcome="allow", detail={"status": 200},
    )  # fmt: skip
    result = jobs.collect(s)
    assert result["lines_read"] > 0 and result["trail_records"] > 0
    (doc,) = docdb["Log"].find({"source": "api", "lines.message": f"GET {probe} -> 200"})
    assert (doc["user"], doc["remote_host"]) == ("bob", "10.0.0.9")
    # The next pass resumes after it: the probe is not shipped twice.
    jobs.collect(s)
    assert docdb["Log"].count_documents({"lines.message": f"GET {probe} -> 200"}) == 1


_n = iter(range(1, 1_000_000))


def log_doc(user: str, at: dt.datetime, line: dict, host: str = "10.0.4.7") -> dict:
    n = next(_n)
    return {
        "_id": f"w5log{n:06d}",
        "user": user,
        "dbname": "stripe",
        "pid": 7000 + n,
        "remote_host": host,
        "session_id": f"w5s{n}",
        "session_start": at,
        "application_name": "psql",
        "lines": [{"timestamp": at, **line}],
    }


def grant(text: str) -> dict:
    return {"error_severity": "LOG", "message": f"statement: {text}"}


def refused(user: str) -> dict:
    return {
        "error_severity": "FATAL",
        "state_code": "28P01",
        "message": f'password authentication failed for user "{user}"',
    }


def test_watch_raises_the_last_hours_as_incidents_once(s, docdb, webhook):
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    recent = now - dt.timedelta(minutes=40)
    docs = [
        log_doc("carol", recent, grant("GRANT SELECT ON Customer TO dave")),
        log_doc("carol", recent + dt.timedelta(minutes=1), grant("ALTER ROLE dave CREATEROLE")),
        *(
            log_doc(
                "mallory", recent + dt.timedelta(seconds=5 * k), refused("mallory"), "185.3.4.9"
            )
            for k in range(10)
        ),
        # Out of the two hours looked at (and of the minutes bursts look back): not raised.
        log_doc("zed", now - dt.timedelta(hours=5), grant("GRANT ALL ON Card TO zed")),
    ]
    docdb["Log"].insert_many(docs)

    first = jobs.watch(s, now=now)
    assert first["documents"] == 12
    assert first["rule_findings"] >= 2
    raised = incidents.list_incidents(s)
    assert {(i.rule, i.user) for i in raised} == {
        ("privilege_change", "carol"),
        ("failed_login_burst", "mallory"),
    }
    assert sorted(first["incidents"]["new"]) == sorted(i.id for i in raised)
    by_rule = {i.rule: i for i in raised}
    assert set(by_rule["privilege_change"].evidence) == {docs[0]["_id"], docs[1]["_id"]}
    assert set(by_rule["failed_login_burst"].evidence) == {d["_id"] for d in docs[2:12]}
    assert sorted(b["incident_id"] for b in webhook.bodies) == sorted(i.id for i in raised)
    assert all(b["event"] == "incident_raised" for b in webhook.bodies)

    # The next hour's run sees the same documents again: nothing new, no alert.
    second = jobs.watch(s, now=now + dt.timedelta(minutes=5))
    assert second["incidents"] == {"new": [], "escalated": [], "grouped": []}
    assert len(webhook.bodies) == len(raised)
    assert [i.count for i in incidents.list_incidents(s)] == [1, 1]


def test_watch_over_an_empty_window(s, webhook):
    result = jobs.watch(s)
    assert (result["documents"], result["rule_findings"], result["model_findings"]) == (0, 0, 0)
    assert incidents.list_incidents(s) == [] and webhook.bodies == []


NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)


def records(n: int, days_ago: int, start: int = 0) -> list:
    at = NOW - dt.timedelta(days=days_ago)
    return [
        (f"w5:{start + k}", at + dt.timedelta(seconds=k), "request", {"k": start + k})
        for k in range(n)
    ]


def test_retention_clean_then_tampered(s, webhook):
    trail.append(s, "postgres", records(5, days_ago=120))  # past the 90 hot days
    trail.append(s, "postgres", records(3, days_ago=5, start=5))
    result = jobs.retention(s, now=NOW)
    assert [(c["stream"], c["removed"]) for c in result["retention"]["cuts"]] == [("postgres", 5)]
    assert result["verify"]["ok"] is True and result["verify"]["first_bad"] is None
    assert incidents.list_incidents(s) == [] and webhook.bodies == []

    # An intruder with superuser rights edits a kept record, triggers off.
    with db.connect(s, with_key=False, autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            "UPDATE audit.trail_record SET payload = '{\"k\":99}' "
            "WHERE stream = 'postgres' AND seq = 7"
        )
    with pytest.raises(jobs.AuditVerifyFailed, match="stream postgres seq 7 altered"):
        jobs.retention(s, now=NOW + dt.timedelta(days=1))
    (incident,) = incidents.list_incidents(s)
    assert (incident.rule, incident.severity, incident.status) == (
        "audit:trail_verify",
        "critical",
        "open",
    )
    assert incident.evidence == ("trail:postgres:7",)
    assert [(b["event"], b["severity"]) for b in webhook.bodies] == [
        ("incident_raised", "critical")
    ]
    # The retry (Airflow's) fails again without a second alert.
    with pytest.raises(jobs.AuditVerifyFailed):
        jobs.retention(s, now=NOW + dt.timedelta(days=1))
    assert len(webhook.bodies) == 1


def test_watch_raises_the_model_findings_and_runs_without_a_champion(
    s, docdb, webhook, monkeypatch
):
    from stripe_platform.audit.detect import Finding
    from stripe_platform.ml.registry import NoChampion

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    quiet = log_doc("tom", now - dt.timedelta(minutes=10), grant("SELECT 1"))
    docdb["Log"].insert_one(quiet)
    seen: list[list[str]] = []

    def score(settings, docs):
        seen.append([d["_id"] for d in docs])
        return [
            Finding(
                rule=jobs.MODEL_RULE,
                severity="high",
                title="unusual session by tom",
                user="tom",
                source="10.0.4.7",
                at=now,
                evidence=(quiet["_id"],),
                dedup_key=f"{jobs.MODEL_RULE}:tom:{now.date()}",
            )
        ]

    # W4's ml/log_anomaly.py, as its contract says (score(settings, docs) -> list[Finding]).
    model = types.ModuleType("stripe_platform.ml.log_anomaly")
    model.score = score
    monkeypatch.setitem(sys.modules, "stripe_platform.ml.log_anomaly", model)
    # ...and as the package's attribute, which `from stripe_platform.ml import log_anomaly` reads
    # first once the real module was imported by another test.
    import stripe_platform.ml

    monkeypatch.setattr(stripe_platform.ml, "log_anomaly", model, raising=False)
    result = jobs.watch(s, now=now)
    assert seen == [[quiet["_id"]]]  # the window's documents, not the history
    assert (result["rule_findings"], result["model_findings"]) == (0, 1)
    (incident,) = incidents.list_incidents(s)
    assert (incident.rule, incident.user, incident.evidence) == (
        jobs.MODEL_RULE,
        "tom",
        (quiet["_id"],),
    )
    assert [b["rule"] for b in webhook.bodies] == [jobs.MODEL_RULE]

    def no_champion(settings, docs):
        raise NoChampion("no version of log_anomaly has the alias champion")

    model.score = no_champion
    result = jobs.watch(s, now=now)
    assert result["model_findings"] == 0
    assert any("no champion" in note for note in result["notes"])
