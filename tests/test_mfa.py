"""MFA (TOTP, RFC 6238): enrolment and confirmation, verification with replay refusal, lockout
after the policy's wrong codes, reset; the secret stored encrypted; the API's step-up in front of
the sensitive reads, served by a real uvicorn over TLS.

Real components: the session's PostgreSQL (a migrated database), the Envelope's AES-GCM keys in
that database, real TOTP codes computed with pyotp from the enrolled secret at chosen times (the
code under test is given the same ``now``), the `stripe-platform api` process."""

from __future__ import annotations

import datetime as dt
import urllib.parse
from pathlib import Path

import psycopg
import pyotp
import pytest

from stripe_platform.audit import access_log
from stripe_platform.oltp import db
from stripe_platform.security import mfa
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
    assert (rules.max_failures, rules.lockout_seconds) == (5, 900)  # the "five times"
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
