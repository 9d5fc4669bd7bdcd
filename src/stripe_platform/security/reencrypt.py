"""Background re-encryption of the OLTP's encrypted columns, to retire old data-key versions.

After ``keys rotate postgres/<table>`` new writes use the new version while rows keep the version
their ciphertext names (sql/oltp/0013). This job moves them: per table, in batches by primary key,
``col = pii_encrypt(pii_decrypt(col), scope)`` on the rows whose ciphertext names an older version
(or none: the LEGACY single key of before per-table keys), each batch one transaction that also
records where it stopped (``keys.column_reencryption``), so a killed run resumes after its last
committed batch and no row is rewritten twice. The platform keeps reading meanwhile: every keyed
session holds all usable versions (oltp/db.py).

Then the old versions are retired through the Envelope. A session opened before the rotation may
still be writing the old version: the final check takes the exclusive side of the scope's writer
lock (writers hold the shared side, see pii_encrypt), re-encrypts what such sessions wrote, and
retires only when nothing under an old version is left; their later writes are refused. The legacy
key is retired (no longer handed to sessions) once no table holds a legacy ciphertext.

The rewrite runs with ``session_replication_role = replica``, as the seed's bulk load does: a
re-encryption is not a change of the data, so ``UpdatedAt`` stays (incremental syncs do not
re-extract every row); Customer.EmailHash, normally kept by a trigger, is set by the same statement
(from the legacy key's hash to the lookup key's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.oltp import db
from stripe_platform.security.envelope import Envelope, shared_envelope

Progress = Callable[[str, int, int], None]  # (table, rows just rewritten, rows to rewrite)


class ReencryptError(PlatformError, RuntimeError):
    """The re-encryption stopped; committed batches stay done and a rerun resumes after them."""


@dataclass(frozen=True)
class ScopeResult:
    scope: str
    table: str
    target_version: int
    rows: int  # rewritten by this run
    batches: int  # committed by this run
    resumed_after: int | None  # the primary key a previous, interrupted run had reached
    retired: tuple[int, ...]  # versions retired at the end
    seconds: float


@dataclass(frozen=True)
class ReencryptResult:
    scopes: tuple[ScopeResult, ...]
    legacy_retired: bool  # the legacy single key was retired by this run
    seconds: float

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.scopes)

    @property
    def rows_by_table(self) -> dict[str, int]:
        return {s.table: s.rows for s in self.scopes}

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def _scopes(scope: str | None) -> list[str]:
    known = [f"postgres/{t}" for t in db.ENCRYPTED_COLUMNS]
    if scope is None:
        return known
    if scope not in known:
        raise ReencryptError(f"scope {scope!r}: the OLTP's encrypted tables are {', '.join(known)}")
    return [scope]


def _superuser(conn: psycopg.Connection) -> None:
    if not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
        raise ReencryptError(
            "re-encryption rewrites ciphertexts with triggers deferred (UpdatedAt unchanged) and "
            "needs the platform's superuser connection"
        )


class _Job:
    """The rewrite of one table to ``target``, on a keyed session holding every usable version."""

    def __init__(self, conn: psycopg.Connection, scope: str, target: int) -> None:
        self.conn, self.scope, self.target = conn, scope, target
        self.table = scope.split("/", 1)[1]
        self.columns = db.ENCRYPTED_COLUMNS[self.table]
        # Stale: the ciphertext names an older version (or is legacy). The cheap prefix test
        # first, the header parse only for the others (a newer version is left alone).
        per = {
            c: sql.SQL(
                "({c} IS NOT NULL AND substr({c}, 1, length(%(prefix)s)) <> %(prefix)s "
                "AND pii_key_version({c}) < %(target)s)"
            ).format(c=sql.Identifier(c))
            for c in self.columns
        }
        self.stale = sql.SQL(" OR ").join(per.values())
        sets = [
            sql.SQL(
                "{c} = CASE WHEN {s} THEN pii_encrypt(pii_decrypt({c}), %(scope)s) ELSE {c} END"
            ).format(c=sql.Identifier(c), s=per[c])
            for c in self.columns
        ]
        if self.table == "customer":  # the lookup hash follows the e-mail (its trigger is off)
            sets.append(
                sql.SQL(
                    "emailhash = CASE WHEN {s} THEN pii_lookup_hash(pii_decrypt(email)) "
                    "ELSE emailhash END"
                ).format(s=per["email"])
            )
        t = sql.Identifier(self.table)
        self.update = sql.SQL(
            "WITH batch AS (SELECT id FROM {t} WHERE id > %(after)s AND ({stale}) "
            "ORDER BY id LIMIT %(n)s FOR UPDATE) "
            "UPDATE {t} SET {sets} FROM batch WHERE {t}.id = batch.id RETURNING {t}.id"
        ).format(t=t, stale=self.stale, sets=sql.SQL(", ").join(sets))
        self.counting = sql.SQL("SELECT count(*) FROM {t} WHERE id > %(after)s AND ({stale})")
        self.counting = self.counting.format(t=t, stale=self.stale)
        self.params = {
            "prefix": f"SPK1{scope}:{target}:".encode(),
            "target": target,
            "scope": scope,
        }

    def left(self, after: int = -1) -> int:
        return self.conn.execute(self.counting, self.params | {"after": after}).fetchone()[0]

    def batch(self, after: int, n: int) -> list[int]:
        """Rewrite up to n stale rows after ``after`` and record it, in the caller's transaction."""
        self.conn.execute("SET LOCAL session_replication_role = replica")
        try:
            with self.conn.transaction():  # a savepoint: the message below needs the connection
                ids = [
                    i
                    for (i,) in self.conn.execute(
                        self.update, self.params | {"after": after, "n": n}
                    ).fetchall()
                ]
        except psycopg.Error as exc:
            raise ReencryptError(
                f"re-encrypting {self.table} after id {after} under {self.scope} v{self.target} "
                f"failed and that batch was rolled back ({self._bad_row(after, n)}): "
                f"{exc.diag.message_primary or exc}"
            ) from exc
        if ids:
            self.conn.execute(
                "UPDATE keys.column_reencryption SET last_id = %s, "
                "rows_rewritten = rows_rewritten + %s, batches = batches + 1, "
                "updated_at = clock_timestamp() WHERE scope = %s AND target_version = %s",
                (max(ids), len(ids), self.scope, self.target),
            )
        return ids

    def run(self, after: int, batch_rows: int, progress: Progress) -> tuple[int, int]:
        """Rewrite every stale row after ``after``, a committed batch at a time; (rows, batches)."""
        total = self.left(after)
        rows = batches = 0
        while True:
            with self.conn.transaction():
                ids = self.batch(after, batch_rows)
            if not ids:
                return rows, batches
            rows, batches, after = rows + len(ids), batches + 1, max(ids)
            progress(self.table, len(ids), total)

    def _bad_row(self, after: int, n: int) -> str:
        """The first row of the failed batch whose ciphertext does not decrypt."""
        t = sql.Identifier(self.table)
        for (row_id,) in self.conn.execute(
            sql.SQL("SELECT id FROM {} WHERE id > %s ORDER BY id LIMIT %s").format(t), (after, n)
        ).fetchall():
            for c in self.columns:
                try:
                    with self.conn.transaction():
                        self.conn.execute(
                            sql.SQL("SELECT pii_decrypt({}) FROM {} WHERE id = %s").format(
                                sql.Identifier(c), t
                            ),
                            (row_id,),
                        )
                except psycopg.Error as exc:
                    return f"{self.table}.{c} of id {row_id}: {exc.diag.message_primary}"
        return "no single row fails on its own"


