"""The compliance dashboard in a real headless Chromium (Debian's /usr/bin/chromium driven by
Playwright) against the platform's API served by uvicorn over TLS, with a real SAML login at the
test IdP (tests/saml_idp.py): the browser without a session is sent to the IdP and back, the page
shows each KPI with the value /v1/compliance/kpis computes and the value this test planted or
counted itself, a drill-down shows the evidence, a role without the scope is refused, a source
that fails leaves its KPI unavailable and the others shown. Screenshots land in
test-artifacts/dashboard/ (gitignored).

Chromium trusts the platform's server certificate by its public key's pin
(--ignore-certificate-errors-spki-list): no certificate error is ignored beyond that key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from psycopg import sql
from typer.testing import CliRunner

from conftest import TEMPLATE_DB
from saml_idp import TestIdP
from stripe_platform.api.app import create_app
from stripe_platform.api.server import bind
from stripe_platform.audit import incidents
from stripe_platform.audit.detect import Finding
from stripe_platform.compliance import breach, consent, controls, kpis, requests
from stripe_platform.config import Settings, get_settings
from stripe_platform.oltp import db, partitions
from stripe_platform.runtime.tls import ensure_certificates
from stripe_platform.showcase import brief_examples
from test_sso import serve_in_thread

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)

# What the test plants: each control's runs (days ago, passed, value, unit), the latest last.
RUNS = {
    "encryption_coverage": [(4, True, 91.0, "%"), (2, False, 88.25, "%"), (0, True, 97.5, "%")],
    "access_policy_drift": [(1, True, 0, "changes"), (0, True, 0, "changes")],
    "expired_access": [(0, True, 0, "grants")],
    "retention": [(3, True, 0, "items"), (0, False, 3, "items")],
    "pci_scope": [(0, True, 0, "fields")],
    "unauthorised_transfers": [(0, False, 2, "transfers")],
}
RETENTION_EVIDENCE = {
    "stores": ["api_sessions", "lake_superseded", "privacy_exports"],
    "past_period": [{"store": "lake_superseded", "items": 3, "period_days": 30}],
}
# Incidents: (severity, resolved?)
INCIDENTS = [("high", False), ("high", False), ("low", False), ("critical", True)]
BREACH_AGE = dt.timedelta(hours=80)


@dataclass
class Site:
    settings: Settings
    url: str
    idp: TestIdP
    ca: ssl.SSLContext
    browser: Browser


def spki_pin(cert_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def plant(s: Settings) -> None:
    """The daily controls' runs, incidents (one resolved), two customers' consents and one
    customer's opt-out, through the owning modules' own functions."""
    results = []
    for name, runs in RUNS.items():
        for days_ago, passed, value, unit in runs:
            evidence = RETENTION_EVIDENCE if name == "retention" and days_ago == 0 else {}
            at = NOW - days_ago * DAY - dt.timedelta(minutes=5)
            results.append(controls.ControlResult(name, passed, value, unit, evidence, at))
    controls.record(s, results)
    raised_ids = []
    for n, (severity, resolved) in enumerate(INCIDENTS):
        (raised,) = incidents.raise_findings(
            s,
            [
                Finding(
                    rule="test_rule", severity=severity, title=f"planted {n}", user="mallory",
                    source="10.0.0.9", at=NOW - dt.timedelta(hours=n + 1), evidence=(f"log-{n}",),
                    dedup_key=f"test:{n}",
                )
            ],
        )  # fmt: skip
        raised_ids.append(raised.id)
        if resolved:
            incidents.resolve(s, raised.id, by="test", note="planted resolved")
    # The first incident declared a breach 80 hours ago: past its 72-hour deadline.
    breach.declare(s, raised_ids[0], by="test", now=NOW - BREACH_AGE)
    with db.connect(s, with_key=False, autocommit=True) as conn:
        customers = [r[0] for r in conn.execute("SELECT ID FROM Customer ORDER BY ID")]
    assert len(customers) >= 2, customers
    consent.record(s, customers[0], "marketing", True, source="cli", by="test")
    consent.record(s, customers[1], "marketing", True, source="cli", by="test")
    consent.record(s, customers[0], "analytics", True, source="cli", by="test")
    consent.opt_out(s, customers[1], source="gpc", by="test")
    # Two open requests: an access request received now (GDPR: a month), a rectification received
    # 40 days ago under the GDPR (past its deadline); an erasure refused (no verified identity).
    for kind, customer, received, changes in (
        ("access", customers[0], NOW, None),
        ("rectify", customers[1], NOW - 40 * DAY, {"fullname": "Ann Example"}),
    ):
        requests.submit(
            s, kind, customer, law="gdpr", requested_by="test", source="cli",
            identity="test: verified", changes=changes, now=received,
        )  # fmt: skip


@pytest.fixture(scope="module")
def site(settings, tmp_path_factory) -> Iterator[Site]:
    """A database with the brief's records and the planted figures, the test IdP, the API over
    TLS and one Chromium, for the module."""
    name = f"test_dashboard_{os.getpid()}"
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    tls = ensure_certificates(settings.home_dir / "tls")
    ca = ssl.create_default_context(cafile=str(tls.ca_cert))
    idp = TestIdP(tmp_path_factory.mktemp("idp"), tls.server_cert, tls.server_key)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    s = settings.model_copy(
        update={"pg_database": name, "api_port": port, "saml_idp_metadata": str(idp.metadata_file)}
    )
    server = thread = pw = None
    try:
        with db.connect(s, autocommit=True) as conn:
            partitions.maintain(conn, today=dt.date.today(), months_ahead=1, retention_months=36)
            brief_examples.load_oltp(conn)
        plant(s)
        server, thread = serve_in_thread(create_app(s), sock, tls)
        pw = sync_playwright().start()
        url = f"https://127.0.0.1:{port}"
        metadata = httpx.get(f"{url}/saml/metadata", verify=ca, timeout=20)
        assert metadata.status_code == 200, metadata.text
        idp.trust(metadata.text)
        idp.start()
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--ignore-certificate-errors-spki-list={spki_pin(tls.server_cert)}",
            ],
        )  # fmt: skip
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        yield Site(s, url, idp, ca, browser)
        browser.close()
    finally:
        if pw is not None:
            pw.stop()
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(15)
        sock.close()
        idp.stop()
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def log_in(
    site: Site, user: str, groups: str, path: str = "/compliance"
) -> tuple[BrowserContext, Page]:
    """A new browser profile opens ``path``: without a session it lands on the IdP's login form,
    logs in there as ``user`` of ``groups``, and comes back through the SAML POST."""
    context = site.browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{site.url}{path}")
    assert page.url.startswith(f"{site.idp.url}/sso?SAMLRequest="), page.url
    page.fill("input[name=user]", user)
    page.fill("input[name=groups]", groups)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site.url}{path}")
    return context, page


@pytest.fixture(scope="module")
def admin(site) -> Iterator[Page]:
    context, page = log_in(site, "ada.admin", "platform-admins")
    yield page
    context.close()


def shown(page: Page, key: str) -> tuple[str, str]:
    """A KPI card's visible value and status."""
    card = page.locator(f"article[data-kpi={key}]")
    return card.locator(".value").inner_text(), card.get_attribute("data-status") or ""


