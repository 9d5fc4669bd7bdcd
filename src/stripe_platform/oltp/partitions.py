"""Monthly partitions of Transaction: create ahead, retire past the retention window.

Partitions are named ``transaction_yYYYYmMM`` and cover [first day of month, first day of next
month) in UTC. Creating a month that already has rows in the default partition moves those rows in
the same transaction, so nothing is ever lost or duplicated.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

PARTITION_NAME = re.compile(r"^transaction_y(\d{4})m(\d{2})$")


def month_start(day: dt.date) -> dt.date:
    return day.replace(day=1)


def add_months(month: dt.date, n: int) -> dt.date:
    index = month.year * 12 + month.month - 1 + n
    return dt.date(index // 12, index % 12 + 1, 1)


def partition_name(month: dt.date) -> str:
    return f"transaction_y{month.year:04d}m{month.month:02d}"


def _bounds(month: dt.date) -> tuple[dt.datetime, dt.datetime]:
    lo = dt.datetime.combine(month, dt.time(), tzinfo=dt.UTC)
    hi = dt.datetime.combine(add_months(month, 1), dt.time(), tzinfo=dt.UTC)
    return lo, hi


def existing_partitions(conn: psycopg.Connection) -> dict[dt.date, str]:
    rows = conn.execute(
        """SELECT c.relname FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'public.transaction'::regclass"""
    ).fetchall()
    months = {}
    for (name,) in rows:
        match = PARTITION_NAME.match(name)
        if match:
            months[dt.date(int(match[1]), int(match[2]), 1)] = name
    return months


@dataclass
class PartitionReport:
    created: list[str] = field(default_factory=list)
    moved_rows: dict[str, int] = field(default_factory=dict)
    archived: list[str] = field(default_factory=list)


def create_month(conn: psycopg.Connection, month: dt.date) -> int:
    """Create one monthly partition (inside the caller's transaction); return rows moved into it."""
    name = partition_name(month)
    lo, hi = _bounds(month)
    create = sql.SQL(
        "CREATE TABLE {} PARTITION OF transaction FOR VALUES FROM ({}) TO ({})"
    ).format(sql.Identifier(name), sql.Literal(lo), sql.Literal(hi))
    stranded = conn.execute(
        "SELECT count(*) FROM transaction_default WHERE datetime >= %s AND datetime < %s", (lo, hi)
    ).fetchone()[0]
    if not stranded:
        conn.execute(create)
        return 0
    # The default partition may not hold rows of a range that gets its own partition: take it
    # out, create the month, move its rows through the parent (routing), put it back.
    conn.execute("ALTER TABLE transaction DETACH PARTITION transaction_default")
    conn.execute(create)
    conn.execute(
        """WITH moved AS (
               DELETE FROM transaction_default WHERE datetime >= %s AND datetime < %s RETURNING *)
           INSERT INTO transaction OVERRIDING SYSTEM VALUE SELECT * FROM moved""",
        (lo, hi),
    )
    conn.execute("ALTER TABLE transaction ATTACH PARTITION transaction_default DEFAULT")
    return stranded


def maintain(
    conn: psycopg.Connection,
    *,
    today: dt.date,
    months_ahead: int,
    retention_months: int,
    start: dt.date | None = None,
    archive: bool = True,
) -> PartitionReport:
    """Ensure a partition for every month from ``start`` (default: the retention window's first
    month) to ``months_ahead`` after today; detach to the ``archive`` schema those past retention."""
    report = PartitionReport()
    current = month_start(today)
    first_kept = add_months(current, -(retention_months - 1))
    month = max(month_start(start), first_kept) if start else first_kept
    last = add_months(current, months_ahead)
    with conn.transaction():
        conn.execute("LOCK TABLE transaction IN SHARE ROW EXCLUSIVE MODE")
        have = existing_partitions(conn)
        while month <= last:
            if month not in have:
                moved = create_month(conn, month)
                report.created.append(partition_name(month))
                if moved:
                    report.moved_rows[partition_name(month)] = moved
            month = add_months(month, 1)
        if archive:
            for old_month, name in sorted(have.items()):
                if old_month < first_kept:
                    conn.execute(
                        sql.SQL("ALTER TABLE transaction DETACH PARTITION {}").format(
                            sql.Identifier(name)
                        )
                    )
                    conn.execute(
                        sql.SQL("ALTER TABLE {} SET SCHEMA archive").format(sql.Identifier(name))
                    )
                    _restrict_archived(conn, name)
                    report.archived.append(f"archive.{name}")
        conn.execute("SELECT apply_column_privileges()")
    return report


def _restrict_archived(conn: psycopg.Connection, name: str) -> None:
    """An archived partition keeps the privileges it had in ``public``: take them from every role
    the access policy does not let into ``archive`` (no USAGE on the schema; PUBLIC included), so
    archiving never leaves drift for `access plan` (docs/access.md)."""
    grantees = conn.execute(
        """WITH acl AS (  -- the table's privileges and its columns' (the narrowing's)
               SELECT c.relowner, (aclexplode(c.relacl)).grantee FROM pg_class c WHERE c.oid = %(t)s::regclass
               UNION
               SELECT c.relowner, (aclexplode(a.attacl)).grantee
               FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid WHERE c.oid = %(t)s::regclass)
           SELECT DISTINCT CASE WHEN grantee = 0 THEN 'PUBLIC'
                                ELSE (SELECT rolname FROM pg_roles WHERE oid = grantee) END
           FROM acl
           WHERE grantee <> relowner
             AND (grantee = 0 OR NOT has_schema_privilege(grantee, 'archive', 'USAGE'))""",
        {"t": f"archive.{name}"},
    ).fetchall()
    for (grantee,) in grantees:
        conn.execute(
            sql.SQL("REVOKE ALL ON {}.{} FROM {}").format(
                sql.Identifier("archive"),
                sql.Identifier(name),
                sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.Identifier(grantee),
            )
        )


def row_counts(conn: psycopg.Connection) -> list[tuple[str, int]]:
    """Rows per partition of Transaction, in partition order (default last)."""
    rows = conn.execute(
        """SELECT tableoid::regclass::text, count(*) FROM transaction GROUP BY 1"""
    ).fetchall()
    counts = dict(rows)
    names = [*sorted(existing_partitions(conn).values()), "transaction_default"]
    return [(n, counts.get(n, 0)) for n in names]
