"""MFA (TOTP, RFC 6238): enrolment and confirmation, verification with replay refusal, lockout
after the policy's wrong codes, reset; the secret stored encrypted; the API's step-up in front of
the sensitive reads, served by a real uvicorn over TLS.

Real components: the session's PostgreSQL (a migrated database), the Envelope's AES-GCM keys in
that database, real TOTP codes computed with pyotp from the enrolled secret at chosen times (the
code under test is given the same ``now``), the `stripe-platform api` process."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pyotp
import pytest
from psycopg import sql
from pydantic import SecretStr

from conftest import TEMPLATE_DB
from stripe_platform.audit import access_log
from stripe_platform.config import Settings
from stripe_platform.oltp import db
from stripe_platform.runtime.tls import tls_files
from stripe_platform.security import mfa, sessions
from stripe_platform.security.envelope import Envelope
from stripe_platform.security.keys import KeyError_, LocalKeyring, TamperedCiphertext
from stripe_platform.security.policy import load_policy

T0 = dt.datetime(2026, 3, 2, 9, 0, 0, tzinfo=dt.UTC)  # a step boundary (a multiple of 30 s)


@pytest.fixture
def s(settings, database):
    return settings.model_copy(update={"pg_database": database})


@pytest.fixture
def events(monkeypatch) -> list[dict]:
    """Every access-log event the code under test records (the log's own tests: H5's module)."""
    recorded: list[dict] = []
    monkeypatch.setattr(
        access_log, "record", lambda settings, **event: recorded.append(event), raising=True
    )
    return recorded


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def code_at(secret: str, when: dt.datetime) -> str:
    return pyotp.TOTP(secret).at(when)


def wrong_code(secret: str, when: dt.datetime) -> str:
    """A 6-digit code that none of the steps around ``when`` produce."""
    valid = {pyotp.TOTP(secret).at(when, counter_offset=i) for i in (-1, 0, 1)}
    candidate = int(code_at(secret, when))
    while f"{candidate:06d}" in valid:
        candidate = (candidate + 1) % 1_000_000
    return f"{candidate:06d}"


def enrolled(s, user: str, at: dt.datetime = T0) -> str:
    """Enrol and confirm ``user`` at ``at``; the secret."""
    enrolment = mfa.enroll(s, user, now=at)
    mfa.confirm(s, user, code_at(enrolment.secret, at), now=at)
    return enrolment.secret


def test_enrolment_gives_a_secret_and_its_uri_and_confirmation_needs_a_right_code(s, events):
    enrolment = mfa.enroll(s, "alice", now=T0)
    assert len(enrolment.secret) == 32 and set(enrolment.secret) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    )
    assert enrolment.secret not in repr(enrolment)
    uri = urllib.parse.urlparse(enrolment.uri)
    assert (uri.scheme, uri.netloc, urllib.parse.unquote(uri.path)) == (
        "otpauth",
        "totp",
        "/stripe-platform:alice",
    )
    query = urllib.parse.parse_qs(uri.query)
    assert query["secret"] == [enrolment.secret]
    assert query["issuer"] == ["stripe-platform"]
    [status] = mfa.status(s, "alice", now=T0)
    assert status.state == "pending" and status.confirmed_at is None

    # Not usable before its confirmation.
    with pytest.raises(mfa.MfaError) as refused:
        mfa.verify(s, "alice", code_at(enrolment.secret, T0), now=T0)
    assert refused.value.reason == "mfa_not_confirmed"
    with pytest.raises(mfa.MfaError) as wrong:
        mfa.confirm(s, "alice", wrong_code(enrolment.secret, T0), now=T0)
    assert wrong.value.reason == "mfa_wrong_code"
    # A second enrolment before confirmation replaces the pending secret: the first no longer works.
    again = mfa.enroll(s, "alice", now=T0)
    assert again.secret != enrolment.secret
    with pytest.raises(mfa.MfaError, match="wrong MFA code"):
        mfa.confirm(s, "alice", code_at(enrolment.secret, T0), now=T0)
    mfa.confirm(s, "alice", code_at(again.secret, T0), now=T0)
    [status] = mfa.status(s, "alice", now=T0)
    assert (status.state, status.confirmed_at, status.failures) == ("confirmed", T0, 0)

    # A confirmed factor is not replaced by enrolling again: an administrator resets it first.
    with pytest.raises(mfa.MfaError, match="access mfa reset alice") as twice:
        mfa.enroll(s, "alice", now=T0)
    assert twice.value.reason == "mfa_already_enrolled"
    mfa.verify(s, "alice", code_at(again.secret, T0 + dt.timedelta(seconds=30)), now=T0)

    # Every attempt is in the access log; no code and no secret in any event.
    outcomes = [(e["action"], e["outcome"], e.get("reason")) for e in events]
    assert outcomes == [
        ("mfa_enroll", "allow", None),
        ("mfa_verify", "deny", "mfa_not_confirmed"),
        ("mfa_confirm", "deny", "mfa_wrong_code"),
        ("mfa_enroll", "allow", None),
        ("mfa_confirm", "deny", "mfa_wrong_code"),
        ("mfa_confirm", "allow", None),
        ("mfa_enroll", "deny", "mfa_already_enrolled"),
        ("mfa_verify", "allow", None),
    ]
    assert all(e["kind"] == "authn" and e["user"] == "alice" for e in events)
    logged = repr(events)
    for secret in (enrolment.secret, again.secret):
        assert secret not in logged
        assert code_at(secret, T0) not in logged


def test_verify_accepts_a_step_of_drift_and_refuses_replays(s, events):
    secret = enrolled(s, "bob")  # the confirmation used T0's step
    with pytest.raises(mfa.MfaError) as replay:
        mfa.verify(s, "bob", code_at(secret, T0), now=T0 + dt.timedelta(seconds=5))
    assert replay.value.reason == "mfa_replayed_code"

    t1 = T0 + dt.timedelta(minutes=5)
    mfa.verify(s, "bob", code_at(secret, t1), now=t1)
    # The same code again, within its window: pyotp alone would accept it; the factor does not.
    assert pyotp.TOTP(secret).verify(code_at(secret, t1), for_time=t1 + dt.timedelta(seconds=10))
    with pytest.raises(mfa.MfaError, match="already used") as again:
        mfa.verify(s, "bob", code_at(secret, t1), now=t1 + dt.timedelta(seconds=10))
    assert again.value.reason == "mfa_replayed_code"
    # Nor an earlier step still inside the drift window.
    previous = pyotp.TOTP(secret).at(t1, counter_offset=-1)
    with pytest.raises(mfa.MfaError, match="already used"):
        mfa.verify(s, "bob", previous, now=t1 + dt.timedelta(seconds=10))
    # One step of drift either way is accepted, two are not.
    t2 = T0 + dt.timedelta(minutes=10)
    mfa.verify(s, "bob", pyotp.TOTP(secret).at(t2, counter_offset=1), now=t2)
    t3 = T0 + dt.timedelta(minutes=15)
    with pytest.raises(mfa.MfaError, match="wrong MFA code"):
        mfa.verify(s, "bob", pyotp.TOTP(secret).at(t3, counter_offset=-2), now=t3)
    mfa.verify(s, "bob", pyotp.TOTP(secret).at(t3, counter_offset=-1), now=t3)
    # Spaces as apps show the code are fine; anything but 6 digits is a wrong code.
    t4 = T0 + dt.timedelta(minutes=20)
    code = code_at(secret, t4)
    with pytest.raises(mfa.MfaError, match="wrong MFA code"):
        mfa.verify(s, "bob", code + "0", now=t4)
    mfa.verify(s, "bob", f"{code[:3]} {code[3:]}", now=t4)
    [status] = mfa.status(s, "bob", now=t4)
    assert status.failures == 0 and status.last_verified_at == t4  # a success clears the count


def test_wrong_codes_lock_the_factor_for_the_policy_lockout(s, events, caplog):
    rules = load_policy(s).mfa
    assert (rules.max_failures, rules.lockout_seconds) == (5, 900)  # the issue's "five times"
    secret = enrolled(s, "carol")
    t1 = T0 + dt.timedelta(minutes=1)
    remaining = []
    for _ in range(rules.max_failures - 1):
        with pytest.raises(mfa.MfaError) as wrong:
            mfa.verify(s, "carol", wrong_code(secret, t1), now=t1)
        assert type(wrong.value) is mfa.MfaError and wrong.value.reason == "mfa_wrong_code"
        remaining.append(wrong.value.remaining)
    assert remaining == [4, 3, 2, 1]
    with pytest.raises(mfa.MfaLocked) as locked:
        mfa.verify(s, "carol", wrong_code(secret, t1), now=t1)
    until = t1 + dt.timedelta(seconds=900)
    assert locked.value.until == until
    assert "locked until 2026-03-02 09:16:00 UTC" in str(locked.value)
    assert "carol locked until" in caplog.text  # the platform's log too, not only the access log
    [status] = mfa.status(s, "carol", now=t1)
    assert status.locked_until == until

    # While locked, even the right code is refused, and the refusal does not extend the lock.
    t2 = until - dt.timedelta(seconds=1)
    with pytest.raises(mfa.MfaLocked):
        mfa.verify(s, "carol", code_at(secret, t2), now=t2)
    # After the lockout, the right code is accepted and the count starts again.
    t3 = until + dt.timedelta(seconds=1)
    mfa.verify(s, "carol", code_at(secret, t3), now=t3)
    [status] = mfa.status(s, "carol", now=t3)
    assert (status.failures, status.locked_until) == (0, None)
    denials = [e for e in events if e["outcome"] == "deny"]
    assert [e["reason"] for e in denials] == ["mfa_wrong_code"] * 4 + ["mfa_locked"] * 2
    assert denials[4]["detail"]["locked_until"] == until.isoformat()


def test_a_pending_enrolment_keeps_a_lock_and_a_reset_lifts_it(s, events):
    first = mfa.enroll(s, "dave", now=T0)
    for _ in range(5):
        with pytest.raises(mfa.MfaError):
            mfa.confirm(s, "dave", wrong_code(first.secret, T0), now=T0)
    fresh = mfa.enroll(s, "dave", now=T0)  # no way round the lock
    with pytest.raises(mfa.MfaLocked):
        mfa.confirm(s, "dave", code_at(fresh.secret, T0), now=T0)

    mfa.reset(s, "dave", by="root-admin", now=T0)
    [status] = mfa.status(s, "dave", now=T0)
    assert (status.state, status.locked_until, status.reset_by) == ("reset", None, "root-admin")
    with pytest.raises(mfa.MfaNotEnrolled):
        mfa.verify(s, "dave", code_at(fresh.secret, T0), now=T0)
    with pytest.raises(mfa.MfaNotEnrolled, match="no MFA factor to reset"):
        mfa.reset(s, "dave", by="root-admin", now=T0)
    with pytest.raises(mfa.MfaNotEnrolled):
        mfa.reset(s, "nobody", by="root-admin", now=T0)
    assert enrolled(s, "dave") != fresh.secret
    resets = [e for e in events if e["action"] == "mfa_reset"]
    assert [(e["kind"], e["user"], e["outcome"], e["detail"]) for e in resets] == [
        ("admin", "root-admin", "allow", {"subject": "dave"}),
        ("admin", "root-admin", "deny", {"subject": "dave"}),
        ("admin", "root-admin", "deny", {"subject": "nobody"}),
    ]


def test_the_secret_is_stored_encrypted_bound_to_its_user(s, settings, database, tmp_path):
    secret_a = enrolled(s, "erin")
    secret_b = enrolled(s, "frank")
    with db.connect(s, with_key=False, autocommit=True) as conn:
        stored = {
            user: bytes(blob)
            for user, blob in conn.execute(
                "SELECT user_name, secret FROM access.mfa_factor"
            ).fetchall()
        }
        # Nothing of the secret in the table's own bytes (its file, written out by a checkpoint).
        conn.execute("CHECKPOINT")
        (path,) = conn.execute(
            "SELECT current_setting('data_directory') || '/' "
            "|| pg_relation_filepath('access.mfa_factor')"
        ).fetchone()
    heap = Path(path).read_bytes()
    assert b"erin" in heap and b"frank" in heap  # the right file, with the rows in it
    for secret, blob in ((secret_a, stored["erin"]), (secret_b, stored["frank"])):
        for form in (secret.encode(), secret.lower().encode(), pyotp.TOTP(secret).byte_secret()):
            assert form not in heap
            assert form not in blob
        assert Envelope.key_ref(blob) == (mfa.KEY_SCOPE, 1)

    # Another installation's keys (another key-encryption key) cannot open it.
    foreign = Envelope(s, provider=LocalKeyring(tmp_path / "keyring.json"))
    with pytest.raises(KeyError_):
        foreign.decrypt(stored["erin"], aad=b"erin")

    t1 = T0 + dt.timedelta(minutes=1)
    with db.connect(s, with_key=False, autocommit=True) as conn:
        # Moved onto another user's row: it does not decrypt there (the user is associated data).
        conn.execute(
            "UPDATE access.mfa_factor SET secret = %s WHERE user_name = 'frank'", (stored["erin"],)
        )
        with pytest.raises(TamperedCiphertext):
            mfa.verify(s, "frank", code_at(secret_a, t1), now=t1)
        # One bit altered: refused, whatever code comes with it.
        altered = bytearray(stored["erin"])
        altered[-1] ^= 0x01
        conn.execute(
            "UPDATE access.mfa_factor SET secret = %s WHERE user_name = 'erin'", (bytes(altered),)
        )
        with pytest.raises(TamperedCiphertext):
            mfa.verify(s, "erin", code_at(secret_a, t1), now=t1)
        # A refused decryption changes nothing (no count, no step).
        (failures,) = conn.execute(
            "SELECT failures FROM access.mfa_factor WHERE user_name = 'erin'"
        ).fetchone()
        assert failures == 0


def test_data_roles_cannot_read_the_factors(s):
    enrolled(s, "gina")
    with db.connect(s, with_key=False, autocommit=True) as conn:
        for role in ("admin", "developer", "readonlyuser"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(f"SET LOCAL ROLE {role}")
                conn.execute("SELECT user_name FROM access.mfa_factor")


# -- the API: step-up in front of the sensitive reads, over a real uvicorn with TLS ----------------
# The access policy of these tests: an administrator cleared for everything, an analyst who reads
# customers masked only, and a machine user (bearer tokens cannot step up).
POLICY = """\
version: 1
roles:
  admin:
    description: everything in clear, with a second factor
    clear: [pii_quasi, pii, pci, credential]
    api: [customers.read, payments.read, exports.run]
  analyst:
    description: customers, masked
    clear: []
    api: [customers.read]
