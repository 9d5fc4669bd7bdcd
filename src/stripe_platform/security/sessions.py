"""The API's credentials: SSO sessions (the ``sp_session`` cookie) and bearer tokens for machines.

Both are random secrets (``secrets.token_urlsafe(32)``: 256 bits) handed out once; the database
(``access.api_session``, ``access.api_token``: sql/oltp/0016) keeps only their SHA-256 digests,
the standard practice for high-entropy tokens (no salt or slow hash is needed: nothing to guess).
A session's id is the digest of its cookie (hex), which logs and the MFA step-up name.

Roles stored here are an upper bound only: api/auth.py intersects them with what the access policy
grants the user at request time, so a policy change or an expiry takes effect at once.

Cost per request: a credential the process resolved less than :data:`CACHE_SECONDS` ago is served
from memory; otherwise one indexed read on a pooled connection (which also stamps last use). A
revocation or step-up made in this process drops the cached entry at once; one made by another
process (the CLI, another API worker) is seen within :data:`CACHE_SECONDS`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from stripe_platform.errors import PlatformError

if TYPE_CHECKING:
    from stripe_platform.config import Settings
    from stripe_platform.security.policy import Policy

SESSION_COOKIE = "sp_session"
# Recognisable in a leaked config or a log (secret scanners, reviewers).
TOKEN_PREFIX = "spt_"  # noqa: S105 - a prefix, not a secret
TOKEN_ID_PREFIX = "tok_"  # noqa: S105 - a prefix
CACHE_SECONDS = 2.0  # how stale another process's revocation may be seen here
_CACHE_MAX = 10_000  # entries; past it the cache starts again (a flood of sessions, not a leak)
_IDLE_CONNECTIONS = 4  # kept open per database


class CredentialStoreError(PlatformError, RuntimeError):
    """The sessions and tokens cannot be read or written (database down, not migrated)."""


class TokenNotFound(PlatformError, LookupError):
    """No API token has this id."""


@dataclass(frozen=True)
class SessionInfo:
    session_id: str  # sha256 hex of the cookie's token
    user: str
    roles: frozenset[str]
    via: str  # "saml", ...
    created_at: dt.datetime
    expires_at: dt.datetime
    mfa_verified_at: dt.datetime | None
    source_ip: str | None
    groups: frozenset[str] | None = None  # the IdP groups at login (None: not known)
    idp_session_index: str | None = None
    last_seen_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    revoked_reason: str | None = None

    def refusal(self, now: dt.datetime) -> str | None:
        """Why the session cannot be used at ``now`` (None: it can)."""
        if self.revoked_at is not None:
            return f"session revoked at {self.revoked_at:%Y-%m-%d %H:%M:%S} UTC ({self.revoked_reason})"
        if self.expires_at <= now:
            return f"session expired at {self.expires_at:%Y-%m-%d %H:%M:%S} UTC"
        return None


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    user: str
    roles: frozenset[str]  # the most it may use (the policy decides at request time)
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime
    last_used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    revoked_by: str | None = None
    revoked_reason: str | None = None

    def refusal(self, now: dt.datetime) -> str | None:
        """Why the token cannot be used at ``now`` (None: it can)."""
        if self.revoked_at is not None:
            return f"token {self.token_id} revoked at {self.revoked_at:%Y-%m-%d %H:%M:%S} UTC"
        if self.expires_at <= now:
            return f"token {self.token_id} expired at {self.expires_at:%Y-%m-%d %H:%M:%S} UTC"
        return None


def digest(secret: str) -> str:
    """The stored form of a session or token secret: SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError(f"{value.isoformat()}: a time with its zone is needed")
    return value.astimezone(dt.UTC)


def _roles(roles: Iterable[str]) -> list[str]:
    out = sorted({r for r in roles if r})
    if not out:
        raise ValueError("a session or token carries at least one role")
    return out


def policy_roles(
    policy: Policy, user: str, groups: Iterable[str] | None, now: dt.datetime
) -> frozenset[str]:
    """The roles the policy lets a credential of ``user`` use at ``now``: the user's own (none
    once its `until` passed) and those its IdP groups (as recorded at login) map to now. A token,
    or a session recorded without groups, has the user's own roles only."""
    return policy.roles_for(user, groups or (), now)