def _audit(
    conn: psycopg.Connection,
    actor: str,
    operation: str,
    scope: str,
    version: int | None,
    detail: dict,
) -> None:
    conn.execute(
        "INSERT INTO keys.key_event (actor, operation, scope, version, outcome, detail) "
        "VALUES (%s, %s, %s, %s, 'ok', %s)",
        (actor, operation, scope, version, Jsonb(detail)),
    )


def _reencrypt_scope(
    conn: psycopg.Connection, envelope: Envelope, scope: str, batch_rows: int, progress: Progress
) -> ScopeResult:
    started = time.perf_counter()
    (target,) = conn.execute("SELECT pii_current_version(%s)", (scope,)).fetchone()
    conn.execute(
        "INSERT INTO keys.column_reencryption (scope, target_version) VALUES (%s, %s) "
        "ON CONFLICT DO NOTHING",
        (scope, target),
    )
    last_id, finished = conn.execute(
        "SELECT last_id, finished_at IS NOT NULL FROM keys.column_reencryption "
        "WHERE scope = %s AND target_version = %s",
        (scope, target),
    ).fetchone()
    job = _Job(conn, scope, target)
    rows, batches = job.run(-1 if last_id is None else last_id, batch_rows, progress)
    old = [k.version for k in envelope.all_versions(scope) if k.version < target]
    while True:
        # Writers hold the shared side of the scope's lock until they commit: this waits for those
        # in flight, and none starts writing an old version until the retirement is committed.
        # What sessions opened before the rotation wrote meanwhile is rewritten under the lock when
        # it is no more than a batch (they could otherwise keep adding to it), and committed
        # before the retirement.
        conn.execute("SELECT pg_advisory_lock(pii_key_lock_id(%s))", (scope,))
        try:
            with conn.transaction():
                left = job.left()
                if left <= batch_rows:
                    ids = job.batch(-1, batch_rows)
                    rows, batches = rows + len(ids), batches + (1 if ids else 0)
            if left <= batch_rows:
                for version in old:
                    envelope.retire(scope, version)
                break
        finally:
            conn.execute("SELECT pg_advisory_unlock(pii_key_lock_id(%s))", (scope,))
        more, more_batches = job.run(-1, batch_rows, progress)
        rows, batches = rows + more, batches + more_batches
    seconds = time.perf_counter() - started
    with conn.transaction():
        conn.execute(
            "UPDATE keys.column_reencryption SET finished_at = clock_timestamp() "
            "WHERE scope = %s AND target_version = %s AND finished_at IS NULL",
            (scope, target),
        )
        _audit(
            conn,
            envelope.actor,
            "reencrypt",
            scope,
            target,
            {"rows": rows, "batches": batches, "retired": old, "seconds": round(seconds, 3)},
        )
    resumed = None if finished else last_id
    return ScopeResult(scope, job.table, target, rows, batches, resumed, tuple(old), seconds)