groups:
  platform-admins: [admin]
  analysts: [analyst]
users:
  ops-bot:
    roles: [admin]
    stores: [api]
mfa:
  step_up_seconds: 600
  required_for: [pii, pci, credential, bulk_exports]
  max_failures: 5
  lockout_seconds: 900
"""
CUSTOMER = {
    "id": 9001,
    "user_name": "zoe.k",
    "email": "zoe.kowalski@example.org",
    "full_name": "Zoë Kowalski",
    "phone": "+33 6 12 34 56 78",
    "line1": "17 rue des Lilas",
    "postal_code": "75020",
    "pan": "4111111111111111",
}
PAYMENTS = [  # (id, when, amount): two in the exported period, one after it
    (70001, dt.datetime(2026, 2, 1, 10, 0, tzinfo=dt.UTC), "12.50"),
    (70002, dt.datetime(2026, 2, 2, 11, 30, tzinfo=dt.UTC), "980.00"),
    (70003, dt.datetime(2026, 3, 5, 8, 0, tzinfo=dt.UTC), "5.00"),
]
SERVER_TIMEOUT = 60.0  # an upper bound on the server's start, never a wait by itself


@dataclass
class Api:
    settings: Settings  # the test's: the server's database and policy
    url: str
    ca: Path
    instrument_id: int

    def client(self, *, session: str | None = None, token: str | None = None) -> httpx.Client:
        headers = {}
        if session is not None:
            headers["Cookie"] = f"sp_session={session}"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(
            base_url=self.url,
            verify=ssl.create_default_context(cafile=str(self.ca)),
            headers=headers,
            timeout=30,
        )

    def session(self, user: str, group: str) -> str:
        role = {"platform-admins": "admin", "analysts": "analyst"}[group]
        return sessions.create_session(
            self.settings, user=user, roles=[role], via="saml", source_ip=None, groups=[group]
        )


def insert_customer(s: Settings) -> int:
    """The customer of CUSTOMER with an address, a card and PAYMENTS (encrypted as the platform
    writes them: pii_encrypt on a keyed session). The card's id."""
    c = CUSTOMER
    with db.connect(s, autocommit=True) as conn, conn.transaction():
        (location,) = conn.execute(
            "INSERT INTO Location (City, Country, CountryCode) VALUES ('Paris', 'France', 'FR') "
            "RETURNING ID"
        ).fetchone()
        conn.execute(
            """INSERT INTO Customer (ID, UserName, Password, Email, FullName, Phone, CountryCode,
                   PreferredDevice, PreferredPaymentMethodID, PreferredCurrencyID)
               VALUES (%s, %s, crypt('pw', gen_salt('bf')), pii_encrypt(%s), pii_encrypt(%s),
                       pii_encrypt(%s), 'FR', 'Mobile', 1, 1)""",
            (c["id"], c["user_name"], c["email"], c["full_name"], c["phone"]),
        )
        conn.execute(
            """INSERT INTO Address (CustomerID, Line1, PostalCode, LocationID)
               VALUES (%s, pii_encrypt(%s, 'postgres/address'), %s, %s)""",
            (c["id"], c["line1"], c["postal_code"], location),
        )
        (instrument,) = conn.execute(
            """INSERT INTO PaymentInstrument (CustomerID, PaymentMethodID, Brand, Last4, PAN,
                   ExpiryMonth, ExpiryYear)
               VALUES (%s, 1, 'Visa', %s, pii_encrypt(%s, 'postgres/paymentinstrument'), 7, 2029)
               RETURNING ID""",
            (c["id"], c["pan"][-4:], c["pan"]),
        ).fetchone()
        (merchant,) = conn.execute(
            "INSERT INTO Merchant (Name, IndustryID, MerchantSizeID) VALUES ('Lilas Café', 3, 1) "
            "RETURNING ID"
        ).fetchone()
        for payment_id, when, amount in PAYMENTS:
            conn.execute(
                """INSERT INTO Transaction (ID, TransactionStatusID, MerchantID, Amount,
                       CurrencyID, PaymentMethodID, PaymentInstrumentID, CustomerID, IPAddress,
                       DateTime)
                   VALUES (%s, 1, %s, %s, 1, 1, %s, %s, '203.0.113.9', %s)""",
                (payment_id, merchant, amount, instrument, c["id"], when),
            )
    return instrument


