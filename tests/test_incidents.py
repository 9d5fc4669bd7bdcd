"""Incidents (audit/incidents.py, sql/oltp/0022): findings grouped per dedup key while unresolved,
severity escalation, the open -> acknowledged -> resolved transitions (and the refused ones), one
webhook alert per new incident or escalation (a real HTTP receiver), the access log lines, the CLI
with --json, and the dashboard's counts, on the session's real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from stripe_platform.audit import access_log, incidents
from stripe_platform.audit.detect import Finding
from stripe_platform.config import get_settings
from webhook import Webhook

T0 = dt.datetime(2026, 12, 7, 2, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def webhook():
    with Webhook() as hook:
        yield hook


@pytest.fixture
def s(settings, database, webhook, tmp_path, monkeypatch):
    webhook.bodies.clear()
    # This test's own access log directory (the session's home is shared by every test).
    monkeypatch.setattr(access_log, "_directory", lambda _settings: str(tmp_path / "access"))
    return settings.model_copy(
        update={"pg_database": database, "alert_webhook_url": SecretStr(webhook.url)}
    )


def finding(key="r:alice:2026-12-07", severity="medium", at=T0, evidence=("doc-1",), **kw):
    return Finding(
        rule=kw.pop("rule", "privilege_change"),
        severity=severity,
        title=kw.pop("title", "GRANT by alice"),
        user=kw.pop("user", "alice"),
        source=kw.pop("source", "10.0.0.7"),
        at=at,
        evidence=tuple(evidence),
        dedup_key=key,
        detail=kw.pop("detail", {"statement": "GRANT ..."}),
    )


def access_events() -> list[dict]:
    lines = []
    for path in sorted(Path(access_log._directory(None)).glob("*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in lines if (e.get("resource") or "").startswith("incident:")]


def test_grouping_escalation_and_one_alert_per_new_incident(s, webhook):
    first = incidents.raise_findings(s, [finding()])
    assert [i.change for i in first] == ["new"]
    (inc,) = first
    assert (inc.status, inc.severity, inc.count, inc.evidence) == ("open", "medium", 1, ("doc-1",))
    assert (inc.user, inc.source, inc.first_seen, inc.last_seen) == ("alice", "10.0.0.7", T0, T0)

    # Same key, new evidence, later: grouped into it, no alert.
    later = T0 + dt.timedelta(minutes=30)
    (grouped,) = incidents.raise_findings(s, [finding(at=later, evidence=("doc-2", "doc-1"))])
    assert (grouped.id, grouped.change, grouped.count) == (inc.id, "grouped", 2)
    assert grouped.evidence == ("doc-1", "doc-2")
    assert (grouped.first_seen, grouped.last_seen, grouped.severity) == (T0, later, "medium")

    # The very same finding again (an overlapping watch window): nothing changes.
    assert incidents.raise_findings(s, [finding(at=later, evidence=("doc-2",))]) == []
    # A lower severity never lowers it.
    (low,) = incidents.raise_findings(s, [finding(severity="low", at=later, evidence=("doc-3",))])
    assert (low.severity, low.change, low.count) == ("medium", "grouped", 3)

    # A different key: a second incident, in the same batch as an escalation of the first.
    both = incidents.raise_findings(
        s,
        [
            finding(key="failed_logins:10.0.0.9", rule="failed_logins", severity="high"),
            finding(severity="critical", title="GRANT ALL by alice", evidence=("doc-4",)),
        ],
    )
    assert [(i.change, i.severity) for i in both] == [("new", "high"), ("escalated", "critical")]
    assert both[1].id == inc.id and both[1].title == "GRANT ALL by alice"

    # Webhook: exactly the two new incidents and the escalation, in order.
    events = [(b["event"], b["incident_id"], b["severity"]) for b in webhook.bodies]
    assert events == [
        ("incident_raised", inc.id, "medium"),
        ("incident_raised", both[0].id, "high"),
        ("incident_escalated", inc.id, "critical"),
    ]
    assert webhook.bodies[0]["evidence"] == ["doc-1"]
    assert f"incident #{inc.id}" in webhook.bodies[2]["text"]
    # ... and the access log has the same three.
    logged = [(e["kind"], e["action"], e["resource"]) for e in access_events()]
    assert logged == [
        ("admin", "incident.raise", f"incident:{inc.id}"),
        ("admin", "incident.raise", f"incident:{both[0].id}"),
        ("admin", "incident.escalate", f"incident:{inc.id}"),
    ]

    # The database holds one row per key, not one per finding.
    with _conn(s) as conn:
        rows = conn.execute("SELECT dedup_key, count FROM audit.incident ORDER BY id").fetchall()
    assert rows == [("r:alice:2026-12-07", 4), ("failed_logins:10.0.0.9", 1)]


def _conn(s):
    from stripe_platform.oltp import db

    return db.connect(s, with_key=False, autocommit=True)


def test_transitions_and_refusals(s, webhook):
    (inc,) = incidents.raise_findings(s, [finding()])
    acked = incidents.acknowledge(s, inc.id, by="bob", note="looking")
    assert (acked.status, acked.acknowledged_by, acked.ack_note) == (
        "acknowledged",
        "bob",
        "looking",
    )
    assert acked.acknowledged_at is not None and acked.resolved_at is None
    with pytest.raises(incidents.IncidentStateError, match="is acknowledged"):
        incidents.acknowledge(s, inc.id, by="bob")

    # While acknowledged it is still unresolved: a new finding groups into it, no alert.
    (grouped,) = incidents.raise_findings(s, [finding(evidence=("doc-9",))])
    assert (grouped.id, grouped.status, grouped.count) == (inc.id, "acknowledged", 2)

    done = incidents.resolve(s, inc.id, by="carol", note="approved change")
    assert (done.status, done.resolved_by, done.resolve_note) == (
        "resolved",
        "carol",
        "approved change",
    )
    assert done.acknowledged_by == "bob"  # the history stays
    for change in (incidents.acknowledge, incidents.resolve):
        with pytest.raises(incidents.IncidentStateError, match="is resolved"):
            change(s, inc.id, by="bob")
    with pytest.raises(incidents.IncidentNotFound, match="no incident #999999"):
        incidents.resolve(s, 999999, by="bob")

    # Re-reading the same evidence does not reopen it; a new occurrence opens a new incident.
    assert incidents.raise_findings(s, [finding(evidence=("doc-1",))]) == []
    (again,) = incidents.raise_findings(
        s, [finding(at=T0 + dt.timedelta(hours=2), evidence=("doc-10",))]
    )
    assert again.id != inc.id and again.change == "new" and again.status == "open"

    # open -> resolved directly is allowed.
    closed = incidents.resolve(s, again.id, by="carol")
    assert closed.status == "resolved" and closed.acknowledged_at is None
    assert [b["event"] for b in webhook.bodies] == ["incident_raised", "incident_raised"]
    actions = [(e["action"], e["user"]) for e in access_events() if e["action"] != "incident.raise"]
    assert actions == [
        ("incident.acknowledge", "bob"),
        ("incident.resolve", "carol"),
        ("incident.resolve", "carol"),
    ]

    # The database refuses an inconsistent status too (not only the module).
    with _conn(s) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE audit.incident SET status = 'open' WHERE id = %s", (inc.id,))


def test_bad_findings_refused(s):
    with pytest.raises(incidents.IncidentError, match="severity 'urgent'"):
        incidents.raise_findings(s, [finding(severity="urgent")])
    with pytest.raises(incidents.IncidentError, match="no dedup key"):
        incidents.raise_findings(s, [finding(key="")])
    assert incidents.list_incidents(s) == []


def test_list_and_counts(s):
    made = incidents.raise_findings(
        s,
        [
            finding(key="a", severity="low", at=T0),
            finding(key="b", severity="high", at=T0 + dt.timedelta(hours=1)),
            finding(key="c", severity="critical", at=T0 + dt.timedelta(hours=2)),
        ],
    )
    a, b, c = (i.id for i in made)
    incidents.acknowledge(s, b, by="bob")
    incidents.resolve(s, c, by="bob")
    assert [i.id for i in incidents.list_incidents(s)] == [c, b, a]  # newest activity first
    assert [i.id for i in incidents.list_incidents(s, status="open")] == [a]
    assert [i.id for i in incidents.list_incidents(s, status=["open", "acknowledged"])] == [b, a]
    assert [i.id for i in incidents.list_incidents(s, severity="high")] == [b]
    assert [i.id for i in incidents.list_incidents(s, since=T0 + dt.timedelta(minutes=30))] == [
        c,
        b,
    ]
    with pytest.raises(incidents.IncidentError, match="status 'closed'"):
        incidents.list_incidents(s, status="closed")
    got = incidents.counts(s)
    assert got["total"] == 3
    assert got["by_status"] == {"open": 1, "acknowledged": 1, "resolved": 1}
    assert got["unresolved_by_severity"] == {"low": 1, "medium": 0, "high": 1, "critical": 0}
    assert got["by_status_severity"]["resolved"]["critical"] == 1
    assert got["oldest_unresolved"] == T0.isoformat()


def test_cli(s, webhook, monkeypatch):
    from stripe_platform.cli import app

    monkeypatch.setenv("STRIPE_PLATFORM_PROFILE", "embedded")
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(s.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_ALERT_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", s.pg_database)
    get_settings.cache_clear()
    (one, two) = incidents.raise_findings(
        s, [finding(key="x", severity="high"), finding(key="y", severity="low", evidence=("d-7",))]
    )
    runner = CliRunner()
    try:
        out = runner.invoke(app, ["incidents", "list", "--json"])
        assert out.exit_code == 0, out.output
        assert [i["id"] for i in json.loads(out.stdout)] == [two.id, one.id]
        out = runner.invoke(app, ["incidents", "list", "--severity", "high", "--json"])
        assert [i["id"] for i in json.loads(out.stdout)] == [one.id]
        out = runner.invoke(app, ["incidents", "list"])
        assert out.exit_code == 0 and f"{one.id}" in out.stdout and "high" in out.stdout

        out = runner.invoke(app, ["incidents", "show", str(two.id), "--json"])
        shown = json.loads(out.stdout)
        assert (shown["id"], shown["evidence"], shown["status"]) == (two.id, ["d-7"], "open")

        out = runner.invoke(app, ["incidents", "ack", str(two.id), "--note", "on it", "--json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["status"] == "acknowledged"
        assert json.loads(out.stdout)["ack_note"] == "on it"
        out = runner.invoke(app, ["incidents", "ack", str(two.id)])
        assert out.exit_code == 1 and "is acknowledged" in out.stderr
        out = runner.invoke(app, ["incidents", "resolve", str(two.id), "--note", "fixed"])
        assert out.exit_code == 0 and "resolved" in out.stdout
        out = runner.invoke(app, ["incidents", "resolve", str(two.id)])
        assert out.exit_code == 1 and "is resolved" in out.stderr

        out = runner.invoke(app, ["incidents", "show", "424242"])
        assert out.exit_code == 1 and "no incident #424242" in out.stderr
        out = runner.invoke(app, ["incidents", "list", "--status", "closed"])
        assert out.exit_code != 0 and "closed" in out.output + out.stderr
        out = runner.invoke(app, ["incidents", "counts", "--json"])
        assert json.loads(out.stdout)["by_status"] == {"open": 1, "acknowledged": 0, "resolved": 1}
    finally:
        get_settings.cache_clear()


def test_concurrent_raisers_make_one_incident_per_key(s, webhook):
    # Eight threads raising the same twenty new keys at once (their transactions overlap): one
    # incident a key, one alert a key, every thread's evidence in it.
    keys = [f"burst-{n}" for n in range(20)]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def raise_all(k: int) -> None:
        try:
            batch = [finding(key=key, evidence=(f"doc-{k}",)) for key in keys]
            barrier.wait()
            incidents.raise_findings(s, batch)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=raise_all, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    raised = incidents.list_incidents(s)
    assert sorted(i.dedup_key for i in raised) == sorted(keys)
    for inc in raised:
        assert (inc.count, sorted(inc.evidence)) == (8, sorted(f"doc-{k}" for k in range(8)))
    assert sorted(b["dedup_key"] for b in webhook.bodies) == sorted(keys)
