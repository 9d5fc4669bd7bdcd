"""The daily compliance controls (compliance/controls.py, sql/oltp/0026) on a real platform: a
seeded source (PostgreSQL + FerretDB) synced by the real engine into the lake and a DuckDB
warehouse, the marts built by dbt (the session's tests/built_warehouse.py build). Every control passes on it; each fails on a planted violation
(PII in clear in a lake file, an extra GRANT, an expired grant, a record past retention, a PAN in a
mart, an export to an undeclared destination) and the violation is named in its evidence; a
failure raises an incident that reaches a real webhook; results are recorded for the dashboard
(latest, history); the CLI and the DAG's job."""

from __future__ import annotations

import datetime as dt
import glob
import json
import os

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql
from pydantic import SecretStr
from typer.testing import CliRunner

from stripe_platform.audit import access_log, incidents
from stripe_platform.compliance import controls
from stripe_platform.config import get_settings
from stripe_platform.docstore import client as docstore
from stripe_platform.ingestion.catalog import load_catalog as load_airbyte
from stripe_platform.ingestion.engine import open_writer, run_sync
from stripe_platform.oltp import db
from stripe_platform.oltp.access import grant_temporary
from stripe_platform.orchestration.compliance import daily
from stripe_platform.security import access_postgres
from stripe_platform.security.policy import load_policy
from stripe_platform.transform.dbt import MARTS_SCHEMA
from webhook import Webhook

LAKE = ("postgres-to-s3", "mongodb-to-s3")


@pytest.fixture(scope="module")
def webhook():
    with Webhook() as hook:
        yield hook


@pytest.fixture(scope="module")
def platform(built_warehouse, tmp_path_factory, webhook):
    """The session's seeded source and its built DuckDB warehouse (tests/built_warehouse.py: the
    build is shared with the other warehouse tests), synced into a lake of this module's own, and
    the access policy applied: the clean platform every control must pass on. Each test restores
    what it plants."""
    s = built_warehouse.duckdb.model_copy(
        update={
            "lake_uri": str(tmp_path_factory.mktemp("lake")),
            "alert_webhook_url": SecretStr(webhook.url),
        }
    )
    catalog = load_airbyte()
    for c in LAKE:
        connection = catalog.resolve(c)
        run_sync(s, connection, open_writer(s, connection))
    policy = load_policy(s)
    access_postgres.apply(s, policy, access_postgres.plan(s, policy, dt.datetime.now(dt.UTC)))
    return s


@pytest.fixture
def s(platform, webhook, tmp_path, monkeypatch):
    webhook.bodies.clear()
    monkeypatch.setattr(access_log, "_directory", lambda _settings: str(tmp_path / "access"))
    with db.connect(platform, autocommit=True) as conn:
        conn.execute("TRUNCATE privacy.control_result")
    return platform


def run(s, name, now=None):
    (result,) = controls.run_controls(s, only=[name], now=now)
    assert result.name == name and result.run_at is not None
    return result


def test_all_controls_pass_on_the_clean_platform_and_are_recorded(s, webhook):
    # The DAG's job: the controls, then the breach clocks.
    now = dt.datetime.now(dt.UTC)
    summary = daily(s, now=now)
    assert summary["failed"] == [] and summary["overdue_breaches"] == []
    assert list(summary["controls"]) == list(controls.CONTROLS)
    # Recorded: the dashboard reads the latest of each, with its evidence.
    results = controls.latest(s)
    assert [(r.name, r.passed, r.run_at) for r in results] == [
        (name, True, now) for name in controls.CONTROLS
    ]
    by = {r.name: r for r in results}
    cov = by["encryption_coverage"]
    assert cov.value == 100.0 and cov.unit == "%"
    assert cov.evidence["stores"]["lake"]["state"] == "checked"  # the lake was really looked at
    assert cov.evidence["stores"]["marts"]["state"] == "checked"
    assert by["pci_scope"].evidence["pci_fields"] == ["postgres paymentinstrument.pan"]
    assert by["pci_scope"].evidence["scanned"]["marts"] > 0
    checked = {c["store"] for c in by["retention"].evidence["checked"]}
    assert checked == {
        "postgres transaction",
        "postgres audit.trail_record",
        "documents Log",
        "lake audit/",
        "home privacy/exports",
    }
    assert sorted(by["unauthorised_transfers"].evidence["syncs"]) == [
        "mongodb-to-s3 -> lake",
        "mongodb-to-snowflake -> warehouse_raw",
        "postgres-to-s3 -> lake",
        "postgres-to-snowflake -> warehouse_raw",
    ]
    # The marts a partner receives: flagged in dbt (compliance/consent.py), non-personal columns.
    assert by["unauthorised_transfers"].evidence["shared_with_third_parties"] == [
        "MKT_MarketingAudience"
    ]
    assert [x for x in webhook.bodies if x.get("rule", "").startswith("control:")] == []
    assert len(controls.history(s, 1, now=now)) == 6
    assert controls.history(s, 1, now=now - dt.timedelta(days=2)) == []
    assert [r.run_at for r in controls.history(s, 1, name="retention", now=now)] == [now]


