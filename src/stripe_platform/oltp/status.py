"""Transaction status changes: the brief's ACID example as one service call."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row

from stripe_platform.errors import PlatformError


class StatusChangeError(PlatformError, ValueError):
    """The change was refused; nothing was written."""


@dataclass(frozen=True)
class StateChange:
    id: int
    transaction_id: int
    from_status: str | None
    to_status: str
    reason: str | None
    updated_by: str


def status_id(conn: psycopg.Connection, status: str | int) -> int:
    if isinstance(status, int):
        return status
    row = conn.execute("SELECT ID FROM TransactionStatus WHERE Name = %s", (status,)).fetchone()
    if row is None:
        names = [r[0] for r in conn.execute("SELECT Name FROM TransactionStatus ORDER BY ID")]
        raise StatusChangeError(f"unknown status {status!r}; known: {', '.join(names)}")
    return row[0]


def change_status(
    conn: psycopg.Connection,
    transaction_id: int,
    to_status: str | int,
    *,
    reason: str,
    updated_by: str,
) -> StateChange:
    """Move a transaction to a new status and record it, atomically (SQL change_transaction_status)."""
    try:
        with conn.transaction():
            target = status_id(conn, to_status)
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(
                """SELECT c.id, c.transactionid, f.name AS from_status, t.name AS to_status,
                          c.reason, c.updatedby
                   FROM change_transaction_status(%s, %s::smallint, %s, %s) c
                   LEFT JOIN TransactionStatus f ON f.ID = c.fromstatusid
                   JOIN TransactionStatus t ON t.ID = c.tostatusid""",
                (transaction_id, target, reason, updated_by),
            ).fetchone()
    except (psycopg.errors.CheckViolation, psycopg.errors.NoDataFound) as exc:
        hint = f" ({exc.diag.message_hint})" if exc.diag.message_hint else ""
        raise StatusChangeError(f"{exc.diag.message_primary}{hint}") from None
    assert row is not None
    return StateChange(
        id=row["id"],
        transaction_id=row["transactionid"],
        from_status=row["from_status"],
        to_status=row["to_status"],
        reason=row["reason"],
        updated_by=row["updatedby"],
    )
