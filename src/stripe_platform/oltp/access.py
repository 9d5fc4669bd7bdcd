"""Time-limited database access for contractors and fixed-term projects (the brief's RBAC)."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass

import psycopg
from psycopg import sql

from stripe_platform.errors import PlatformError

GRANTABLE_ROLES = ("developer", "readonlyuser")
ROLE_NAME = re.compile(r"^[a-z][a-z0-9_]{2,62}$")


class AccessError(PlatformError, ValueError):
    pass


@dataclass(frozen=True)
class TemporaryGrant:
    user: str
    role: str
    valid_until: dt.datetime | None
    expired: bool


def grant_temporary(
    conn: psycopg.Connection, user: str, role: str, *, days: int, now: dt.datetime | None = None
) -> tuple[TemporaryGrant, str]:
    """Create a login role that expires after ``days``; return it and its one-time password."""
    if role not in GRANTABLE_ROLES:
        raise AccessError(f"role must be one of {', '.join(GRANTABLE_ROLES)}, not {role!r}")
    if not ROLE_NAME.match(user):
        raise AccessError(f"user name {user!r}: use 3-63 lowercase letters, digits or _")
    if days < 1 or days > 366:
        raise AccessError(f"days must be between 1 and 366, not {days}")
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone():
        raise AccessError(f"role {user!r} already exists")
    until = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(days=days)
    password = secrets.token_urlsafe(18)
    # Send a SCRAM verifier, never the password: every statement is written to the audit log.
    verifier = conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256")
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "CREATE ROLE {} LOGIN PASSWORD {} VALID UNTIL {} IN ROLE {}, temporary_access"
            ).format(
                sql.Identifier(user),
                sql.Literal(verifier.decode()),
                sql.Literal(until.isoformat()),
                sql.Identifier(role),
            )
        )
    return TemporaryGrant(user, role, until, False), password


def list_temporary(conn: psycopg.Connection) -> list[TemporaryGrant]:
    rows = conn.execute(
        """SELECT r.rolname, g.rolname, r.rolvaliduntil, coalesce(r.rolvaliduntil < now(), false)
           FROM pg_roles r
           JOIN pg_auth_members m ON m.member = r.oid
           JOIN pg_roles g ON g.oid = m.roleid AND g.rolname = ANY(%s)
           WHERE EXISTS (SELECT FROM pg_auth_members t JOIN pg_roles tr ON tr.oid = t.roleid
                         WHERE t.member = r.oid AND tr.rolname = 'temporary_access')
           ORDER BY r.rolvaliduntil""",
        (list(GRANTABLE_ROLES),),
    ).fetchall()
    return [TemporaryGrant(*row) for row in rows]


def revoke_expired(conn: psycopg.Connection) -> list[str]:
    """Drop the login roles whose validity has passed; return their names."""
    dropped = []
    for grant in list_temporary(conn):
        if grant.expired:
            with conn.transaction():
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(grant.user)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(grant.user)))
            dropped.append(grant.user)
    return dropped