def _retire_legacy(conn: psycopg.Connection, actor: str) -> bool:
    """Stop handing the legacy key to sessions once no table holds a legacy ciphertext."""
    if (
        not conn.execute("SELECT current_setting('stripe.pii_key', true)").fetchone()[0]
        or conn.execute("SELECT EXISTS (SELECT FROM keys.legacy_key_retired)").fetchone()[0]
    ):
        return False
    for table, columns in db.ENCRYPTED_COLUMNS.items():
        legacy = sql.SQL(" OR ").join(
            sql.SQL("({c} IS NOT NULL AND substr({c}, 1, 4) <> 'SPK1'::bytea)").format(
                c=sql.Identifier(c)
            )
            for c in columns
        )
        query = sql.SQL("SELECT EXISTS (SELECT FROM {} WHERE {})").format(
            sql.Identifier(table), legacy
        )
        if conn.execute(query).fetchone()[0]:
            return False
    with conn.transaction():
        conn.execute("INSERT INTO keys.legacy_key_retired (actor) VALUES (%s)", (actor,))
        _audit(conn, actor, "retire", "postgres/legacy", None, {"key": "legacy single PII key"})
    return True


def reencrypt(
    settings: Settings,
    *,
    scope: str | None = None,
    batch_rows: int = 5000,
    progress: Progress | None = None,
) -> ReencryptResult:
    """Re-encrypt every ciphertext of ``scope`` (every postgres/<table> scope when None) under an
    older data-key version (or the legacy key) to the current version, then retire the older
    versions; with every scope done, the legacy key too. Resumable; see the module docstring."""
    if batch_rows < 1:
        raise ReencryptError(f"batch_rows {batch_rows}: expected at least 1")
    scopes = _scopes(scope)
    started = time.perf_counter()
    envelope = shared_envelope(settings)
    results = []
    with db.connect(settings, autocommit=True) as conn:
        _superuser(conn)
        for s in scopes:
            results.append(
                _reencrypt_scope(conn, envelope, s, batch_rows, progress or (lambda *a: None))
            )
        legacy = _retire_legacy(conn, envelope.actor)
    return ReencryptResult(tuple(results), legacy, time.perf_counter() - started)