def server_env(s: Settings, port: int) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STRIPE_PLATFORM_") and k != "MONGODB_URI"
    }
    return {
        **base,
        "STRIPE_PLATFORM_PROFILE": "embedded",
        "STRIPE_PLATFORM_HOME": str(s.home_dir),
        "STRIPE_PLATFORM_PG_DATABASE": s.pg_database,
        "STRIPE_PLATFORM_MLFLOW_TRACKING_URI": s.mlflow_tracking_uri.get_secret_value(),
        "STRIPE_PLATFORM_ACCESS_POLICY": str(s.access_policy),
        "STRIPE_PLATFORM_API_PORT": str(port),
    }


@pytest.fixture(scope="module")
def api(settings, tmp_path_factory) -> Iterator[Api]:
    """`stripe-platform api` on a database of the module's, with CUSTOMER in it: one server for
    the module's tests."""
    tmp = tmp_path_factory.mktemp("mfa-api")
    (tmp / "policy.yaml").write_text(POLICY)
    name = f"test_mfa_api_{os.getpid()}"
    s = settings.model_copy(
        update={
            "pg_database": name,
            "access_policy": tmp / "policy.yaml",
            "mlflow_tracking_uri": SecretStr(f"sqlite:///{tmp}/mlflow.db"),  # no champion
        }
    )
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    server = None
    try:
        instrument = insert_customer(s)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log = tmp / "api.log"
        with log.open("w") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "stripe_platform.cli", "api", "--port", str(port)],
                env=server_env(s, port),
                cwd=tmp,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        ready = Api(
            s, f"https://127.0.0.1:{port}", tls_files(s.home_dir / "tls").ca_cert, instrument
        )
        deadline = time.monotonic() + SERVER_TIMEOUT
        with ready.client() as client:
            while True:
                assert server.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        yield ready
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def reason(response: httpx.Response) -> str:
    return response.json()["detail"]["reason"]