# -- sessions -------------------------------------------------------------------------------------
_SESSION_COLUMNS = """session_id, user_name, roles, via, created_at, expires_at, mfa_verified_at,
    host(source_ip), idp_groups, idp_session_index, last_seen_at, revoked_at, revoked_reason"""


def _session(row: tuple) -> SessionInfo:
    (sid, user, roles, via, created, expires, mfa, ip, groups, index, seen, revoked, why) = row
    return SessionInfo(
        session_id=sid,
        user=user,
        roles=frozenset(roles),
        via=via,
        created_at=created,
        expires_at=expires,
        mfa_verified_at=mfa,
        source_ip=ip,
        groups=None if groups is None else frozenset(groups),
        idp_session_index=index,
        last_seen_at=seen,
        revoked_at=revoked,
        revoked_reason=why,
    )


def create_session(
    settings: Settings,
    *,
    user: str,
    roles: Iterable[str],
    via: str,
    source_ip: str | None,
    idp_session_index: str | None = None,
    groups: Iterable[str] | None = None,
) -> str:
    """A new session of ``user`` for ``settings.api_session_seconds``; returns the cookie's token
    (the only copy). ``groups``: the IdP groups it came with; api/auth.py maps them through the
    policy again at each request (without them, only the policy user's own roles count)."""
    if not user:
        raise ValueError("a session needs a user")
    token = secrets.token_urlsafe(32)
    try:  # a test client's "testclient", a proxy's odd value: not an address, not kept
        source_ip = None if source_ip is None else str(ipaddress.ip_address(source_ip))
    except ValueError:
        source_ip = None
    with _connection(settings) as conn:
        conn.execute(
            """INSERT INTO access.api_session (session_id, user_name, roles, idp_groups, via,
                   source_ip, idp_session_index, expires_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s,
                       clock_timestamp() + make_interval(secs => %s))""",
            (
                digest(token),
                user,
                _roles(roles),
                None if groups is None else sorted(set(groups)),
                via,
                source_ip,
                idp_session_index,
                settings.api_session_seconds,
            ),
        )
    return token


def lookup_session(settings: Settings, token: str) -> SessionInfo | None:
    """The session of this cookie token whatever its state (revoked, expired), None if unknown."""
    key = digest(token)
    cached = _cache.get(key)
    if isinstance(cached, SessionInfo):
        return cached
    row = _lookup(
        settings,
        f"""UPDATE access.api_session SET last_seen_at = clock_timestamp()
            WHERE session_id = %s RETURNING {_SESSION_COLUMNS}""",
        (key,),
    )
    if row is None:
        return None
    info = _session(row)
    _cache.put(key, info)
    return info


def resolve_session(
    settings: Settings, token: str, now: dt.datetime | None = None
) -> SessionInfo | None:
    """The session of this cookie token; None if unknown, expired or revoked."""
    info = lookup_session(settings, token)
    now = now or dt.datetime.now(dt.UTC)
    return info if info is not None and info.refusal(now) is None else None


def mark_step_up(settings: Settings, session_id: str, at: dt.datetime) -> None:
    """The session's user passed a second factor at ``at`` (security/mfa.py, api/mfa.py)."""
    with _connection(settings) as conn:
        updated = conn.execute(
            """UPDATE access.api_session SET mfa_verified_at = %s
               WHERE session_id = %s AND revoked_at IS NULL""",
            (_utc(at), session_id),
        ).rowcount
    _cache.drop(session_id)
    if not updated:
        raise CredentialStoreError(f"session {session_id[:12]}... is unknown or revoked")


def revoke_session(settings: Settings, session_id: str, reason: str = "revoked") -> None:
    """End the session now (logout, policy change). Revoking it again changes nothing."""
    with _connection(settings) as conn:
        conn.execute(
            """UPDATE access.api_session SET revoked_at = clock_timestamp(), revoked_reason = %s
               WHERE session_id = %s AND revoked_at IS NULL""",
            (reason, session_id),
        )
    _cache.drop(session_id)


