"""The main job on the embedded profile: runtime up, schema and collections applied, the sample
loaded, then the brief's OLTP statements and document queries run and printed."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from stripe_platform import sample
from stripe_platform.config import Settings
from stripe_platform.docstore import client as docstore
from stripe_platform.docstore.queries import load_queries, run_query
from stripe_platform.docstore.specs import apply_specs
from stripe_platform.oltp import db, partitions
from stripe_platform.oltp.migrate import migrate
from stripe_platform.oltp.status import StatusChangeError, change_status
from stripe_platform.paths import SQL_EXAMPLES_DIR


def table(title: str, columns: list[str], rows: list[Any]) -> Table:
    out = Table(title=title, title_justify="left", title_style="bold")
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*("" if v is None else str(v) for v in row))
    return out


def run_brief_acid_example(conn: psycopg.Connection) -> None:
    """Run the brief's BEGIN/UPDATE/INSERT/COMMIT block; on any error, ROLLBACK as it says."""
    try:
        conn.execute((SQL_EXAMPLES_DIR / "acid_status_change.sql").read_text())
    except psycopg.Error:
        conn.execute("ROLLBACK")
        raise


def audit_log_tail(log_dir: Path, n: int = 3) -> list[dict[str, Any]]:
    files = sorted(log_dir.glob("*.json"))
    if not files:
        return []
    lines = files[-1].read_text().splitlines()[-n:]
    return [json.loads(line) for line in lines]


def run(settings: Settings, console: Console) -> None:
    started = time.monotonic()

    def step(message: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {message}")

    if settings.profile == "embedded":
        step("starting the embedded PostgreSQL cluster")
        status = db.embedded_cluster(settings).up()
        step(f"PostgreSQL {status.version} on 127.0.0.1:{status.port} (data {status.datadir})")

    with db.connect(settings, autocommit=True) as conn:
        applied = migrate(conn, on_apply=lambda m: step(f"applying {m.path.name}"))
        step(f"schema up to date ({len(applied)} migration(s) applied now)")
        report = partitions.maintain(
            conn,
            today=dt.date.today(),
            months_ahead=settings.partition_months_ahead,
            retention_months=settings.partition_retention_months,
        )
        step(
            f"Transaction partitions: {len(report.created)} created, {len(report.archived)} archived"
        )
        count = sample.load_oltp(conn)
        step(f"sample loaded: {count} transactions")

        console.rule("[bold]The brief's OLTP statements")
        row = conn.execute(
            "SELECT TransactionStatusID FROM Transaction WHERE ID = 12345"
        ).fetchone()
        if row and row[0] == 1:
            run_brief_acid_example(conn)
            console.print("ACID example (sql/examples/acid_status_change.sql): committed")
        else:
            console.print("ACID example: transaction 12345 was refunded by an earlier run")
        trail = conn.execute(
            """SELECT c.ID, c.TransactionID, f.Name, t.Name, c.Reason, c.UpdatedBy, c.UpdatedAt
               FROM TransactionStateChanges c
               LEFT JOIN TransactionStatus f ON f.ID = c.FromStatusID
               JOIN TransactionStatus t ON t.ID = c.ToStatusID
               WHERE c.TransactionID = 12345 ORDER BY c.ID"""
        ).fetchall()
        console.print(
            table(
                "TransactionStateChanges for transaction 12345",
                ["id", "transaction", "from", "to", "reason", "by", "at"],
                trail,
            )
        )
        try:
            change_status(conn, 12345, "pending", reason="demo", updated_by="demo")
        except StatusChangeError as exc:
            console.print(
                f"refunded -> pending is refused, nothing written: [yellow]{exc}[/yellow]"
            )

        good = conn.execute((SQL_EXAMPLES_DIR / "password_check.sql").read_text()).fetchall()
        bad = conn.execute(
            "SELECT UserName, (Password = crypt('not-the-password', Password)) FROM Customer "
            "WHERE UserName = 'John42'"
        ).fetchall()
        console.print(
            table(
                "Password check (crypt/gen_salt('bf'))",
                ["user", "IsGoodPassword"],
                [*good, *[(u, f"{ok} (wrong password)") for u, ok in bad]],
            )
        )
        john = conn.execute(
            """SELECT UserName, encode(substr(Email, 1, 12), 'hex') || '…', pii_decrypt(FullName)
               FROM Customer WHERE EmailHash = pii_lookup_hash('john.doe@stripe.com')"""
        ).fetchall()
        console.print(
            table(
                "Customer found by email (keyed hash); Email stored encrypted",
                ["user", "Email (ciphertext)", "FullName (decrypted)"],
                john,
            )
        )

        roles = conn.execute(
            """SELECT r, has_column_privilege(r, 'transaction', 'amount', 'SELECT'),
                      has_column_privilege(r, 'transaction', 'ipaddress', 'SELECT'),
                      has_any_column_privilege(r, 'transaction', 'INSERT'),
                      has_column_privilege(r, 'customer', 'password', 'SELECT'),
                      has_column_privilege(r, 'customer', 'email', 'SELECT')
               FROM unnest(ARRAY['admin', 'developer', 'readonlyuser']) AS r"""
        ).fetchall()
        console.print(
            table(
                "RBAC (least privilege: no PII/PCI/secret columns below admin)",
                [
                    "role",
                    "read Transaction.Amount",
                    "read Transaction.IPAddress (PII)",
                    "write Transaction",
                    "read Customer.Password",
                    "read Customer.Email (PII)",
                ],
                roles,
            )
        )
        audit = conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('log_connections', "
            "'log_disconnections', 'log_statement', 'log_destination', 'wal_level', 'ssl') "
            "ORDER BY name"
        ).fetchall()
        console.print(table("Audit and runtime settings", ["setting", "value"], audit))
        counts = [(n, c) for n, c in partitions.row_counts(conn) if c]
        console.print(
            table("Transaction rows per partition (non-empty)", ["partition", "rows"], counts)
        )

    documents = docstore.connect(settings)
    apply_specs(documents)
    loaded = sample.load_documents(documents)
    step(
        "document collections applied, sample loaded: "
        + ", ".join(f"{k} {v}" for k, v in loaded.items())
    )
    console.rule("[bold]The brief's document queries")
    for query in load_queries().values():
        results = run_query(documents, query)
        console.print(f"[bold]{query.description}[/bold]\n[cyan]{query.shell}[/cyan]")
        if query.aggregate is not None:
            console.print(table("", ["os", "sessions"], [(r["_id"], r["count"]) for r in results]))
        else:
            for doc in results:
                console.print_json(data=json.loads(json.dumps(doc, default=str)))
        console.print(f"{len(results)} document(s)\n")

    if settings.profile == "embedded":
        log_dir = db.embedded_cluster(settings).status().audit_log_dir
        console.print(f"Audit log (jsonlog): {log_dir}")
        for entry in audit_log_tail(log_dir, 1):
            console.print_json(data=entry)
    step("done. Next: `stripe-platform psql`, `stripe-platform status`, `stripe-platform down`")
