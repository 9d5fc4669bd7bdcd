"""The breach workflow (compliance/breach.py, sql/oltp/0026): an incident declared a personal-data
breach, its subjects and data categories computed from the incident's real Log documents (on the
session's FerretDB) and the catalog, the 72-hour clock with a fixed `now` before and after the
deadline, the Art. 33(3) draft field by field, the submission, the overdue alert reaching a real
webhook once, the refused operations, and the CLI with --json."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from stripe_platform.audit import access_log, incidents
from stripe_platform.audit.detect import Finding
from stripe_platform.compliance import breach
from stripe_platform.config import get_settings
from webhook import Webhook

T0 = dt.datetime(2026, 12, 7, 2, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def webhook():
    with Webhook() as hook:
        yield hook


@pytest.fixture
def s(settings, database, loaded, docdb, webhook, tmp_path, monkeypatch):
    webhook.bodies.clear()
    monkeypatch.setattr(access_log, "_directory", lambda _settings: str(tmp_path / "access"))
    return settings.model_copy(
        update={
            "pg_database": database,
            "mongodb_database": docdb.name,
            "alert_webhook_url": SecretStr(webhook.url),
        }
    )


def log_doc(doc_id, user, *lines, source="postgres", host="10.0.4.7"):
    return {
        "_id": doc_id,
        "source": source,
        "user": user,
        "dbname": "stripe" if source == "postgres" else "api",
        "remote_host": host,
        "session_id": doc_id,
        "session_start": T0,
        "lines": [{"timestamp": T0, "error_severity": "LOG", **line} for line in lines],
    }


def incident_with(s, docdb, docs, key="off_hours_pii_read:mallory"):
    docdb["Log"].insert_many(docs)
    (inc,) = incidents.raise_findings(
        s,
        [
            Finding(
                rule="off_hours_pii_read",
                severity="high",
                title="PII read off hours by mallory",
                user="mallory",
                source="10.0.4.7",
                at=T0,
                evidence=tuple(d["_id"] for d in docs),
                dedup_key=key,
            )
        ],
    )
    return inc


def planted(s, docdb):
    """mallory reads e-mails and names of the whole customer table (rows reported), the card
    numbers of the payment instruments (no rows reported), and one customer's PII through the API;
    a refused statement and a non-personal read read nothing."""
    return incident_with(
        s,
        docdb,
        [
            log_doc(
                "pg:s1:1",
                "mallory",
                {"message": "statement: SELECT email, fullname FROM customer"},
                {"message": "duration: 3.1 ms  rows: 2"},
            ),
            log_doc(
                "pg:s1:2", "mallory", {"message": "statement: SELECT pan FROM paymentinstrument"}
            ),
            log_doc(
                "pg:s1:3",
                "mallory",
                {
                    "error_severity": "ERROR",
                    "state_code": "42501",
                    "message": "statement: SELECT password FROM customer",
                },
            ),
            log_doc("pg:s1:4", "mallory", {"message": "statement: SELECT name FROM merchant"}),
            log_doc(
                "api:r1",
                "mallory",
                {"message": "read allow read_customer_pii /v1/customers/13/pii"},
                source="api",
            ),
        ],
    )


def test_declare_computes_subjects_and_categories_from_evidence(s, docdb, conn):
    inc = planted(s, docdb)
    b = breach.declare(s, inc.id, by="dpo", now=T0)
    assert (b.incident_id, b.state, b.declared_by) == (inc.id, "open", "dpo")
    assert b.deadline - b.declared_at == dt.timedelta(hours=72)
    a = b.affected
    by_table = {d["dataset"]: d for d in a["datasets"]}
    # merchant: nothing personal; address: the API route returns the customer's addresses too
    assert sorted(by_table) == ["address", "customer", "paymentinstrument"]
    assert by_table["address"]["fields"] == ["line1", "postalcode"]
    # SELECT email, fullname (2 rows) + the API read: e-mail, name, phone, username.
    assert set(by_table["customer"]["fields"]) >= {"email", "fullname", "phone"}
    assert "password" not in by_table["customer"]["fields"]  # the refused read read nothing
    assert by_table["customer"]["records"] == 3 and by_table["customer"]["records_exact"]
    assert by_table["paymentinstrument"]["fields"] == ["pan"]
    assert by_table["paymentinstrument"]["classes"] == ["pci"]
    (instruments,) = conn.execute(
        "SELECT count(DISTINCT customerid) FROM paymentinstrument"
    ).fetchone()
    assert by_table["paymentinstrument"]["subjects"] == instruments  # no rows logged: the bound
    assert not by_table["paymentinstrument"]["records_exact"]
    assert a["subject_ids"] == [13] and a["subjects_exact"] == 1
    assert a["subjects_approx"] == max(1, 3, instruments)
    assert set(a["categories"]) >= {
        "user.contact.email",
        "user.name",
        "user.financial.credit_card",
    }
    assert a["classes"] == ["pci", "pii", "pii_quasi"]
    assert a["users"] == ["mallory"] and a["evidence_read"] == 5 and a["evidence_missing"] == []


def test_clock_before_and_after_the_deadline_and_submission(s, docdb):
    inc = planted(s, docdb)
    b = breach.declare(s, inc.id, by="dpo", now=T0)
    (before,) = breach.clocks(s, now=T0 + dt.timedelta(hours=71, minutes=59))
    assert (before.state, before.overdue, before.hours_left) == ("open", False, 0.02)
    (after,) = breach.clocks(s, now=T0 + dt.timedelta(hours=72, minutes=1))
    assert after.overdue and after.hours_left < 0
    assert breach.check_overdue(s, now=T0 + dt.timedelta(hours=71)) == []

    done = breach.submit(s, b.id, by="dpo", reference="DPC-2026-17", now=T0 + dt.timedelta(hours=5))
    assert (done.state, done.reference, done.submitted_by) == ("submitted", "DPC-2026-17", "dpo")
    (clock,) = breach.clocks(s, now=T0 + dt.timedelta(days=10))
    assert (clock.state, clock.overdue, clock.hours_left) == ("submitted", False, 0.0)
    assert breach.check_overdue(s, now=T0 + dt.timedelta(days=10)) == []
    with pytest.raises(breach.BreachError, match="already submitted"):
        breach.submit(s, b.id, by="dpo", reference="again")


def test_overdue_raises_one_critical_incident_and_one_webhook_alert(s, docdb, webhook):
    inc = planted(s, docdb)
    b = breach.declare(s, inc.id, by="dpo", now=T0)
    late = T0 + dt.timedelta(hours=73)
    (raised,) = breach.check_overdue(s, now=late)
    assert (raised.rule, raised.severity, raised.change) == (
        "breach_notification_overdue",
        "critical",
        "new",
    )
    assert raised.evidence == (f"breach:{b.id}",)
    alerts = [x for x in webhook.bodies if x.get("rule") == "breach_notification_overdue"]
    assert len(alerts) == 1 and f"breach #{b.id}" in alerts[0]["text"]
    # The next daily run: the same incident, no second alert.
    again = breach.check_overdue(s, now=late + dt.timedelta(days=1))
    assert [(i.id, i.change) for i in again] == [(raised.id, "grouped")]
    assert len([x for x in webhook.bodies if x.get("rule") == "breach_notification_overdue"]) == 1
    assert breach.get_breach(s, b.id).overdue_alerted_at == late
    # A late submission is recorded late.
    breach.submit(s, b.id, by="dpo", reference="DPC-late", now=late + dt.timedelta(hours=2))
    (clock,) = breach.clocks(s, now=late + dt.timedelta(hours=3))
    assert clock.overdue and clock.state == "submitted"


def test_draft_has_article_33_contents(s, docdb):
    inc = planted(s, docdb)
    b = breach.declare(s, inc.id, by="dpo", now=T0)
    d = breach.draft_notification(s, b.id)
    # (a) nature, categories, approximate numbers of subjects and records
    assert d["nature"]["description"] == "PII read off hours by mallory"
    assert d["nature"]["who"] == ["mallory"] and d["nature"]["from"] == ["10.0.4.7"]
    assert d["nature"]["datasets"] == [
        "postgres address",
        "postgres customer",
        "postgres paymentinstrument",
    ]
    assert "user.contact.email" in d["categories_of_data"]
    assert d["subjects_approx"] == b.affected["subjects_approx"] and d["subjects_exact"] == 1
    assert d["records_approx"] == b.affected["records_approx"] > 0
    # (b) the DPO's contact, from compliance/declarations.yaml
    assert d["dpo_contact"]["email"] == "dpo@example.com"
    # (c) likely consequences: card data and identifiers were read
    assert any("card" in c for c in d["likely_consequences"])
    assert any("identity" in c for c in d["likely_consequences"])
    # (d) measures taken and proposed
    assert d["measures_taken"][0].startswith(f"incident #{inc.id} opened")
    assert d["measures_proposed"]
    assert d["deadline"] == (T0 + dt.timedelta(hours=72)).isoformat()
    assert d["state"] == "open" and d["reference"] is None


def test_refused_operations(s, docdb):
    with pytest.raises(breach.BreachError, match="no incident #999999"):
        breach.declare(s, 999999, by="dpo")
    inc = planted(s, docdb)
    b = breach.declare(s, inc.id, by="dpo", now=T0)
    with pytest.raises(breach.BreachError, match=f"already declared: breach #{b.id}"):
        breach.declare(s, inc.id, by="dpo")
    with pytest.raises(breach.BreachError, match="reference"):
        breach.submit(s, b.id, by="dpo", reference=" ")
    with pytest.raises(breach.BreachNotFound):
        breach.submit(s, b.id + 100, by="dpo", reference="x")
    with pytest.raises(breach.BreachError, match="must be named"):
        breach.declare(s, inc.id, by="")


def test_cli(s, docdb, monkeypatch, request):
    from stripe_platform.cli import app

    inc = planted(s, docdb)
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(s.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", s.pg_database)
    monkeypatch.setenv("STRIPE_PLATFORM_MONGODB_DATABASE", s.mongodb_database)
    get_settings.cache_clear()
    request.addfinalizer(get_settings.cache_clear)
    runner = CliRunner()
    declared = runner.invoke(app, ["privacy", "breach", "declare", str(inc.id), "--json"])
    assert declared.exit_code == 0, declared.output
    bid = json.loads(declared.stdout)["id"]
    listed = runner.invoke(app, ["privacy", "breach", "list", "--json"])
    assert [c["id"] for c in json.loads(listed.stdout)] == [bid]
    shown = runner.invoke(app, ["privacy", "breach", "show", str(bid), "--draft", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["draft"]["dpo_contact"]["email"] == "dpo@example.com"
    sent = runner.invoke(
        app, ["privacy", "breach", "submit", str(bid), "--reference", "R-1", "--json"]
    )
    assert sent.exit_code == 0 and json.loads(sent.stdout)["state"] == "submitted"
    again = runner.invoke(app, ["privacy", "breach", "declare", str(inc.id)])
    assert again.exit_code == 1 and "already declared" in again.output
    assert Path(access_log._directory(None)).exists()