def revoke_many(
    settings: Settings,
    *,
    tokens: Iterable[str] = (),
    session_ids: Iterable[str] = (),
    by: str,
    reason: str,
) -> None:
    """Revoke these tokens (ids) and sessions in one transaction: all or none."""
    tokens, session_ids = list(tokens), list(session_ids)
    with _connection(settings) as conn, conn.transaction():
        if tokens:
            conn.execute(
                """UPDATE access.api_token
                   SET revoked_at = clock_timestamp(), revoked_by = %s, revoked_reason = %s
                   WHERE token_id = ANY(%s) AND revoked_at IS NULL""",
                (by, reason, tokens),
            )
        if session_ids:
            conn.execute(
                """UPDATE access.api_session
                   SET revoked_at = clock_timestamp(), revoked_reason = %s
                   WHERE session_id = ANY(%s) AND revoked_at IS NULL""",
                (reason, session_ids),
            )
    # Tokens are cached by their secret's digest, which only the database knows here.
    _cache.clear()


def list_sessions(settings: Settings, *, usable_only: bool = True) -> list[SessionInfo]:
    """The sessions, newest first; ``usable_only``: not revoked and not expired."""
    where = "WHERE revoked_at IS NULL AND expires_at > clock_timestamp()" if usable_only else ""
    with _connection(settings) as conn:
        rows = conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM access.api_session {where} ORDER BY created_at DESC"
        ).fetchall()
    return [_session(r) for r in rows]


# -- tokens ---------------------------------------------------------------------------------------
_BEARER_COLUMNS = """token_id, user_name, roles, created_by, created_at, expires_at,
    last_used_at, revoked_at, revoked_by, revoked_reason"""


def _token(row: tuple) -> TokenInfo:
    (tid, user, roles, by, created, expires, used, revoked, revoked_by, why) = row
    return TokenInfo(
        token_id=tid,
        user=user,
        roles=frozenset(roles),
        created_by=by,
        created_at=created,
        expires_at=expires,
        last_used_at=used,
        revoked_at=revoked,
        revoked_by=revoked_by,
        revoked_reason=why,
    )


def issue_token(
    settings: Settings,
    *,
    user: str,
    roles: Iterable[str],
    expires_at: dt.datetime,
    created_by: str,
) -> tuple[str, str]:
    """A new bearer token of ``user``: returns (token id, secret). The secret is shown once and
    never stored; the id names the token afterwards."""
    if not user:
        raise ValueError("a token needs a user")
    expires_at = _utc(expires_at)
    if expires_at <= dt.datetime.now(dt.UTC):
        raise ValueError(f"a token expiring at {expires_at.isoformat()} would be expired already")
    token_id = TOKEN_ID_PREFIX + secrets.token_hex(6)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with _connection(settings) as conn:
        conn.execute(
            """INSERT INTO access.api_token (token_id, secret_sha256, user_name, roles,
                   created_by, expires_at)
               VALUES (%s, %s, %s, %s, %s, %s)""",
            (token_id, digest(secret), user, _roles(roles), created_by or "unknown", expires_at),
        )
    return token_id, secret


def lookup_token(settings: Settings, secret: str) -> TokenInfo | None:
    """The token of this secret whatever its state (revoked, expired), None if unknown."""
    if not secret.startswith(TOKEN_PREFIX):
        return None  # not one of ours: no need to ask the database
    key = digest(secret)
    cached = _cache.get(key)
    if isinstance(cached, TokenInfo):
        return cached
    row = _lookup(
        settings,
        f"""UPDATE access.api_token SET last_used_at = clock_timestamp()
            WHERE secret_sha256 = %s RETURNING {_BEARER_COLUMNS}""",
        (key,),
    )
    if row is None:
        return None
    info = _token(row)
    _cache.put(key, info)
    return info


def resolve_token(
    settings: Settings, secret: str, now: dt.datetime | None = None
) -> TokenInfo | None:
    """The token of this secret; None if unknown, expired or revoked."""
    info = lookup_token(settings, secret)
    now = now or dt.datetime.now(dt.UTC)
    return info if info is not None and info.refusal(now) is None else None


def revoke_token(
    settings: Settings, token_id: str, *, by: str = "unknown", reason: str = "revoked"
) -> TokenInfo:
    """Revoke the token now; revoking it again changes nothing. Returns its state."""
    with _connection(settings) as conn:
        conn.execute(
            """UPDATE access.api_token
               SET revoked_at = clock_timestamp(), revoked_by = %s, revoked_reason = %s
               WHERE token_id = %s AND revoked_at IS NULL""",
            (by, reason, token_id),
        )
        row = conn.execute(
            f"SELECT {_BEARER_COLUMNS}, secret_sha256 FROM access.api_token WHERE token_id = %s",
            (token_id,),
        ).fetchone()
    if row is None:
        raise TokenNotFound(f"no API token {token_id!r}: `stripe-platform access token list`")
    _cache.drop(row[-1])
    return _token(row[:-1])