def enrolled_now(s: Settings, user: str) -> str:
    """``user`` enrolled and confirmed with the code of 90 s ago (the API's verify then takes the
    current code: a later step). The secret."""
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=90)
    return enrolled(s, user, at=earlier)


def test_pii_needs_a_fresh_second_factor_and_shows_it_for_the_window_only(api):
    s = api.settings
    started = now()
    session = api.session("ada", "platform-admins")
    pii_path = f"/v1/customers/{CUSTOMER['id']}/pii"
    with api.client(session=session) as client:
        refused = client.get(pii_path)
        assert refused.status_code == 401, refused.text
        assert reason(refused) == "mfa_required"
        assert "insufficient_user_authentication" in refused.headers["WWW-Authenticate"]
        assert client.get(f"/v1/payment-instruments/{api.instrument_id}").status_code == 401

        secret = enrolled_now(s, "ada")
        wrong = client.post("/v1/auth/mfa/verify", json={"code": wrong_code(secret, now())})
        assert wrong.status_code == 401
        detail = wrong.json()["detail"]
        assert (detail["reason"], detail["remaining"]) == ("mfa_wrong_code", 4)
        assert "4 attempt(s) left" in detail["message"] and "until" not in detail
        assert "insufficient_user_authentication" in wrong.headers["WWW-Authenticate"]
        assert client.get(pii_path).status_code == 401  # a wrong code steps nothing up

        before = now()
        used = pyotp.TOTP(secret).now()
        verified = client.post("/v1/auth/mfa/verify", json={"code": used})
        assert verified.status_code == 200, verified.text
        body = verified.json()
        at = dt.datetime.fromisoformat(body["mfa_verified_at"])
        assert before - dt.timedelta(seconds=1) <= at <= now()
        assert dt.datetime.fromisoformat(body["step_up_until"]) == at + dt.timedelta(seconds=600)

        shown = client.get(pii_path)
        assert shown.status_code == 200, shown.text
        pii = shown.json()
        expected = {k: CUSTOMER[k] for k in ("id", "user_name", "email", "full_name", "phone")}
        assert {k: pii[k] for k in expected} == expected
        [address] = pii["addresses"]
        assert (address["line1"], address["postal_code"], address["city"]) == (
            CUSTOMER["line1"],
            CUSTOMER["postal_code"],
            "Paris",
        )
        card = client.get(f"/v1/payment-instruments/{api.instrument_id}")
        assert card.status_code == 200, card.text
        assert (card.json()["pan"], card.json()["last4"], card.json()["expiry_year"]) == (
            CUSTOMER["pan"],
            "1111",
            2029,
        )
        missing = client.get("/v1/customers/424242/pii")
        assert missing.status_code == 404

        # The step-up ages out: verified longer ago than the policy's window -> 401 again.
        sessions.mark_step_up(s, sessions.digest(session), now() - dt.timedelta(seconds=601))
        deadline = time.monotonic() + 10 * sessions.CACHE_SECONDS  # the server's cache
        while (aged := client.get(pii_path)).status_code == 200:
            assert time.monotonic() < deadline, "the server still serves an aged step-up"
            time.sleep(0.2)
        assert aged.status_code == 401 and reason(aged) == "mfa_required"
        # ... and the code used cannot step it up again: it stays inside the drift window for at
        # least 30 s after its step, long enough for this test, and is refused as a replay.
        replay = client.post("/v1/auth/mfa/verify", json={"code": used})
        assert replay.status_code == 401 and reason(replay) == "mfa_replayed_code"

    # The access log has each read with what it revealed (ids, fields, classes, rows), and none
    # of the values; the step-ups and their refusals too.
    reads = [
        e
        for e in access_log.events(s, since=started, user="ada", origins=["api"])
        if e.kind == "read"
    ]
    read = [(e.action, tuple(e.detail["ids"]), e.detail["rows"]) for e in reads]
    assert read[:3] == [
        ("read_customer_pii", (CUSTOMER["id"],), 2),
        ("read_payment_instrument", (api.instrument_id,), 1),
        ("read_customer_pii", (424242,), 0),
    ]
    # Then those the server answered while its cache still held the step-up (at most 2 s).
    assert set(read[3:]) <= {("read_customer_pii", (CUSTOMER["id"],), 2)}
    assert reads[0].detail["classes_in_clear"] == ["non_personal", "pii", "pii_quasi"]
    assert "pan" in reads[1].detail["fields_in_clear"]
    mfa_events = [
        (e.action, e.outcome, e.reason)
        for e in access_log.events(s, since=started, user="ada", origins=["api"])
        if e.kind == "authn" and e.action.startswith("mfa_")
    ]
    assert mfa_events == [
        ("mfa_enroll", "allow", None),
        ("mfa_confirm", "allow", None),
        ("mfa_verify", "deny", "mfa_wrong_code"),
        ("mfa_verify", "allow", None),
        ("mfa_verify", "deny", "mfa_replayed_code"),
    ]
    logged = "".join(f.read_text() for f in access_log.log_dir(s).glob("*.jsonl"))
    for field in ("email", "full_name", "phone", "line1", "pan"):
        assert CUSTOMER[field] not in logged, field
    assert secret not in logged and used not in logged


