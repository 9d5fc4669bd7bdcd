"""Ordered SQL migrations from ``sql/oltp``, tracked in ``schema_migrations``.

Each file runs in its own transaction together with its tracking row, so a failing migration leaves
nothing behind; an advisory lock keeps two concurrent runs from interleaving; a checksum catches an
already-applied file that was edited afterwards.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from stripe_platform.errors import PlatformError
from stripe_platform.paths import SQL_OLTP_DIR

MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
LOCK_KEY = 0x5354_5249  # "STRI": any constant shared by all runners


class MigrationError(PlatformError, RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def discover(directory: Path = SQL_OLTP_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_snake_name.sql")
        migrations.append(Migration(int(match[1]), match[2], path))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migrations share a version number")
    return migrations


def _ensure_table(conn: psycopg.Connection) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version integer PRIMARY KEY,
               name text NOT NULL,
               checksum text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP)"""
    )


def applied(conn: psycopg.Connection) -> dict[int, tuple[str, str]]:
    _ensure_table(conn)
    rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
    return {v: (n, c) for v, n, c in rows}


def migrate(
    conn: psycopg.Connection,
    migrations: list[Migration] | None = None,
    on_apply: Callable[[Migration], None] = lambda m: None,
) -> list[Migration]:
    """Apply pending migrations in order; return those applied (empty when up to date)."""
    migrations = discover() if migrations is None else migrations
    if not conn.autocommit:
        raise ValueError("migrate() manages its own transactions: pass an autocommit connection")
    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    try:
        done = applied(conn)
        for m in migrations:
            if m.version in done and done[m.version][1] != m.checksum:
                raise MigrationError(
                    f"{m.path.name} was changed after it was applied; add a new migration instead"
                )
        newly_applied = []
        for m in migrations:
            if m.version in done:
                continue
            on_apply(m)
            try:
                with conn.transaction():
                    conn.execute(m.sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (m.version, m.name, m.checksum),
                    )
            except psycopg.Error as exc:
                diag = exc.diag
                where = f" ({diag.context.strip().splitlines()[-1]})" if diag.context else ""
                raise MigrationError(
                    f"{m.path.name} failed and was rolled back: {diag.message_primary or exc}{where}"
                ) from exc
            newly_applied.append(m)
        conn.execute("SELECT apply_column_privileges()")
        return newly_applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