def test_pii_in_clear_in_the_lake_and_card_data_exported_are_unauthorised_transfers(s, webhook):
    # A copy of customers with their e-mails in clear dropped in the exploration lake outside any
    # declared stream; a synced customer file rewritten with the e-mails in clear (a sync that
    # skipped the encryption); an API export that carried card data in clear. One run (each run
    # samples every store): each is named in the evidence.
    lake = s.lake_root
    stray = os.path.join(lake, "exports", "customers.parquet")
    os.makedirs(os.path.dirname(stray))
    pq.write_table(pa.table({"email": ["jane.roe@example.com"] * 3}), stray)
    (synced,) = glob.glob(os.path.join(lake, "raw", "postgres", "customer", "*", "*.parquet"))[:1]
    planted = os.path.join(os.path.dirname(synced), "manual-0.parquet")
    original = pq.read_table(synced)
    clear = original.set_column(
        original.schema.get_field_index("email"),
        "email",
        pa.array(["jane.roe@example.com"] * original.num_rows, pa.string()),
    )
    access_log.record(
        s,
        kind="read",
        user="tom",
        source="10.0.0.5",
        resource="/v1/exports/payments",
        action="export_payments",
        outcome="allow",
        via="session",
        detail={"rows": 10, "classes_in_clear": ["pci", "pii_quasi"]},
    )
    try:
        pq.write_table(clear, planted)
        result = run(s, "unauthorised_transfers")
    finally:
        os.remove(stray)
        os.remove(planted)
    assert not result.passed
    violations = result.evidence["violations"]
    files = [v.get("file", "") for v in violations]
    (stray_found,) = [f for f in files if f]  # the synced files are all under their streams
    assert stray_found.endswith(stray)
    clear_pii = [v for v in violations if v["to"] == "lake" and v.get("class") == "pii"]
    assert any("postgres.customer.email" in v["field"] for v in clear_pii)
    (api,) = [v for v in violations if v["to"] == "api_export"]
    assert (api["class"], api["user"]) == ("pci", "tom")  # pii_quasi may be exported
    assert result.evidence["api_exports"] == 1
    assert result.value == len(violations)
    alerts = [x for x in webhook.bodies if x.get("rule") == "control:unauthorised_transfers"]
    assert len(alerts) == 1 and alerts[0]["severity"] == "critical"


def test_an_extra_grant_is_access_policy_drift(s):
    with db.connect(s, autocommit=True) as conn:
        conn.execute("GRANT INSERT ON Merchant TO readonlyuser")
        try:
            result = run(s, "access_policy_drift")
        finally:
            conn.execute("REVOKE INSERT ON Merchant FROM readonlyuser")
    assert not result.passed and result.value == 1
    (v,) = result.evidence["violations"]
    assert (v["action"], v["principal"], v["object"]) == (
        "revoke",
        "readonlyuser",
        "table public.merchant",
    )
    assert run(s, "access_policy_drift").passed


def test_an_expired_grant_is_expired_access(s):
    with db.connect(s, autocommit=True) as conn:
        grant_temporary(
            conn, "controls_contractor", "readonlyuser", days=1,
            now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
        )  # fmt: skip
        try:
            result = run(s, "expired_access")
        finally:
            conn.execute(sql.SQL("DROP OWNED BY controls_contractor"))
            conn.execute(sql.SQL("DROP ROLE controls_contractor"))
    assert not result.passed
    assert [v["principal"] for v in result.evidence["violations"]] == ["controls_contractor"]
    assert run(s, "expired_access").passed


def test_records_past_retention_fail(s):
    now = dt.datetime.now(dt.UTC)
    export_dir = s.home_dir / "privacy" / "exports"
    export_dir.mkdir(parents=True, exist_ok=True)
    old = export_dir / "request-999.json"
    old.write_text("{}")
    stamp = (now - dt.timedelta(days=45)).timestamp()
    os.utime(old, (stamp, stamp))
    logs = docstore.connect(s)["Log"]
    logs.insert_one({"_id": "controls-old", "source": "postgres", "user": "x", "lines": [],
                     "session_start": now - dt.timedelta(days=400)})  # fmt: skip
    try:
        result = run(s, "retention", now=now)
    finally:
        old.unlink()
        logs.delete_one({"_id": "controls-old"})
        logs.database.client.close()
    assert not result.passed
    where = {v["store"] for v in result.evidence["violations"]}
    assert where == {"home privacy/exports", "documents Log"}
    assert result.value == round(100 * 3 / 5, 1)
    assert run(s, "retention", now=now).passed