def test_each_route_asks_clearance_for_the_classes_it_reveals():
    # The catalog's classes of the columns revealed (sql/oltp/0011_classification.sql): the
    # customer's e-mail, name, phone and street (PII), login and postal code (QUASI); the card's
    # PAN (PCI), last four digits and expiry (QUASI); the export only non-personal columns.
    from stripe_platform.api import customers

    assert customers.CUSTOMER_PII_CLASSES == ("pii", "pii_quasi")
    assert customers.PAYMENT_INSTRUMENT_CLASSES == ("pci", "pii_quasi")
    assert customers.PAYMENTS_EXPORT_CLASSES == ()


def test_masked_view_never_shows_clear_values_and_uncleared_roles_get_403(api):
    secrets_of_customer = [
        v for k, v in CUSTOMER.items() if k not in ("id",) and isinstance(v, str)
    ]
    admin = api.session("ada2", "platform-admins")
    analyst = api.session("ana", "analysts")
    for session in (admin, analyst):
        with api.client(session=session) as client:
            masked = client.get(f"/v1/customers/{CUSTOMER['id']}")
            assert masked.status_code == 200, masked.text
            body = masked.json()
            for value in secrets_of_customer:
                assert value not in masked.text
            assert {
                k: body[k] for k in ("user_name", "email", "full_name", "phone")
            } == dict.fromkeys(("user_name", "email", "full_name", "phone"), "***MASKED***")
            assert (body["id"], body["country_code"], body["preferred_currency"]) == (
                CUSTOMER["id"],
                "FR",
                "EUR",
            )
            assert set(body["masked"]) == {"user_name", "email", "full_name", "phone"}

    with api.client(session=analyst) as client:
        # Not cleared for personal data: 403, whatever the second factor (none here).
        refused = client.get(f"/v1/customers/{CUSTOMER['id']}/pii")
        assert refused.status_code == 403 and reason(refused) == "not_cleared"
        for path in (
            f"/v1/payment-instruments/{api.instrument_id}",
            "/v1/exports/payments?since=2026-02-01T00:00:00Z&until=2026-03-01T00:00:00Z",
        ):
            refused = client.get(path)
            assert refused.status_code == 403 and reason(refused) == "missing_scope", path
    with api.client() as anonymous:
        refused = anonymous.get(f"/v1/customers/{CUSTOMER['id']}")
        assert refused.status_code == 401 and reason(refused) == "no_credentials"


