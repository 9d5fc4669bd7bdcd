"""Multi-factor authentication: one TOTP factor (RFC 6238, pyotp) a user, the second factor that
endpoints and commands revealing sensitive data ask for (a step-up, api/auth.py ``require_clear``).

- ``enroll``: a new random secret (160 bits) and its ``otpauth://`` URI for an authenticator app,
  stored encrypted and unconfirmed. A confirmed factor is replaced only after an administrator's
  ``reset``.
- ``confirm``: the first correct code proves the app holds the secret; the factor becomes usable.
- ``verify``: a correct code (the current 30 s step, or one step either side for clock drift).
  Wrong codes are counted; after the policy's ``mfa.max_failures`` consecutive ones the factor is
  locked for ``mfa.lockout_seconds`` (every code refused, the right one too). A code whose time
  step is not later than the last accepted one is a replay and is refused (pyotp alone would
  accept the same code again within its window).
- ``reset`` (an administrator): the secret is destroyed and the lock lifted; the user enrols again.

State lives in ``access.mfa_factor`` (sql/oltp/0017_mfa.sql); the secret is an Envelope
ciphertext (AES-256-GCM) under the data key ``postgres/mfa_factor``, bound to the user's name.
Every attempt goes to the access log (``audit.access_log``); neither a code nor a secret is ever
logged or put in an error message.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyotp
from pyotp.exceptions import OTPVerificationError

from stripe_platform.audit import access_log
from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.security.keys import KeyError_

log = logging.getLogger(__name__)

ISSUER = "stripe-platform"  # what authenticator apps show beside the account name
KEY_SCOPE = "postgres/mfa_factor"  # the Envelope data key of the secrets
VALID_WINDOW = 1  # steps accepted either side of the current one (clock drift)
SECRET_LENGTH = 32  # base32 characters: 160 bits, RFC 4226's recommended length
CODE = re.compile(r"^[0-9]{6}$")  # pyotp's default: 6 digits, SHA-1, 30 s steps
RESOURCE = "mfa_factor"  # the access log's resource name for these events


class MfaError(PlatformError, ValueError):
    """An MFA operation refused; ``reason`` is a stable code the API returns (e.g. wrong_code)."""

    def __init__(self, message: str, *, reason: str, user: str, remaining: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.user = user
        self.remaining = remaining  # wrong codes left before the lockout, when counted


class MfaLocked(MfaError):
    """Too many wrong codes: every code is refused until ``until``."""

    def __init__(self, message: str, *, user: str, until: dt.datetime) -> None:
        super().__init__(message, reason="mfa_locked", user=user)
        self.until = until


class MfaNotEnrolled(MfaError):
    """The user has no factor (never enrolled, or reset)."""

    def __init__(self, message: str, *, user: str) -> None:
        super().__init__(message, reason="mfa_not_enrolled", user=user)


@dataclass(frozen=True)
class Enrolment:
    """A new factor's secret, shown to its user once (neither is stored in clear)."""

    user: str
    secret: str = field(repr=False)  # base32, what an app without a camera is given
    uri: str = field(repr=False)  # otpauth://totp/stripe-platform:<user>?secret=...&issuer=...


@dataclass(frozen=True)
class FactorStatus:
    user: str
    state: str  # "pending" (not confirmed) | "confirmed" | "reset" (the user must enrol again)
    enrolled_at: dt.datetime | None
    confirmed_at: dt.datetime | None
    last_verified_at: dt.datetime | None
    failures: int  # consecutive wrong codes since the last accepted one or the last lockout
    locked_until: dt.datetime | None  # set only while locked
    reset_at: dt.datetime | None
    reset_by: str | None


@dataclass(frozen=True)
class _Rules:
    max_failures: int
    lockout_seconds: int


def _rules(settings: Settings) -> _Rules:
    # The policy file's `mfa:` section (security/policy.py): reviewed like code, one place.
    from stripe_platform.security.policy import load_policy

    mfa = load_policy(settings).mfa
    return _Rules(mfa.max_failures, mfa.lockout_seconds)


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now: a timezone-aware datetime is required (TOTP steps are UTC)")
    return now