def fetch(context: BrowserContext, path: str) -> tuple[int, dict]:
    """GET ``path`` in the browser (its session cookie, its TLS): status and JSON body."""
    page = context.new_page()
    try:
        response = page.goto(path)
        assert response is not None
        return response.status, response.json()
    finally:
        page.close()


def number(text: str) -> float:
    found = re.search(r"-?\d+(?:\.\d+)?", text)
    assert found, text
    return float(found.group())


def test_without_a_session_the_page_sends_the_browser_to_sso_and_json_is_refused(site):
    plain = httpx.get(f"{site.url}/compliance", verify=site.ca, timeout=20)
    assert plain.status_code == 303
    assert plain.headers["location"] == "/saml/login?next=/compliance"
    for path in ("/v1/compliance/kpis", "/v1/compliance/evidence/retention"):
        refused = httpx.get(f"{site.url}{path}", verify=site.ca, timeout=20)
        assert refused.status_code == 401, refused.text
        assert refused.json()["detail"]["reason"] == "no_credentials"


def test_the_page_shows_each_kpi_with_the_api_value(site, admin):
    page = admin
    assert page.title().startswith("Compliance")
    assert "ada.admin" in page.locator("body > header").inner_text()
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    status, api = fetch(page.context, f"{site.url}/v1/compliance/kpis")
    assert status == 200, api
    computed = {k["key"]: k for k in api["kpis"]}
    assert len(computed) == page.locator("article[data-kpi]").count() == 13

    # Every KPI as the API computes it, none unavailable.
    for key, k in computed.items():
        text, status = shown(page, key)
        assert status == k["status"] != "unavailable", (key, k["detail"])
        if k["value"] is None:
            assert text == "—"
        else:
            assert number(text) == round(k["value"], 1), (key, text, k["value"])

    # ... and as this test planted or counted them itself.
    for name, runs in RUNS.items():
        _, passed, value, unit = runs[-1]
        text, status = shown(page, name)
        assert number(text) == value and unit in text, (name, text)
        assert status == ("ok" if passed else "bad"), name
        trend = page.locator(f"article[data-kpi={name}] svg.trend circle")
        assert trend.count() == len(runs), name  # one point a day that has a run
    failed = page.locator("article[data-kpi=encryption_coverage] svg.trend circle[fill='#c62828']")
    assert failed.count() == 1  # the day it failed (88.25 %)
    unresolved = [sev for sev, resolved in INCIDENTS if not resolved]
    text, status = shown(page, "incidents")
    assert number(text) == len(unresolved) and status == "bad"  # high ones unresolved
    bars = page.locator("article[data-kpi=incidents] g.bar")
    counted = {
        b.get_attribute("data-name"): float(b.get_attribute("data-count")) for b in bars.all()
    }
    assert counted == {s: float(unresolved.count(s)) for s in ("low", "medium", "high", "critical")}
    with db.connect(site.settings, with_key=False, autocommit=True) as conn:
        customers = conn.execute("SELECT count(*) FROM Customer").fetchone()[0]
    for key, granted in (("consent_marketing", 2), ("consent_analytics", 1), ("opt_out", 1)):
        text, status = shown(page, key)
        assert number(text) == round(100 * granted / customers, 1) and status == "info", key
    text, _ = shown(page, "consent_ml_training")
    assert number(text) == 0.0
    text, status = shown(page, "privacy_requests")
    assert number(text) == 2 and status == "bad"  # one past its deadline
    text, status = shown(page, "breaches")
    assert number(text) == 1 and status == "bad"
    rows = page.locator("#deadlines g.deadline")
    assert [
        (r.get_attribute("data-kind"), r.locator("rect").get_attribute("fill")) for r in rows.all()
    ] == [
        ("request", "#c62828"),  # the rectification, due 10 days ago
        ("breach", "#c62828"),  # due 8 hours ago
        ("request", "#1a7f37"),  # the access request, due in a month
    ]