def test_bulk_export_needs_the_step_up_and_streams_the_period(api):
    s = api.settings
    session = api.session("bea", "platform-admins")
    period = "since=2026-02-01T00:00:00Z&until=2026-03-01T00:00:00Z"
    with api.client(session=session) as client:
        refused = client.get(f"/v1/exports/payments?{period}")
        assert refused.status_code == 401 and reason(refused) == "mfa_required"

        # Enrolment through the API: the secret is shown once, the factor confirmed with a code.
        enrolment = client.post("/v1/auth/mfa/enroll")
        assert enrolment.status_code == 200, enrolment.text
        assert enrolment.headers["Cache-Control"] == "no-store"
        secret = enrolment.json()["secret"]
        assert f"secret={secret}" in enrolment.json()["otpauth_uri"]
        # Confirmed with the previous step's code (inside the drift window), so that the current
        # code is a later step for the verification.
        previous = pyotp.TOTP(secret).at(now(), counter_offset=-1)
        confirmed = client.post("/v1/auth/mfa/confirm", json={"code": previous})
        assert confirmed.status_code == 200, confirmed.text
        again = client.post("/v1/auth/mfa/enroll")
        assert again.status_code == 409 and reason(again) == "mfa_already_enrolled"
        verified = client.post("/v1/auth/mfa/verify", json={"code": pyotp.TOTP(secret).now()})
        assert verified.status_code == 200, verified.text

        lines = client.get(f"/v1/exports/payments?{period}")
        assert lines.status_code == 200, lines.text
        assert lines.headers["content-type"].startswith("application/x-ndjson")
        rows = [json.loads(line) for line in lines.text.splitlines()]
        assert [(r["id"], r["amount"], r["date_time"]) for r in rows] == [
            (i, amount, when.isoformat()) for i, when, amount in PAYMENTS[:2]
        ]
        assert all(r["customer_id"] == CUSTOMER["id"] for r in rows)
        assert "203.0.113.9" not in lines.text  # the IP (pii_quasi) is not exported
        as_csv = client.get(f"/v1/exports/payments?{period}&format=csv")
        assert as_csv.status_code == 200
        parsed = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert [(int(r["id"]), r["status"], r["currency"]) for r in parsed] == [
            (70001, "completed", "EUR"),
            (70002, "completed", "EUR"),
        ]
        for bad in (
            "since=2026-03-01T00:00:00Z&until=2026-02-01T00:00:00Z",  # reversed
            "since=2025-01-01T00:00:00Z&until=2026-01-01T00:00:00Z",  # a year: too long
        ):
            assert client.get(f"/v1/exports/payments?{bad}").status_code == 400, bad
        naive = client.get(
            "/v1/exports/payments?since=2026-02-01T00:00:00&until=2026-03-01T00:00:00"
        )
        assert naive.status_code == 422  # a time without its zone is ambiguous

    # A bearer token (a machine) holds the admin role but cannot step up.
    _, token = sessions.issue_token(
        s, user="ops-bot", roles=["admin"], expires_at=now() + dt.timedelta(hours=1),
        created_by="tests/test_mfa.py",
    )  # fmt: skip
    with api.client(token=token) as machine:
        refused = machine.get(f"/v1/exports/payments?{period}")
        assert refused.status_code == 403 and reason(refused) == "interactive_session_required"
        refused = machine.post("/v1/auth/mfa/enroll")
        assert refused.status_code == 403 and reason(refused) == "interactive_session_required"


