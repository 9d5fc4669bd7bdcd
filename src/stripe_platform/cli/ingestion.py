"""Ingestion: `sync` (the embedded engine, or Airbyte on prod) and `airbyte` plan/apply."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from stripe_platform.cli.common import command, console, err, group, settings
from stripe_platform.config import Settings

if TYPE_CHECKING:  # the catalog is imported by the commands that read it
    from stripe_platform.ingestion.catalog import ResolvedConnection

commands = typer.Typer()  # merged into the top level
airbyte_app = group("Airbyte connections as code (airbyte/): plan and apply.")


@command(commands)
def sync(
    connection: Annotated[str, typer.Argument(help="A connection of airbyte/connections.yaml")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON report on stdout")] = False,
    follow: Annotated[
        bool,
        typer.Option("--follow", help="Embedded engine: keep streaming changes (CDC) until Ctrl-C"),
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.05, help="With --follow: seconds between reads of the slot")
    ] = 0.2,
) -> None:
    """Run a connection: through Airbyte on prod, with the embedded engine elsewhere."""
    from stripe_platform.ingestion.catalog import load_catalog

    s = settings()
    catalog = load_catalog()
    if s.ingestion_backend == "airbyte":
        from stripe_platform.ingestion.airbyte import connect_from_env, trigger_sync

        job = trigger_sync(
            connect_from_env(catalog),
            connection,
            on_progress=lambda j: err.print(
                f"job {j.job_id}: {j.status.value if j.status else '?'} rows {j.rows_synced or 0}"
            ),
        )
        result = {
            "connection": connection,
            "job_id": job.job_id,
            "status": str(job.status),
            "rows": job.rows_synced,
            "bytes": job.bytes_synced,
        }
        console.print_json(data=result) if as_json else console.print(result)
        return
    # A lake that cannot be reached or written fails with the variable that names it: the lake
    # writer raises LakeUnreachable (a PlatformError) where its filesystem refuses.
    _sync_embedded(s, catalog.resolve(connection), as_json, follow, interval)


def _sync_embedded(
    s: Settings, connection: ResolvedConnection, as_json: bool, follow: bool, interval: float
) -> None:
    from rich.progress import Progress, TextColumn

    from stripe_platform.ingestion.engine import open_writer, run_sync

    if follow:
        import threading

        from stripe_platform.ingestion.engine import follow as follow_changes

        stop = threading.Event()
        err.print(f"{connection.name}: following changes every {interval}s; Ctrl-C stops cleanly")
        try:
            report = follow_changes(
                s,
                connection,
                stop,
                interval,
                progress=lambda stream, rows: err.print(f"{stream:<28} +{rows:,}"),
            )
        except KeyboardInterrupt:  # the batch in flight is re-delivered by the next run
            stop.set()
            return
        console.print_json(data=report.as_dict()) if as_json else console.print(
            f"{report.connection}: {report.rows:,} rows"
        )
        return

    started = time.monotonic()
    with Progress(
        TextColumn("{task.description}", markup=False), console=err, disable=as_json
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stream: str, rows: int) -> None:
            if stream not in tasks:
                tasks[stream] = bar.add_task(stream, total=None, rows=0)
            task = bar.tasks[tasks[stream]]
            done = task.fields["rows"] + rows
            rate = done / max(time.monotonic() - started, 1e-6)
            bar.update(
                tasks[stream],
                rows=done,
                description=f"{stream:<28} {done:>10,} rows {rate:>10,.0f}/s",
            )

        report = run_sync(s, connection, open_writer(s, connection), progress)
    for stream in report.streams.values():  # on stderr: stdout stays the JSON report
        for warning in stream.warnings:
            err.print(
                f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True
            )
    if as_json:
        console.print_json(data=report.as_dict())
        return
    console.print(
        f"{report.connection}: {report.phase}, {report.rows:,} rows in {report.seconds:.1f}s "
        f"(sync {report.sync_id})"
    )
    for name, stream in report.streams.items():
        extra = f"  nulled {stream.nulled}" if stream.nulled else ""
        extra += f"  new columns {stream.added_columns}" if stream.added_columns else ""
        extra += (
            f"  dropped at the source (kept, NULL from now on) {stream.dropped_columns}"
            if stream.dropped_columns
            else ""
        )
        console.print(f"  {name:<28} {stream.rows:>10,}{extra}")


@command(airbyte_app, "plan")
def airbyte_plan() -> None:
    """Show what `airbyte apply` would create or update in the Airbyte workspace."""
    from stripe_platform.ingestion import airbyte
    from stripe_platform.ingestion.catalog import load_catalog

    catalog = load_catalog()
    console.print(airbyte.plan(airbyte.connect_from_env(catalog), catalog).render())


@command(airbyte_app, "apply")
def airbyte_apply(
    yes: Annotated[bool, typer.Option("--yes", help="Apply without asking")] = False,
) -> None:
    """Create or update sources, destinations and connections, matched by name (idempotent)."""
    from stripe_platform.ingestion import airbyte
    from stripe_platform.ingestion.catalog import load_catalog

    catalog = load_catalog()
    client = airbyte.connect_from_env(catalog)
    plan = airbyte.plan(client, catalog)
    console.print(plan.render())
    if not plan.pending:
        return
    if not yes and not typer.confirm("apply these changes?"):
        raise typer.Exit(1)
    applied = airbyte.apply(client, plan)
    console.print(f"applied: { {k: len(v) for k, v in applied.items()} }")