def test_a_drill_down_shows_the_evidence(site, admin):
    page = admin
    page.goto(f"{site.url}/compliance")
    page.click("article[data-kpi=retention] a.drill")
    page.wait_for_url(f"{site.url}/compliance/evidence/retention")
    evidence = page.locator("#evidence").inner_text()
    for store in RETENTION_EVIDENCE["stores"]:
        assert store in evidence
    assert "period_days" in evidence and "lake_superseded" in evidence
    page.screenshot(path=str(ARTIFACTS / "evidence-retention.png"), full_page=True)
    status, found = fetch(page.context, f"{site.url}/v1/compliance/evidence/retention")
    runs = found["runs"]
    assert [(r["passed"], r["value"]) for r in runs] == [
        (p, v) for _, p, v, _ in reversed(RUNS["retention"])
    ]
    status, missing = fetch(page.context, f"{site.url}/v1/compliance/evidence/nothing_here")
    assert status == 404 and "retention" in missing["detail"]
    page.goto(f"{site.url}/compliance/evidence/incidents")
    listed = page.locator("#evidence table tbody tr")
    assert listed.count() == sum(1 for _, resolved in INCIDENTS if not resolved)


def test_a_role_without_the_scope_is_refused(site):
    context, page = log_in(site, "dana.dev", "engineers")
    try:
        assert "lacks the scope compliance.read" in page.locator("#message").inner_text()
        assert page.locator("article[data-kpi]").count() == 0
        page.screenshot(path=str(ARTIFACTS / "refused-developer.png"))
        status, api = fetch(context, f"{site.url}/v1/compliance/kpis")
        assert status == 403 and api["detail"]["reason"] == "missing_scope"
    finally:
        context.close()