def test_wrong_codes_over_the_api_lock_with_429_and_the_unlock_time(api):
    s = api.settings
    session = api.session("cy", "platform-admins")
    secret = enrolled_now(s, "cy")
    with api.client(session=session) as client:
        for left in (4, 3, 2, 1):
            wrong = client.post("/v1/auth/mfa/verify", json={"code": wrong_code(secret, now())})
            assert wrong.status_code == 401 and wrong.json()["detail"]["remaining"] == left
        before = now()
        locked = client.post("/v1/auth/mfa/verify", json={"code": wrong_code(secret, now())})
        assert locked.status_code == 429, locked.text
        assert reason(locked) == "mfa_locked"
        until = dt.datetime.fromisoformat(locked.json()["detail"]["until"])
        assert before + dt.timedelta(seconds=899) <= until <= now() + dt.timedelta(seconds=900)
        assert 890 <= int(locked.headers["Retry-After"]) <= 900
        right = client.post("/v1/auth/mfa/verify", json={"code": pyotp.TOTP(secret).now()})
        assert right.status_code == 429  # the right code too, while locked
        assert client.get(f"/v1/customers/{CUSTOMER['id']}/pii").status_code == 401
        malformed = client.post("/v1/auth/mfa/verify", json={"code": ""})
        assert malformed.status_code == 422
        # A user without a factor cannot verify; the state is the conflict, not the code.
    with api.client(session=api.session("dee", "platform-admins")) as client:
        none = client.post("/v1/auth/mfa/verify", json={"code": "123456"})
        assert none.status_code == 409 and reason(none) == "mfa_not_enrolled"