def _user(user: str) -> str:
    if not user or not user.strip() or len(user) > 256:
        raise MfaError(
            f"user name {user!r}: expected 1-256 characters, not blank",
            reason="bad_user",
            user=user,
        )
    return user


def _connect(settings: Settings) -> psycopg.Connection:
    # Unkeyed: the secret is decrypted here by the Envelope, not by the database session.
    from stripe_platform.oltp import db

    return db.connect(settings, with_key=False)


def _envelope(settings: Settings):
    from stripe_platform.security.envelope import shared_envelope

    return shared_envelope(settings)


def _seal(settings: Settings, user: str, secret: str) -> bytes:
    return _envelope(settings).encrypt(KEY_SCOPE, secret.encode(), aad=user.encode())


def _open(settings: Settings, user: str, ciphertext: bytes) -> str:
    return (
        _envelope(settings)
        .decrypt(bytes(ciphertext), aad=user.encode(), obj=f"{RESOURCE}/{user}")
        .decode()
    )


def _record(
    settings: Settings,
    *,
    kind: str,
    action: str,
    user: str,
    outcome: str,
    reason: str | None = None,
    source: str | None = None,
    via: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    access_log.record(
        settings,
        kind=kind,
        user=user,
        source=source,
        resource=f"{RESOURCE}/{user}",
        action=action,
        outcome=outcome,
        reason=reason,
        via=via,
        detail=detail,
    )


# -- enrolment ------------------------------------------------------------------------------------
def enroll(
    settings: Settings,
    user: str,
    *,
    now: dt.datetime | None = None,
    source: str | None = None,
    via: str | None = None,
) -> Enrolment:
    """A new secret for ``user``, stored encrypted and unconfirmed (replacing an unconfirmed one).
    Refused when the user already has a confirmed factor: an administrator resets it first."""
    user, now = _user(user), _now(now)
    secret = pyotp.random_base32(SECRET_LENGTH)  # secrets.SystemRandom
    sealed = _seal(settings, user, secret)
    with _connect(settings) as conn, conn.transaction():
        row = conn.execute(
            "SELECT confirmed_at FROM access.mfa_factor WHERE user_name = %s FOR UPDATE", (user,)
        ).fetchone()
        refused = row is not None and row[0] is not None
        if not refused:
            # The lock and the count survive a new enrolment: enrolling again is no way round them.
            conn.execute(
                """INSERT INTO access.mfa_factor (user_name, secret, enrolled_at)
                   VALUES (%(user)s, %(secret)s, %(now)s)
                   ON CONFLICT (user_name) DO UPDATE SET secret = EXCLUDED.secret,
                       enrolled_at = EXCLUDED.enrolled_at, confirmed_at = NULL, last_step = NULL,
                       last_verified_at = NULL""",
                {"user": user, "secret": sealed, "now": now},
            )
    if refused:
        _record(
            settings,
            kind="authn",
            action="mfa_enroll",
            user=user,
            outcome="deny",
            reason="mfa_already_enrolled",
            source=source,
            via=via,
        )
        raise MfaError(
            f"{user} already has a confirmed MFA factor: an administrator resets it first "
            f"(`stripe-platform access mfa reset {user}`), then the user enrols again",
            reason="mfa_already_enrolled",
            user=user,
        )
    _record(
        settings,
        kind="authn",
        action="mfa_enroll",
        user=user,
        outcome="allow",
        source=source,
        via=via,
    )
    uri = pyotp.TOTP(secret).provisioning_uri(name=user, issuer_name=ISSUER)
    return Enrolment(user, secret, uri)


def confirm(
    settings: Settings,
    user: str,
    code: str,
    now: dt.datetime | None = None,
    *,
    source: str | None = None,
    via: str | None = None,
) -> None:
    """Confirm ``user``'s pending factor with a code from their app (wrong codes count as in
    verify)."""
    _attempt(settings, _user(user), code, _now(now), "mfa_confirm", source, via)


def verify(
    settings: Settings,
    user: str,
    code: str,
    now: dt.datetime | None = None,
    *,
    source: str | None = None,
    via: str | None = None,
) -> None:
    """Accept ``code`` as ``user``'s second factor at ``now``, or raise: MfaError (wrong or
    replayed code: counted; not enrolled or not confirmed), MfaLocked (too many wrong codes)."""
    _attempt(settings, _user(user), code, _now(now), "mfa_verify", source, via)


def _attempt(
    settings: Settings,
    user: str,
    code: str,
    now: dt.datetime,
    action: str,
    source: str | None,
    via: str | None,
) -> None:
    rules = _rules(settings)
    confirming = action == "mfa_confirm"
    detail: dict[str, Any] = {}
    try:
        with _connect(settings) as conn, conn.transaction():
            # The row lock serialises attempts: two requests with one code cannot both pass.
            row = conn.execute(
                "SELECT secret, confirmed_at, last_step, failures, locked_until "
                "FROM access.mfa_factor WHERE user_name = %s FOR UPDATE",
                (user,),
            ).fetchone()
            refusal = _refusal_before_code(user, row, now, confirming)
            if refusal is None:
                secret, _, last_step, failures, _ = row
                step = _matching_step(_open(settings, user, secret), code, now)
                if step is not None and (last_step is None or step > last_step):
                    conn.execute(
                        "UPDATE access.mfa_factor SET failures = 0, locked_until = NULL, "
                        "last_step = %(step)s, last_verified_at = %(now)s, "
                        "confirmed_at = coalesce(confirmed_at, %(now)s) WHERE user_name = %(user)s",
                        {"step": step, "now": now, "user": user},
                    )
                    detail = {"step": step}
                else:
                    refusal = _count_failure(conn, user, failures + 1, step is not None, now, rules)
                    detail = {"failures": failures + 1}
    except KeyError_ as exc:  # the secret does not decrypt: tampered, moved, or its key gone
        _record(
            settings,
            kind="authn",
            action=action,
            user=user,
            outcome="error",
            reason="mfa_secret_unreadable",
            source=source,
            via=via,
            detail={"error": type(exc).__name__},
        )
        raise
    if refusal is not None:
        if isinstance(refusal, MfaLocked):
            detail["locked_until"] = refusal.until.isoformat()
        _record(
            settings,
            kind="authn",
            action=action,
            user=user,
            outcome="deny",
            reason=refusal.reason,
            source=source,
            via=via,
            detail=detail,
        )
        raise refusal
    _record(
        settings,
        kind="authn",
        action=action,
        user=user,
        outcome="allow",
        source=source,
        via=via,
        detail=detail,
    )


def _refusal_before_code(
    user: str, row: tuple | None, now: dt.datetime, confirming: bool
) -> MfaError | None:
    """Why the code is not even looked at (no factor, wrong state, locked), or None."""
    if row is None or row[0] is None:
        return MfaNotEnrolled(
            f"{user} has no MFA factor: enrol first (POST /v1/auth/mfa/enroll, or "
            f"`stripe-platform access mfa enroll {user}`)",
            user=user,
        )
    confirmed_at, locked_until = row[1], row[4]
    if confirming and confirmed_at is not None:
        return MfaError(
            f"{user}'s MFA factor is already confirmed", reason="mfa_already_confirmed", user=user
        )
    if not confirming and confirmed_at is None:
        return MfaError(
            f"{user}'s MFA factor is not confirmed yet: confirm the enrolment with a code first",
            reason="mfa_not_confirmed",
            user=user,
        )
    if locked_until is not None and locked_until > now:
        return MfaLocked(
            f"{user}'s MFA factor is locked after too many wrong codes until "
            f"{locked_until.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC (an administrator can reset it)",
            user=user,
            until=locked_until,
        )
    return None


def _matching_step(secret: str, code: str, now: dt.datetime) -> int | None:
    """The time step whose code ``code`` is (within VALID_WINDOW of now's), or None."""
    code = "".join(str(code).split())  # "123 456" as apps display it
    if not CODE.match(code):
        return None
    try:
        return pyotp.TOTP(secret).verify_and_get_timecode(
            code, for_time=now, valid_window=VALID_WINDOW
        )
    except OTPVerificationError:
        return None


def _count_failure(
    conn: psycopg.Connection,
    user: str,
    failures: int,
    replayed: bool,
    now: dt.datetime,
    rules: _Rules,
) -> MfaError:
    """Count one wrong (or replayed) code; lock the factor at the policy's limit. A replay counts:
    whoever replays an observed code is not the user."""
    if failures >= rules.max_failures:
        until = now + dt.timedelta(seconds=rules.lockout_seconds)
        # The count starts again after the lockout: the lock itself is the record of this round.
        conn.execute(
            "UPDATE access.mfa_factor SET failures = 0, locked_until = %s WHERE user_name = %s",
            (until, user),
        )
        log.warning(
            "MFA: %s locked until %s after %d consecutive wrong codes",
            user,
            until.isoformat(),
            failures,
        )
        return MfaLocked(
            f"{failures} wrong codes in a row: {user}'s MFA factor is locked until "
            f"{until.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC",
            user=user,
            until=until,
        )
    conn.execute(
        "UPDATE access.mfa_factor SET failures = %s WHERE user_name = %s", (failures, user)
    )
    remaining = rules.max_failures - failures
    if replayed:
        return MfaError(
            "this code was already used (or an earlier one accepted): wait for the next code",
            reason="mfa_replayed_code",
            user=user,
            remaining=remaining,
        )
    return MfaError(
        f"wrong MFA code ({remaining} attempt(s) left before the factor locks)",
        reason="mfa_wrong_code",
        user=user,
        remaining=remaining,
    )


# -- administration -------------------------------------------------------------------------------
def reset(
    settings: Settings,
    user: str,
    by: str,
    *,
    now: dt.datetime | None = None,
    source: str | None = None,
    via: str | None = None,
) -> None:
    """Destroy ``user``'s factor (a lost phone, a lockout to lift): the secret is erased and the
    user enrols again. ``by``: the administrator, for the record."""
    user, now = _user(user), _now(now)
    if not by or not by.strip():
        raise ValueError("reset: `by` names the administrator (audit)")
    with _connect(settings) as conn, conn.transaction():
        updated = conn.execute(
            """UPDATE access.mfa_factor SET secret = NULL, enrolled_at = NULL, confirmed_at = NULL,
                   last_step = NULL, last_verified_at = NULL, failures = 0, locked_until = NULL,
                   reset_at = %(now)s, reset_by = %(by)s
               WHERE user_name = %(user)s AND secret IS NOT NULL""",
            {"user": user, "by": by, "now": now},
        ).rowcount
    if not updated:
        _record(
            settings,
            kind="admin",
            action="mfa_reset",
            user=by,
            outcome="deny",
            reason="mfa_not_enrolled",
            source=source,
            via=via,
            detail={"subject": user},
        )
        raise MfaNotEnrolled(f"{user} has no MFA factor to reset", user=user)
    log.info("MFA: %s's factor reset by %s", user, by)
    _record(
        settings,
        kind="admin",
        action="mfa_reset",
        user=by,
        outcome="allow",
        source=source,
        via=via,
        detail={"subject": user},
    )


def status(
    settings: Settings, user: str | None = None, *, now: dt.datetime | None = None
) -> list[FactorStatus]:
    """The factors (of ``user`` only, when given), by user name. No secret is read."""
    now = _now(now)
    with _connect(settings) as conn:
        rows = conn.execute(
            """SELECT user_name, enrolled_at, confirmed_at, last_verified_at, failures,
                      locked_until, reset_at, reset_by
               FROM access.mfa_factor WHERE %(user)s::text IS NULL OR user_name = %(user)s
               ORDER BY user_name""",
            {"user": user},
        ).fetchall()
    return [
        FactorStatus(
            user=name,
            state="reset" if enrolled is None else "pending" if confirmed is None else "confirmed",
            enrolled_at=enrolled,
            confirmed_at=confirmed,
            last_verified_at=verified,
            failures=failures,
            locked_until=locked if locked is not None and locked > now else None,
            reset_at=reset_at,
            reset_by=reset_by,
        )
        for name, enrolled, confirmed, verified, failures, locked, reset_at, reset_by in rows
    ]
