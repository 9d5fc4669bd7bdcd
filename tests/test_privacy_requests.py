"""Data-subject requests (compliance/requests.py, compliance/stores.py): the sources' steps
(PostgreSQL and the documents) on a real seeded platform, the state machine and its legal clocks,
and the bad inputs (unknown subject, duplicate, legal hold, a store failing mid-erasure then
re-run to completion).

Real components: the session's PostgreSQL and FerretDB with a seeded platform of the module's
(tests/privacy_fixtures.py). The downstream steps (warehouse, lake, logs, keys) and the proof that
nothing is readable anywhere after an erasure are tests/test_privacy_erasure.py's: these tests run
the registry's source steps only, each test on customers of its own.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pyotp
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from api_server import served_over_tls
from privacy_fixtures import NOW, seeded_platform
from stripe_platform.api.app import create_app
from stripe_platform.audit import access_log
from stripe_platform.cli import app as cli_app
from stripe_platform.compliance import consent, requests, stores
from stripe_platform.config import Settings, get_settings
from stripe_platform.docstore.fields import DocumentFields
from stripe_platform.governance.classification import DataClass, load_catalog
from stripe_platform.oltp import db
from stripe_platform.security import mfa, sessions


@pytest.fixture(scope="module")
def seeded(settings):
    with seeded_platform(settings, f"privacy_requests_{os.getpid()}") as platform:
        yield platform


@pytest.fixture(autouse=True)
def sources_only(monkeypatch):
    """The registry with the sources' steps only (the downstream ones need a synced lake and
    warehouse: test_privacy_erasure.py)."""
    monkeypatch.setattr(stores, "_PROVIDERS", ())
    monkeypatch.setattr(
        stores, "_registry", {"postgres": stores.POSTGRES, "documents": stores.DOCUMENTS}
    )


def submit(s, kind, customer, **kwargs):
    kwargs.setdefault("requested_by", "dpo")
    kwargs.setdefault("source", "cli")
    kwargs.setdefault("identity", "test: verified")
    kwargs.setdefault("now", NOW)
    return requests.submit(s, kind, customer, **kwargs)


def pg_customer(s, customer_id):
    with db.connect(s, autocommit=True) as conn:
        return conn.execute(
            "SELECT UserName, pii_decrypt(Email), pii_decrypt(FullName), pii_decrypt(Phone), "
            "encode(EmailHash, 'hex') FROM Customer WHERE ID = %s",
            (customer_id,),
        ).fetchone()


def count(s, query, *args):
    with db.connect(s, autocommit=True) as conn:
        return conn.execute(query, args).fetchone()[0]


def transaction_docs(platform, email):
    """Transaction documents whose e-mail decrypts to ``email`` (every document read)."""
    fields = DocumentFields(platform.settings)
    return [
        d
        for d in (
            fields.decrypt_document("Transaction", x) for x in platform.docs.Transaction.find()
        )
        if d.get("customer_email") == email
    ]


# -- access ------------------------------------------------------------------------------------------
def test_access_exports_everything_held_with_where_it_came_from(seeded):
    s = seeded.settings
    customer = seeded.active_customers()[0]
    expected = seeded.customer(customer)
    request = submit(s, "access", customer)
    assert (request.state, request.kind, request.law) == ("received", "access", "gdpr")
    assert request.due_at - request.received_at == dt.timedelta(days=30)  # GDPR: one month

    done = requests.run(s, request.id, now=NOW)
    assert done.state == "done", done.error
    assert [(st.store, st.state) for st in done.steps] == [
        ("postgres", "done"),
        ("documents", "done"),
    ]
    path = done.export_path
    assert path is not None and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    export = json.loads(Path(path).read_text())
    assert export == requests.read_export(s, request.id)
    items = export["items"]
    assert all(i["where"] and i["store"] and i["dataset"] for i in items)

    [row] = [i for i in items if i["dataset"] == "customer"]
    assert row["where"] == f"postgres public.customer id={customer}"
    fields = row["fields"]
    assert (fields["email"], fields["fullname"], fields["phone"], fields["username"]) == (
        expected["email"],
        expected["fullname"],
        expected["phone"],
        expected["username"],
    )
    assert expected["password"] not in json.dumps(export)  # credentials: "held", never exported
    assert fields["password"] == stores.NOT_EXPORTED[DataClass.CREDENTIAL]
    cards = [i["fields"] for i in items if i["dataset"] == "paymentinstrument"]
    assert cards and all(c["pan"] in (None, stores.NOT_EXPORTED[DataClass.PCI]) for c in cards)
    payments = [i for i in items if i["dataset"] == "transaction"]
    assert len(payments) == seeded.transactions_of(customer) > 0
    assert {i["dataset"] for i in items} >= {"address", "paymentinstrument", "device"}

    [doc] = [i for i in items if i["dataset"] == "Customer"]
    assert (doc["fields"]["email"], doc["fields"]["oltp_id"]) == (expected["email"], customer)
    copies = [i for i in items if i["dataset"] == "Transaction"]
    assert len(copies) == len(transaction_docs(seeded, expected["email"]))
    assert all(c["fields"]["customer_email"] == expected["email"] for c in copies)
    assert export["stores"] == {
        "postgres": sum(1 for i in items if i["store"] == "postgres"),
        "documents": sum(1 for i in items if i["store"] == "documents"),
    }
    # Re-running a done request changes nothing.
    assert requests.run(s, request.id, now=NOW) == done


def test_ccpa_clock_and_summary_deadlines(seeded):
    s = seeded.settings
    customer = seeded.active_customers()[1]
    request = submit(s, "access", customer, law="ccpa")
    assert request.due_at == NOW + dt.timedelta(days=45)
    later = NOW + dt.timedelta(days=46)
    summary = requests.summary(s, now=later)
    mine = [o for o in summary["open"] if o["id"] == request.id]
    assert mine == [
        {
            "id": request.id,
            "kind": "access",
            "law": "ccpa",
            "customer_id": customer,
            "due_at": request.due_at.isoformat(),
            "days_left": -1.0,
        }
    ]
    assert summary["overdue"] >= 1
    opened = len(requests.list_requests(s, state="received"))
    assert summary["by_state"]["received"] == opened
    assert requests.run(s, request.id, now=NOW).state == "done"
    assert requests.summary(s, now=later)["by_state"]["received"] == opened - 1


# -- bad input ----------------------------------------------------------------------------------------
def test_unknown_subject_and_unverified_identity_are_refused_duplicates_raise(seeded):
    s = seeded.settings
    unknown = submit(s, "erase", 987654321)
    assert unknown.state == "refused"
    assert unknown.error == "unknown subject: no customer 987654321 in PostgreSQL"
    assert unknown.finished_at is not None
    assert requests.run(s, unknown.id, now=NOW).state == "refused"  # nothing to run

    customer = seeded.active_customers()[2]
    anonymous = submit(s, "access", customer, identity="  ")
    assert (anonymous.state, anonymous.error) == (
        "refused",
        "the requester's identity was not verified",
    )
    first = submit(s, "access", customer)  # a refused request is closed: no duplicate
    with pytest.raises(requests.DuplicateRequest, match=f"open access request: {first.id}") as e:
        submit(s, "access", customer)
    assert e.value.existing == first.id
    submit(s, "rectify", customer, changes={"phone": "+1 555 0100"})  # another kind: fine
    with pytest.raises(requests.RequestError, match="not a field a rectification corrects"):
        submit(s, "rectify", seeded.active_customers()[3], changes={"password": "x"})
    with pytest.raises(requests.RequestError, match="names no row: address:ROW_ID.line1"):
        submit(s, "rectify", seeded.active_customers()[3], changes={"address.line1": "x"})
    with pytest.raises(requests.RequestError, match="needs the corrections"):
        submit(s, "rectify", seeded.active_customers()[3])
    with pytest.raises(requests.RequestError, match="law 'lgpd'"):
        submit(s, "access", seeded.active_customers()[3], law="lgpd")
    with pytest.raises(requests.UnknownRequest, match="no privacy request 99999999"):
        requests.get_request(s, 99999999)


# -- rectify ------------------------------------------------------------------------------------------
def test_rectify_corrects_the_source_and_the_documents_copies(seeded):
    s = seeded.settings
    customer = seeded.active_customers()[4]
    before = seeded.customer(customer)
    copies = len(transaction_docs(seeded, before["email"]))
    with db.connect(s, autocommit=True) as conn:
        (address,) = conn.execute(
            "SELECT ID FROM Address WHERE CustomerID = %s ORDER BY ID LIMIT 1", (customer,)
        ).fetchone()
    changes = {
        "email": "corrected.address@example.net",
        "fullname": "Corrected Name",
        "phone": "+44 20 7946 0000",
        f"address:{address}.line1": "1 Corrected Street",
    }
    request = submit(s, "rectify", customer, changes=changes)
    with db.connect(s, with_key=False, autocommit=True) as conn:  # never in clear in the request
        row = conn.execute(
            "SELECT r::text FROM privacy.request r WHERE id = %s", (request.id,)
        ).fetchone()[0]
    assert "Corrected" not in row and "corrected" not in row
    done = requests.run(s, request.id, now=NOW)
    assert done.state == "done", done.error
    assert done.steps[0].counts == {
        "customer.email.rectified": 1,
        "customer.fullname.rectified": 1,
        "customer.phone.rectified": 1,
        "address.line1.rectified": 1,
    }
    _, email, fullname, phone, _ = pg_customer(s, customer)
    assert (email, fullname, phone) == (
        "corrected.address@example.net",
        "Corrected Name",
        "+44 20 7946 0000",
    )
    assert (
        count(
            s,
            "SELECT count(*) FROM Address WHERE ID = %s AND pii_decrypt(Line1) = %s",
            address,
            "1 Corrected Street",
        )
        == 1
    )
    # The documents' copies of the e-mail follow, encrypted and re-hashed.
    fields = DocumentFields(s)
    [doc] = fields.find_by_email(seeded.docs, "Customer", "corrected.address@example.net")
    assert doc["oltp_id"] == customer
    assert transaction_docs(seeded, before["email"]) == []
    assert len(transaction_docs(seeded, "corrected.address@example.net")) == copies
    assert done.steps[1].counts["Customer.email.rectified"] == 1

    # The same corrections again: nothing left to change.
    again = requests.submit(
        s,
        "rectify",
        customer,
        changes=changes,
        requested_by="dpo",
        source="cli",
        identity="test",
        now=NOW,
    )
    redone = requests.run(s, again.id, now=NOW)
    assert all(v == 0 for st in redone.steps for v in st.counts.values()), redone.steps


# -- erase --------------------------------------------------------------------------------------------
def test_erase_deletes_anonymises_keeps_payments_without_identity_and_is_idempotent(seeded):
    s = seeded.settings
    customer, other = seeded.active_customers()[5:7]
    subject = seeded.customer(customer)
    payments = seeded.transactions_of(customer)
    copies = len(transaction_docs(seeded, subject["email"]))
    total = count(s, "SELECT sum(Amount) FROM Transaction WHERE CustomerID = %s", customer)
    other_before = pg_customer(s, other)

    request = submit(s, "erase", customer)
    done = requests.run(s, request.id, now=NOW)
    assert done.state == "done", done.error
    assert done.plan["steps"] == ["postgres", "documents"]
    assert done.plan["stores"]["postgres"]["transaction"]["action"] == "keep_without_identity"
    assert done.plan["stores"]["documents"]["not_bound"]["Log"].startswith("no subject field")
    pg = done.steps[0].counts
    assert pg["customer.anonymised"] == 1 and pg["transaction.stripped"] == payments
    assert pg["address.deleted"] >= 1 and pg["paymentinstrument.deleted"] >= 1
    assert pg["transaction.unlinked"] == payments  # each payment named a card or an address
    again = submit(s, "erase", customer)
    assert (again.state, again.error) == (
        "refused",
        f"customer {customer} is erased at the source by request {request.id} (done): "
        f"`privacy request show {request.id}`",
    )

    # PostgreSQL: the customer a tombstone, what was theirs deleted, payments kept anonymous.
    username, email, fullname, phone, _ = pg_customer(s, customer)
    assert (username, email, fullname, phone) == (
        f"erased-{customer}",
        f"erased-{customer}@erased.invalid",
        None,
        None,
    )
    for table in ("Address", "Device", "PaymentInstrument"):
        assert count(s, f"SELECT count(*) FROM {table} WHERE CustomerID = %s", customer) == 0
    assert count(s, "SELECT count(*) FROM Transaction WHERE CustomerID = %s", customer) == payments
    assert count(s, "SELECT sum(Amount) FROM Transaction WHERE CustomerID = %s", customer) == total
    assert (
        count(
            s,
            "SELECT count(*) FROM Transaction WHERE CustomerID = %s AND (IPAddress IS NOT NULL OR "
            "DeviceID IS NOT NULL OR PaymentInstrumentID IS NOT NULL OR BillingAddressID IS NOT NULL)",
            customer,
        )
        == 0
    )
    assert (
        count(s, "SELECT request_id FROM privacy.erased_subject WHERE customer_id = %s", customer)
        == request.id
    )
    with db.connect(s, autocommit=True) as conn:
        text = " ".join(
            str(r)
            for r in conn.execute(
                "SELECT c::text FROM Customer c WHERE ID = %s UNION ALL "
                "SELECT r::text FROM privacy.request r WHERE customer_id = %s",
                (customer, customer),
            )
        )
    for value in (subject["email"], subject["fullname"], subject["phone"], subject["username"]):
        assert value not in text

    # Documents: the subject's gone, the payment copies kept without identity.
    docs = seeded.docs
    assert docs.Customer.count_documents({"oltp_id": customer}) == 0
    gone = done.steps[1].counts
    assert gone["Transaction.stripped"] == copies
    assert transaction_docs(seeded, subject["email"]) == []
    assert gone["Customer.deleted"] == 1
    kept = docs.Transaction.count_documents({"customer_email": {"$exists": False}})
    assert kept >= copies

    # The other customer is untouched.
    assert pg_customer(s, other) == other_before

    # The steps again: nothing left to do.
    ctx = stores.SubjectContext(
        s,
        customer,
        request.id,
        stores.Identifiers(emails=(subject["email"],)),
        load_catalog(),
        NOW,
    )
    for store in (stores.POSTGRES, stores.DOCUMENTS):
        outcome = store.erase(ctx)
        assert outcome.changed == 0, outcome


# -- legal hold ---------------------------------------------------------------------------------------
def test_an_erasure_under_legal_hold_ends_on_hold_and_runs_once_released(seeded):
    s = seeded.settings
    customer = seeded.active_customers()[7]
    held = requests.hold(s, customer, reason="litigation 2026-114", by="legal")
    with pytest.raises(requests.RequestError, match="already under legal hold"):
        requests.hold(s, customer, reason="again", by="legal")
    request = submit(s, "erase", customer)
    on_hold = requests.run(s, request.id, now=NOW)
    assert on_hold.state == "on_hold"
    assert "litigation 2026-114" in on_hold.error and "nothing erased" in on_hold.error
    assert on_hold.steps == []
    assert pg_customer(s, customer)[1] == seeded.customer(customer)["email"]
    with pytest.raises(requests.DuplicateRequest):  # still open
        submit(s, "erase", customer)

    assert requests.release(s, customer, by="legal").reason == held.reason
    with pytest.raises(requests.RequestError, match="under no legal hold"):
        requests.release(s, customer, by="legal")
    done = requests.run(s, request.id, now=NOW)
    assert done.state == "done", done.error
    assert pg_customer(s, customer)[1] == f"erased-{customer}@erased.invalid"


# -- a store failing mid-erasure ----------------------------------------------------------------------
class Flaky:
    """A downstream step that fails until told otherwise."""

    name = "warehouse_raw"

    def __init__(self):
        self.broken = True
        self.erased = 0

    def plan(self, catalog):
        return {"flaky": True}

    def access(self, ctx):
        return []

    def rectify(self, ctx, changes):
        return stores.StepOutcome(self.name)

    def identifiers(self, ctx):
        return stores.Identifiers()

    def erase(self, ctx):
        if self.broken:
            raise stores.StoreError("warehouse_raw: the warehouse is unreachable (test)")
        self.erased += 1
        assert ctx.identifiers.emails, "the identifiers reach the downstream steps"
        return stores.StepOutcome(self.name, {"rows.erased": 3}, "ok")


def test_a_store_failing_mid_erasure_leaves_failed_then_run_finishes_it(seeded):
    s = seeded.settings
    flaky = stores.register(Flaky())
    customer = seeded.active_customers()[8]
    email = seeded.customer(customer)["email"]
    request = submit(s, "erase", customer)
    failed = requests.run(s, request.id, now=NOW)
    assert failed.state == "failed"
    assert failed.error.startswith("step warehouse_raw failed: warehouse_raw: the warehouse")
    assert [(st.store, st.state) for st in failed.steps] == [
        ("postgres", "done"),
        ("documents", "done"),
        ("warehouse_raw", "failed"),
    ]
    assert "unreachable" in failed.steps[2].detail
    # What the done steps did is done and recorded; the identifiers are kept only encrypted.
    assert pg_customer(s, customer)[1] == f"erased-{customer}@erased.invalid"
    with db.connect(s, with_key=False, autocommit=True) as conn:
        sealed = conn.execute(
            "SELECT identifiers, r::text FROM privacy.request r WHERE id = %s", (request.id,)
        ).fetchone()
    assert sealed[0] is not None and email not in sealed[1]
    assert requests.summary(s, now=NOW)["by_state"]["failed"] >= 1

    flaky.broken = False
    done = requests.run(s, request.id, now=NOW + dt.timedelta(hours=1))
    assert done.state == "done", done.error
    assert flaky.erased == 1
    assert done.steps[0] == failed.steps[0]  # not re-run: same outcome, same finish time
    assert done.steps[2].counts == {"rows.erased": 3}
    assert done.plan == failed.plan  # the same plan


def test_a_concurrent_run_is_refused(seeded):
    s = seeded.settings
    customer = seeded.active_customers()[9]
    request = submit(s, "access", customer)
    with db.connect(s, with_key=False, autocommit=True) as other:
        other.execute(
            "SELECT pg_advisory_lock(hashtext('privacy.request'), %s::int)", (request.id,)
        )
        with pytest.raises(requests.RequestError, match="being run by another process"):
            requests.run(s, request.id, now=NOW)
    assert requests.run(s, request.id, now=NOW).state == "done"


def test_data_roles_cannot_read_the_privacy_schema(seeded, settings):
    s = seeded.settings
    with db.connect(s, with_key=False, autocommit=True) as conn:
        conn.execute("SET ROLE ReadOnlyUser")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM privacy.request")


# -- the API: SSO session, scope privacy.requests, fresh MFA; over a real uvicorn with TLS ------------
POLICY = """\
version: 1
roles:
  dpo:
    description: the data-protection officer
    clear: [pii_quasi, pii]
    api: [privacy.requests, customers.read]
  support:
    description: reads customers masked
    api: [customers.read]