def test_a_failing_source_leaves_its_kpis_unavailable_and_the_others_shown(site, admin):
    with db.connect(site.settings, with_key=False, autocommit=True) as conn:
        conn.execute("ALTER TABLE privacy.control_result RENAME TO control_result_away")
        try:
            admin.goto(f"{site.url}/compliance")
            for name in RUNS:
                text, status = shown(admin, name)
                assert status == "unavailable" and text == "—", name
            detail = admin.locator("article[data-kpi=retention] .detail").first.inner_text()
            assert "the daily controls cannot be read" in detail and "migration 0026" in detail
            text, status = shown(admin, "incidents")
            assert status == "bad" and number(text) == 2 + 1
            status, body = fetch(admin.context, f"{site.url}/v1/compliance/evidence/retention")
            assert status == 503 and "migration 0026" in body["detail"]
            admin.screenshot(path=str(ARTIFACTS / "source-down.png"), full_page=True)
        finally:
            conn.execute("ALTER TABLE privacy.control_result_away RENAME TO control_result")


def test_the_first_paint_needs_only_the_page(site, admin):
    """The page loads nothing but itself (no script, style or font fetched), under a CSP that
    allows nothing else; its first contentful paint is measured (the bench holds the 1 s goal)."""
    requests: list[str] = []

    def seen(r) -> None:
        requests.append(r.url)

    admin.on("request", seen)
    admin.goto(f"{site.url}/compliance")
    paint = admin.evaluate(
        """new Promise(done => {
             new PerformanceObserver(list => {
               const fcp = list.getEntriesByName('first-contentful-paint')[0];
               if (fcp) done(fcp.startTime);
             }).observe({type: 'paint', buffered: true});
             setTimeout(() => done(null), 5000);
           })"""
    )
    admin.remove_listener("request", seen)
    assert requests == [f"{site.url}/compliance"], requests
    assert paint is not None and paint < 5000, paint  # loopback; generous for a loaded CI box
    (ARTIFACTS / "first-paint.json").write_text(json.dumps({"first_contentful_paint_ms": paint}))


def test_kpis_trends_with_a_fixed_now(site):
    """The incidents' trend counts what was open at each day's end: the test's own count."""
    now = dt.datetime.now(dt.UTC)  # after the planting
    found = kpis.kpis(site.settings, now=now)
    trend = found.get("incidents").trend
    assert len(trend) == site.settings.dashboard_trend_days
    assert trend[-1].value == 3  # the critical one was resolved before now
    assert all(p.value == 0 for p in trend[:-2])  # planted within the last hours
    coverage = found.get("encryption_coverage").trend
    assert [(p.day, p.value, p.passed) for p in coverage] == [
        ((NOW - d * DAY - dt.timedelta(minutes=5)).date(), v, ok)
        for d, ok, v, _ in RUNS["encryption_coverage"]
    ]


def test_cli_prints_the_kpis_and_where_the_dashboard_is(site, monkeypatch, request):
    s = site.settings
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(s.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", s.pg_database)
    monkeypatch.setenv("STRIPE_PLATFORM_API_PORT", str(s.api_port))
    get_settings.cache_clear()
    request.addfinalizer(get_settings.cache_clear)
    from stripe_platform.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["compliance", "kpis", "--json"])
    assert out.exit_code == 0, out.output
    listed = {k["key"]: k["value"] for k in json.loads(out.output)["kpis"]}
    assert listed["retention"] == 3 and listed["encryption_coverage"] == 97.5
    table = runner.invoke(app, ["compliance", "kpis"])
    assert table.exit_code == 0 and "Retention" in table.output
    where = runner.invoke(app, ["compliance", "dashboard"])
    assert where.output.strip() == f"https://127.0.0.1:{s.api_port}/compliance"
