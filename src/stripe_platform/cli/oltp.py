"""`db`: the OLTP database: migrations, partitions, status changes, access."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer
from rich.markup import escape

from stripe_platform.cli.common import command, console, group, settings

db_app = group("The OLTP database: migrations, partitions, status changes, access.")


@command(db_app, "migrate")
def db_migrate() -> None:
    """Apply pending sql/oltp migrations (each atomically; re-running is a no-op)."""
    from stripe_platform.oltp import db
    from stripe_platform.oltp.migrate import migrate

    with db.connect(settings(), autocommit=True) as conn:
        applied = migrate(conn, on_apply=lambda m: console.print(f"applying {m.path.name}"))
    console.print(f"{len(applied)} migration(s) applied; schema up to date")


@command(db_app, "partitions")
def db_partitions(
    start: Annotated[str | None, typer.Option(help="First month to cover, YYYY-MM")] = None,
    archive: Annotated[bool, typer.Option(help="Detach months past retention")] = True,
) -> None:
    """Create monthly Transaction partitions ahead and archive those past retention."""
    from stripe_platform.oltp import db, partitions

    s = settings()
    first = None
    if start:
        try:
            first = dt.datetime.strptime(start, "%Y-%m").date()
        except ValueError:
            raise typer.BadParameter(f"--start {start!r}: expected YYYY-MM") from None
    with db.connect(s, autocommit=True) as conn:
        report = partitions.maintain(
            conn,
            today=dt.date.today(),
            months_ahead=s.partition_months_ahead,
            retention_months=s.partition_retention_months,
            start=first,
            archive=archive,
        )
        for name in report.created:
            moved = report.moved_rows.get(name)
            console.print(
                f"created {name}" + (f" (moved {moved} rows from default)" if moved else "")
            )
        for name in report.archived:
            console.print(f"archived {name}")
        total = len(partitions.existing_partitions(conn))
    console.print(f"{total} monthly partitions attached (+ default)")


@command(db_app, "status-change")
def db_status_change(
    transaction_id: int,
    to_status: Annotated[str, typer.Argument(help="Target status name, e.g. refunded")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit trail)")],
    by: Annotated[str, typer.Option(help="Who asks for it")],
) -> None:
    """Change a transaction's status atomically, with its audit row."""
    from stripe_platform.oltp import db
    from stripe_platform.oltp.status import change_status

    with db.connect(settings()) as conn:
        change = change_status(conn, transaction_id, to_status, reason=reason, updated_by=by)
    console.print(
        f"transaction {change.transaction_id}: {change.from_status} -> {change.to_status} "
        f"(state change {change.id})"
    )


@command(db_app, "grant-temporary")
def db_grant_temporary(
    user: str,
    role: Annotated[str, typer.Option(help="developer or readonlyuser")] = "readonlyuser",
    days: Annotated[int, typer.Option(help="Validity in days")] = 30,
) -> None:
    """Create a login for a contractor that expires after --days (VALID UNTIL).

    A quick grant outside the access policy: `access plan` leaves it alone (and notes it),
    `access expired` lists it once its validity passed, `access revoke-expired` (or `db
    revoke-expired`) drops it. Access that is reviewed and provisioned everywhere (warehouse, API)
    is a user with `until` in access/policy.yaml."""
    from stripe_platform.oltp import db
    from stripe_platform.oltp.access import grant_temporary

    with db.connect(settings(), autocommit=True) as conn:
        grant, password = grant_temporary(conn, user, role, days=days)
    console.print(f"{grant.user} ({grant.role}) valid until {grant.valid_until:%Y-%m-%d %H:%M} UTC")
    console.print(f"password (shown once): {password}")


@command(db_app, "grants")
def db_grants() -> None:
    """List time-limited logins and whether they have expired."""
    from stripe_platform.oltp import db
    from stripe_platform.oltp.access import list_temporary

    with db.connect(settings(), autocommit=True) as conn:
        grants = list_temporary(conn)
    for g in grants:
        state = "[red]expired[/red]" if g.expired else "[green]active[/green]"
        console.print(
            f"{escape(g.user):<24} {escape(g.role):<14} until {g.valid_until}  {state}", markup=True
        )
    if not grants:
        console.print("no temporary access granted")


@command(db_app, "revoke-expired")
def db_revoke_expired() -> None:
    """Drop the temporary logins whose validity has passed."""
    from stripe_platform.oltp import db
    from stripe_platform.oltp.access import revoke_expired

    with db.connect(settings(), autocommit=True) as conn:
        dropped = revoke_expired(conn)
    console.print(f"revoked: {', '.join(dropped)}" if dropped else "nothing expired")