def get_token(settings: Settings, token_id: str) -> TokenInfo | None:
    """The token of this id whatever its state, None if there is none."""
    with _connection(settings) as conn:
        row = conn.execute(
            f"SELECT {_BEARER_COLUMNS} FROM access.api_token WHERE token_id = %s", (token_id,)
        ).fetchone()
    return None if row is None else _token(row)


def list_tokens(settings: Settings, *, usable_only: bool = False) -> list[TokenInfo]:
    """The tokens, newest first; ``usable_only``: not revoked and not expired."""
    where = "WHERE revoked_at IS NULL AND expires_at > clock_timestamp()" if usable_only else ""
    with _connection(settings) as conn:
        rows = conn.execute(
            f"SELECT {_BEARER_COLUMNS} FROM access.api_token {where} ORDER BY created_at DESC"
        ).fetchall()
    return [_token(r) for r in rows]


# -- the cache and the connections ----------------------------------------------------------------
class _Cache:
    """Resolved credentials by digest, for CACHE_SECONDS (monotonic time)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[0] > CACHE_SECONDS:
            return None
        return entry[1]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            if len(self._entries) >= _CACHE_MAX:
                self._entries.clear()
            self._entries[key] = (time.monotonic(), value)

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_cache = _Cache()


def in_memory(secret: str) -> bool:
    """Whether resolving this session or token secret now needs no database read (it was
    resolved less than CACHE_SECONDS ago here)."""
    return _cache.get(digest(secret)) is not None


def forget_cached() -> None:
    """Drop every cached credential (tests, or after a bulk change made in this process)."""
    _cache.clear()


_idle: dict[tuple, list[psycopg.Connection]] = {}
_idle_lock = threading.Lock()


def _identity(settings: Settings) -> tuple:
    dsn = settings.pg_dsn.get_secret_value() if settings.pg_dsn is not None else None
    return (settings.profile, str(settings.home_dir), settings.pg_port, settings.pg_database, dsn)


@contextmanager
def _connection(settings: Settings) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the OLTP database (unkeyed: no personal data is read here),
    reused from a few idle ones: opening one (TLS, authentication) costs far more than a read."""
    from stripe_platform.oltp import db  # oltp.db imports the key machinery: not at import time

    identity = _identity(settings)
    with _idle_lock:
        pool = _idle.setdefault(identity, [])
        conn = pool.pop() if pool else None
    try:
        if conn is None or conn.closed or conn.broken:
            conn = db.connect(settings, with_key=False, autocommit=True)
        yield conn
    except psycopg.errors.UndefinedTable as exc:
        _discard(conn)
        raise CredentialStoreError(
            f"the API's sessions and tokens are not in this database ({exc.diag.message_primary}):"
            " run `stripe-platform db migrate`"
        ) from None
    except psycopg.OperationalError as exc:
        _discard(conn)
        with _idle_lock:  # after a server restart the idle ones are dead too
            stale, pool[:] = list(pool), []
        for other in stale:
            _discard(other)
        raise CredentialStoreError(
            f"the API's sessions and tokens are unreachable: {exc}"
        ) from None
    except BaseException:
        _discard(conn)
        raise
    else:
        with _idle_lock:
            if len(pool) < _IDLE_CONNECTIONS and not conn.broken:
                pool.append(conn)
                conn = None
        _discard(conn)


def _lookup(settings: Settings, query: str, params: tuple) -> tuple | None:
    """The first row of an idempotent statement; tried twice when the connection fails (a pooled
    connection the server dropped meanwhile, a restart): a request should not fail for that."""
    try:
        with _connection(settings) as conn:
            return conn.execute(query, params).fetchone()
    except CredentialStoreError as exc:
        if not isinstance(exc.__context__, psycopg.OperationalError):
            raise
    with _connection(settings) as conn:
        return conn.execute(query, params).fetchone()


def _discard(conn: psycopg.Connection | None) -> None:
    if conn is not None:
        conn.close()