groups:
  privacy-office: [dpo]
  support-team: [support]
users:
  dpo-bot:
    roles: [dpo]
    stores: [api]
mfa:
  step_up_seconds: 600
  required_for: [pii, pci, credential, bulk_exports]
  max_failures: 5
  lockout_seconds: 900
"""


@dataclass
class Api:
    settings: Settings
    client: httpx.Client

    def session(self, user: str, group: str) -> str:
        role = {"privacy-office": "dpo", "support-team": "support"}[group]
        return sessions.create_session(
            self.settings, user=user, roles=[role], via="saml", source_ip=None, groups=[group]
        )

    def call(self, method: str, path: str, session: str | None = None, **kwargs):
        cookies = {} if session is None else {"Cookie": f"{sessions.SESSION_COOKIE}={session}"}
        return self.client.request(method, path, headers=cookies, **kwargs)


@pytest.fixture(scope="module")
def api(seeded, tmp_path_factory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("privacy-api")
    (tmp / "policy.yaml").write_text(POLICY)
    s = seeded.settings.model_copy(
        update={
            "access_policy": tmp / "policy.yaml",
            "mlflow_tracking_uri": SecretStr(f"sqlite:///{tmp}/mlflow.db"),  # no champion
        }
    )
    with served_over_tls(create_app(s), s, name="privacy-api", timeout=60) as client:
        yield Api(s, client)


def enrolled_now(s: Settings, user: str) -> str:
    """``user`` enrolled and confirmed with the code of 90 s ago (the API then takes the current
    code: a later step). The secret."""
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=90)
    enrolment = mfa.enroll(s, user, now=earlier)
    mfa.confirm(s, user, pyotp.TOTP(enrolment.secret).at(earlier), now=earlier)
    return enrolment.secret


def reason(response: httpx.Response) -> str:
    return response.json()["detail"]["reason"]


def test_the_api_needs_an_sso_session_the_scope_and_a_fresh_second_factor(seeded, api):
    s = api.settings
    started = dt.datetime.now(dt.UTC)
    customer = seeded.active_customers()[10]
    expected = seeded.customer(customer)
    body = {"kind": "access", "customer_id": customer, "identity": "account login + ID check"}

    assert api.call("POST", "/v1/privacy/requests", json=body).status_code == 401
    support = api.session("sam", "support-team")
    refused = api.call("POST", "/v1/privacy/requests", support, json=body)
    assert refused.status_code == 403 and reason(refused) == "missing_scope"
    token = sessions.issue_token(
        s,
        user="dpo-bot",
        roles=["dpo"],
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
        created_by="tests",
    )[1]
    by_token = api.client.post(
        "/v1/privacy/requests", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert by_token.status_code == 403 and reason(by_token) == "interactive_session_required"
    dpo = api.session("dora", "privacy-office")
    no_mfa = api.call("POST", "/v1/privacy/requests", dpo, json=body)
    assert no_mfa.status_code == 401 and reason(no_mfa) == "mfa_required"
    assert requests.list_requests(s, customer_id=customer) == []  # nothing recorded

    secret = enrolled_now(s, "dora")
    verified = api.call("POST", "/v1/auth/mfa/verify", dpo, json={"code": pyotp.TOTP(secret).now()})
    assert verified.status_code == 200, verified.text
    created = api.call("POST", "/v1/privacy/requests", dpo, json=body)
    assert created.status_code == 201, created.text
    answer = created.json()
    assert (answer["state"], answer["requested_by"], answer["source"]) == ("done", "dora", "api")
    assert answer["has_export"] and answer["identity"].startswith("account login + ID check")
    assert [st["store"] for st in answer["steps"]] == ["postgres", "documents"]
    rid = answer["id"]
    shown = api.call("GET", f"/v1/privacy/requests/{rid}", dpo)
    assert shown.status_code == 200 and shown.json()["state"] == "done"
    export = api.call("GET", f"/v1/privacy/requests/{rid}/export", dpo)
    assert export.status_code == 200, export.text
    [row] = [i for i in export.json()["items"] if i["dataset"] == "customer"]
    assert (row["fields"]["email"], row["fields"]["fullname"]) == (
        expected["email"],
        expected["fullname"],
    )
    assert api.call("GET", "/v1/privacy/requests/99999999", dpo).status_code == 404

    # Bad input: an unknown subject is recorded refused; a duplicate is 409 naming the open one;
    # a field no rectification corrects is 422; a request not done has no export (409).
    unknown = api.call("POST", "/v1/privacy/requests", dpo, json={**body, "customer_id": 99999})
    assert unknown.status_code == 201 and unknown.json()["state"] == "refused"
    requests.hold(s, customer, reason="court order 7", by="legal")
    erase = {**body, "kind": "erase"}
    held = api.call("POST", "/v1/privacy/requests", dpo, json=erase)
    assert held.status_code == 201 and held.json()["state"] == "on_hold"
    duplicate = api.call("POST", "/v1/privacy/requests", dpo, json=erase)
    assert duplicate.status_code == 409 and str(held.json()["id"]) in duplicate.json()["detail"]
    no_export = api.call("GET", f"/v1/privacy/requests/{held.json()['id']}/export", dpo)
    assert no_export.status_code == 409
    bad = {**body, "kind": "rectify", "changes": {"password": "x"}}
    rejected = api.call("POST", "/v1/privacy/requests", dpo, json=bad)
    assert rejected.status_code == 422 and "password" in rejected.json()["detail"]
    requests.release(s, customer, by="legal")
    ran = api.call("POST", f"/v1/privacy/requests/{held.json()['id']}/run", dpo)
    assert ran.status_code == 200 and ran.json()["state"] == "done", ran.text

    # The access log has each call with the request and subject, never a value.
    events = [
        (e.action, e.detail["request_id"])
        for e in access_log.events(s, since=started, user="dora", origins=["api"])
        if e.action.startswith("privacy.")
    ]
    assert ("privacy.request", rid) in events and ("privacy.export", rid) in events
    logged = "".join(f.read_text() for f in access_log.log_dir(s).glob("*.jsonl"))
    for value in (expected["email"], expected["fullname"], expected["phone"]):
        assert value not in logged


# -- the CLI -----------------------------------------------------------------------------------------
def test_the_cli_exports_with_a_second_factor_and_reports_states(seeded, api, monkeypatch):
    s = api.settings
    for key in [k for k in os.environ if k.startswith("STRIPE_PLATFORM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("STRIPE_PLATFORM_PROFILE", "embedded")
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(s.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", s.pg_database)
    monkeypatch.setenv("STRIPE_PLATFORM_MONGODB_DATABASE", s.mongodb_database)
    get_settings.cache_clear()
    try:
        run = lambda *args: CliRunner().invoke(cli_app, ["privacy", *args])  # noqa: E731
        customer = seeded.active_customers()[11]
        secret = enrolled_now(s, "olga")
        ident = ("--customer", str(customer), "--identity", "ticket 51", "--by", "olga")
        wrong = run("request", "access", *ident, "--otp", "000000", "--json")
        assert wrong.exit_code == 1 and "code" in wrong.stderr.lower(), wrong.output
        assert requests.list_requests(s, customer_id=customer) == []
        ok = run("request", "access", *ident, "--otp", pyotp.TOTP(secret).now(), "--json")
        assert ok.exit_code == 0, ok.output
        shown = json.loads(ok.stdout)
        assert shown["state"] == "done" and Path(shown["export_path"]).exists()

        assert run("hold", "--customer", str(customer), "--reason", "audit 9").exit_code == 0
        held = run("request", "erase", *ident, "--json")
        assert held.exit_code == 1 and "on_hold" in held.stderr
        rid = json.loads(held.stdout)["id"]
        listed = run("requests", "--state", "on_hold", "--json")
        assert rid in [r["id"] for r in json.loads(listed.stdout)]
        assert run("release", "--customer", str(customer)).exit_code == 0
        done = run("request", "run", str(rid))
        assert done.exit_code == 0 and "done" in done.stdout, done.output
        unknown = run("request", "erase", "--customer", "99999", "--identity", "x y z")
        assert unknown.exit_code == 1 and "unknown subject" in unknown.stderr
        bad = run("request", "rectify", *ident, "--set", "phone")
        assert bad.exit_code == 1 and "expected FIELD=VALUE" in bad.stderr
        other = seeded.active_customers()[12]
        assert not consent.subject(s, other).opted_out
        opted = run("request", "opt-out", "--customer", str(other), "--identity", "web form")
        assert opted.exit_code == 0, opted.output
        assert consent.subject(s, other).opted_out  # in the consent registry, law CCPA
        [request] = requests.list_requests(s, customer_id=other)
        assert (request.kind, request.law, request.state) == ("opt_out", "ccpa", "done")
    finally:
        get_settings.cache_clear()