def test_a_pan_in_a_mart_fails_pci_scope_and_an_email_in_a_shared_mart_is_a_transfer(s, webhook):
    # A card number (Luhn-valid, the brief's test Visa) written into a mart's text column, and an
    # e-mail into the mart a partner receives (MKT_MarketingAudience, shared with third parties).
    # One run of the two controls (they share one sampling of the stores).
    path = str(s.warehouse_file)
    pan, email = "4111111111111111", "jane.roe@example.com"
    with duckdb.connect(path) as conn:
        (user,) = conn.execute(
            f"SELECT UserName FROM {MARTS_SCHEMA}.dim_customer LIMIT 1"
        ).fetchone()
        (key, segment) = conn.execute(
            f"SELECT CustomerKey, CustomerSegment FROM {MARTS_SCHEMA}.mkt_marketingaudience LIMIT 1"
        ).fetchone()
        conn.execute(
            f"UPDATE {MARTS_SCHEMA}.dim_customer SET UserName = ? WHERE UserName = ?", [pan, user]
        )
        conn.execute(
            f"UPDATE {MARTS_SCHEMA}.mkt_marketingaudience SET CustomerSegment = ? "
            "WHERE CustomerKey = ?",
            [email, key],
        )
    try:
        pci, transfers = controls.run_controls(s, only=["pci_scope", "unauthorised_transfers"])
    finally:
        with duckdb.connect(path) as conn:
            conn.execute(
                f"UPDATE {MARTS_SCHEMA}.dim_customer SET UserName = ? WHERE UserName = ?",
                [user, pan],
            )
            conn.execute(
                f"UPDATE {MARTS_SCHEMA}.mkt_marketingaudience SET CustomerSegment = ? "
                "WHERE CustomerKey = ?",
                [segment, key],
            )
    assert not pci.passed
    (v,) = pci.evidence["violations"]
    assert v["where"] == "marts DIM_Customer.UserName" and "card_number" in v["why"]
    (incident,) = [
        i for i in incidents.list_incidents(s, status="open") if i.rule == "control:pci_scope"
    ]
    assert incident.severity == "critical"
    assert [x["incident_id"] for x in webhook.bodies if x.get("rule") == "control:pci_scope"] == [
        incident.id
    ]
    assert not transfers.passed
    shared = [v for v in transfers.evidence["violations"] if v["to"] == "third_parties"]
    assert [(v["field"], v["class"]) for v in shared] == [
        ("MKT_MarketingAudience.CustomerSegment", "pii")
    ]
    # The PAN in DIM_Customer: card data may go to no mart at all.
    assert any(v["to"] == "marts" and v["class"] == "pci" for v in transfers.evidence["violations"])


def test_cli_check_exit_code_and_history(s, monkeypatch, request):
    from stripe_platform.cli import app

    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(s.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", s.pg_database)
    monkeypatch.setenv("STRIPE_PLATFORM_MONGODB_DATABASE", s.mongodb_database)
    monkeypatch.setenv("STRIPE_PLATFORM_WAREHOUSE_PATH", str(s.warehouse_path))
    monkeypatch.setenv("STRIPE_PLATFORM_LAKE_URI", s.lake_root)
    get_settings.cache_clear()
    request.addfinalizer(get_settings.cache_clear)
    runner = CliRunner()
    ok = runner.invoke(app, ["compliance", "check", "--only", "expired_access", "--json"])
    assert ok.exit_code == 0, ok.output
    assert [r["name"] for r in json.loads(ok.stdout)] == ["expired_access"]
    with db.connect(s, autocommit=True) as conn:
        conn.execute("GRANT INSERT ON Merchant TO readonlyuser")
        try:
            bad = runner.invoke(app, ["compliance", "check", "--only", "access_policy_drift"])
        finally:
            conn.execute("REVOKE INSERT ON Merchant FROM readonlyuser")
    assert bad.exit_code == 1 and "FAIL" in bad.output
    hist = runner.invoke(app, ["compliance", "controls", "--days", "1", "--json"])
    assert [(r["name"], r["passed"]) for r in json.loads(hist.stdout)] == [
        ("expired_access", True),
        ("access_policy_drift", False),
    ]
    wrong = runner.invoke(app, ["compliance", "check", "--only", "nope"])
    assert wrong.exit_code == 1 and "unknown control" in wrong.output