# -- the CLI ----------------------------------------------------------------------------------------
@pytest.fixture
def cli(s, monkeypatch):
    """`stripe-platform` invoked in process against the test's database."""
    from typer.testing import CliRunner

    from stripe_platform.cli import app
    from stripe_platform.config import get_settings

    for key in [k for k in os.environ if k.startswith("STRIPE_PLATFORM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("STRIPE_PLATFORM_PROFILE", "embedded")
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(s.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", s.pg_database)
    get_settings.cache_clear()
    yield lambda *args: CliRunner().invoke(app, ["access", "mfa", *args])
    get_settings.cache_clear()


def test_cli_enrols_once_confirms_resets_and_shows_no_secret(cli, s):
    enrolled_cli = cli("enroll", "hal", "--json")
    assert enrolled_cli.exit_code == 0, enrolled_cli.output
    assert "shown this once" in enrolled_cli.stderr
    shown = json.loads(enrolled_cli.stdout)
    secret = shown["secret"]
    assert shown["otpauth_uri"].startswith("otpauth://totp/stripe-platform:hal?")
    assert f"secret={secret}" in shown["otpauth_uri"]

    wrong = cli("confirm", "hal", wrong_code(secret, now()))
    assert wrong.exit_code == 1
    assert "error: wrong MFA code (4 attempt(s) left" in wrong.stderr
    assert "Traceback" not in wrong.output
    confirmed = cli("confirm", "hal", pyotp.TOTP(secret).now())
    assert confirmed.exit_code == 0, confirmed.output
    again = cli("enroll", "hal")
    assert again.exit_code == 1 and "access mfa reset hal" in again.stderr

    status = cli("status", "--json")
    assert status.exit_code == 0, status.output
    [factor] = json.loads(status.stdout)
    assert (factor["user"], factor["state"], factor["failures"]) == ("hal", "confirmed", 0)
    table = cli("status")
    assert "hal" in table.stdout and "confirmed" in table.stdout
    for output in (status.output, table.output):
        assert secret not in output

    reset = cli("reset", "hal")
    assert reset.exit_code == 0, reset.output
    [factor] = mfa.status(s, "hal")
    assert factor.state == "reset" and factor.reset_by
    assert cli("reset", "hal").exit_code == 1  # nothing left to reset
    fresh = cli("enroll", "hal")
    assert fresh.exit_code == 0 and "secret: " in fresh.stdout and secret not in fresh.stdout
