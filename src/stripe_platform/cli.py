"""`stripe-platform`: the command line of the platform."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console
from rich.markup import escape

from stripe_platform.config import ENV_PREFIX, LAKE_FORMS, Settings, SettingsError, get_settings
from stripe_platform.docstore.queries import QueryError
from stripe_platform.errors import PlatformError
from stripe_platform.runtime.postgres import RuntimeErrorWithHint
from stripe_platform.seed.spec import SeedError

# Markup is off unless a call asks for it: text from users, the database or a validation rule
# ("^[a-z_][a-z0-9_]*$") would otherwise lose every "[...]" that looks like a style tag. A call
# that styles passes markup=True and escapes what it interpolates. Soft wrap: a long line (a path,
# a rule) is left for the terminal to wrap, never broken by a newline.
console = Console(markup=False, soft_wrap=True)
err = Console(stderr=True, markup=False, soft_wrap=True)

app = typer.Typer(help="Open data platform for payments.", no_args_is_help=True)
db_app = typer.Typer(
    help="The OLTP database: migrations, partitions, status changes, access.", no_args_is_help=True
)
airbyte_app = typer.Typer(
    help="Airbyte connections as code (airbyte/): plan and apply.", no_args_is_help=True
)
mongo_app = typer.Typer(
    help="The document store: collection specs and the brief's queries.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(mongo_app, name="mongo")
app.add_typer(airbyte_app, name="airbyte")

# Every expected failure of the platform is a PlatformError (errors.py). The one exception from a
# library is psycopg's OperationalError (a server refused, unreachable or gone away): any statement
# of any module can raise it, not only the connect of oltp/db.py, so translating it at one place
# would still leave the others.
EXPECTED_ERRORS = (PlatformError, psycopg.OperationalError)


def command(group: typer.Typer, name: str | None = None) -> Callable:
    """Register a command whose expected failures print one clear line and exit 1."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except EXPECTED_ERRORS as exc:
                err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True)
                raise typer.Exit(1) from None

        return group.command(name)(wrapper)

    return decorate


def settings() -> Settings:
    return get_settings()


def require_embedded(s: Settings) -> None:
    if s.profile != "embedded":
        raise RuntimeErrorWithHint(
            f"the profile is {s.profile!r}: its PostgreSQL is managed outside the platform "
            "(STRIPE_PLATFORM_PG_DSN); `up`/`down` only manage the embedded cluster"
        )


# -- runtime ---------------------------------------------------------------------------------------
@command(app)
def up() -> None:
    """Start the embedded runtime (PostgreSQL cluster; the document stand-in needs no process)."""
    from stripe_platform.oltp.db import embedded_cluster

    s = settings()
    require_embedded(s)
    with console.status("starting PostgreSQL"):
        status = embedded_cluster(s).up()
    console.print(
        f"PostgreSQL {status.version} running on 127.0.0.1:{status.port} "
        f"(pid {status.pid}, data {status.datadir})"
    )


@command(app)
def down() -> None:
    """Stop the embedded PostgreSQL cluster (data is kept)."""
    from stripe_platform.oltp.db import embedded_cluster

    s = settings()
    require_embedded(s)
    stopped = embedded_cluster(s).down()
    console.print("PostgreSQL stopped" if stopped else "PostgreSQL was not running")


@command(app)
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Say what runs where."""
    from stripe_platform.oltp.db import embedded_cluster

    s = settings()
    info: dict[str, Any] = {
        "profile": s.profile,
        "home": str(s.home_dir),
        "home_from": s.home_origin,
    }
    if s.profile == "embedded":
        info["postgres"] = embedded_cluster(s).status().as_dict()
    else:
        info["postgres"] = {"dsn": "STRIPE_PLATFORM_PG_DSN (set)"}
    info["documents"] = (
        {"backend": "mongodb", "database": s.mongodb_database}
        if s.mongodb_uri
        else {"backend": "stand-in (litemongo)", "path": str(s.home_dir / "docstore")}
    )
    info["warehouse"] = {"backend": s.warehouse_backend}
    if s.warehouse_backend == "duckdb":
        info["warehouse"]["path"] = str(s.warehouse_file)
    info["lake"] = {
        "root": s.lake_root,
        "kind": "s3" if s.lake_root.startswith("s3://") else "local directory",
        "from": f"{ENV_PREFIX}LAKE_URI" if s.lake_uri else "default: <home>/lake",
    }
    if as_json:
        console.print_json(data=info)
        return
    pg = info["postgres"]
    console.print(f"profile   {s.profile}")
    console.print(f"home      {s.home_dir}  ({s.home_origin})")
    if s.profile == "embedded":
        state = "[green]running[/green]" if pg["running"] else "[yellow]stopped[/yellow]"
        console.print(
            f"postgres  {state}  127.0.0.1:{pg['port']}  version {pg['version']}  "
            f"data {escape(str(pg['datadir']))}  audit log {escape(str(pg['audit_log_dir']))}",
            markup=True,
        )
    else:
        console.print("postgres  external (STRIPE_PLATFORM_PG_DSN)")
    docs = info["documents"]
    console.print(f"documents {docs['backend']}  {docs.get('path') or docs.get('database')}")
    warehouse = info["warehouse"]
    console.print(f"warehouse {warehouse['backend']}  {warehouse.get('path', '')}".rstrip())
    lake = info["lake"]
    console.print(f"lake      {lake['root']}  ({lake['kind']}; {lake['from']})")


@command(app)
def psql(database: Annotated[str | None, typer.Option(help="Database name")] = None) -> None:
    """Open psql on the OLTP database as the superuser (embedded) or the configured DSN."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from stripe_platform.oltp.db import conninfo

    binary = shutil.which("psql")
    if binary is None:
        raise RuntimeErrorWithHint(
            "psql is not installed (Debian: apt-get install postgresql-client)"
        )
    params = conninfo_to_dict(conninfo(settings(), database=database))
    # Secrets go through the environment: command lines are visible to every user in `ps`.
    env = {
        **os.environ,
        "PGPASSWORD": str(params.pop("password", "")),
        "PGOPTIONS": str(params.pop("options", "")),
    }
    os.execve(binary, [binary, make_conninfo(**params)], env)


@command(app)
def demo(
    scale: Annotated[
        float, typer.Option(min=0.001, max=10, help="Synthetic data size; 1 = 1M payments")
    ] = 0.05,
) -> None:
    """The main job: runtime up, the brief's statements, seed, Airflow runs the ELT DAGs (sync,
    dbt), then the brief's queries answered."""
    from stripe_platform import demo as demo_job

    # The showcase styles its lines (and escapes what it prints from data).
    demo_job.run(settings(), Console(), scale=scale)


@command(app)
def airflow(
    port: Annotated[int, typer.Option(help="Port of the UI and API on 127.0.0.1")] = 8080,
) -> None:
    """Start Airflow on this machine (`airflow standalone`: UI, scheduler, DAG processor,
    triggerer) with the platform's DAGs, until Ctrl-C."""
    from stripe_platform.orchestration.airflow_runtime import run_airflow_standalone
    from stripe_platform.transform.dbt import ensure_manifest

    s = settings()
    ensure_manifest(s)  # what cosmos renders the DAGs from
    err.print(
        f"Airflow on http://127.0.0.1:{port} (user admin; password in "
        f"{s.home_dir / 'airflow' / 'simple_auth_manager_passwords.json.generated'})"
    )
    raise typer.Exit(run_airflow_standalone(s, port=port))


# -- OLTP --------------------------------------------------------------------------------------------
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
    """Create a login for a contractor that expires after --days (VALID UNTIL)."""
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


# -- synthetic data ----------------------------------------------------------------------------------
@command(app)
def seed(
    scale: Annotated[float, typer.Option(help="1 = 1,000,000 transactions")] = 0.05,
    seed: Annotated[int, typer.Option(help="Same seed, same data")] = 42,
    fraud_rate: Annotated[float, typer.Option(help="Planted fraud share, 0.001-0.01")] = 0.005,
    end: Annotated[
        str | None, typer.Option(help="Last day of history (exclusive), YYYY-MM-DD; default today")
    ] = None,
    days: Annotated[int, typer.Option(help="Days of history")] = 730,
    max_documents: Annotated[
        int | None,
        typer.Option(
            help="Cap per large collection (default 25000 on the stand-in, none on MongoDB; 0 = none)"
        ),
    ] = None,
    reset: Annotated[bool, typer.Option(help="Empty both stores first")] = False,
    minutes: Annotated[
        float | None, typer.Option(help="Incremental: append M minutes of activity")
    ] = None,
    tps: Annotated[
        float | None, typer.Option(help="Incremental: N payments/s until stopped")
    ] = None,
    duration: Annotated[float | None, typer.Option(help="With --tps: stop after S seconds")] = None,
) -> None:
    """Generate realistic synthetic data into both stores (or append activity to it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from stripe_platform.docstore.client import connect, is_standin
    from stripe_platform.oltp import db
    from stripe_platform.oltp.migrate import migrate
    from stripe_platform.seed import incremental
    from stripe_platform.seed.dataset import build
    from stripe_platform.seed.load import seed as load_seed
    from stripe_platform.seed.spec import make_spec

    s = settings()
    if minutes is not None or tps is not None:
        docs = connect(s)
        report = incremental.run(
            s,
            docs,
            seed=seed,
            minutes=minutes,
            tps=tps,
            duration=duration,
            on_tick=lambda r: (
                console.print(
                    f"tick {r.ticks}: inserted {r.inserted}, updated {r.updated}, deleted {r.deleted}"
                )
                if tps is not None
                else None
            ),
        )
        console.print(
            f"inserted {report.inserted}\nupdated  {report.updated}\ndeleted  {report.deleted}"
        )
        return
    values: dict[str, Any] = {"scale": scale, "seed": seed, "fraud_rate": fraud_rate, "days": days}
    if end:
        try:
            values["end"] = dt.date.fromisoformat(end)
        except ValueError:
            raise SeedError(f"--end {end!r}: expected YYYY-MM-DD") from None
    if max_documents is not None:
        values["max_documents"] = max_documents or None
    docs = connect(s)
    if max_documents is None and not is_standin(docs):
        values["max_documents"] = None
    spec = make_spec(**values)  # every argument is checked before anything is written
    if s.profile == "embedded":
        db.embedded_cluster(s).up()
    with db.connect(s, autocommit=True) as conn:
        migrate(conn)
    with console.status(f"generating {spec.n_transactions:,} transactions (seed {spec.seed})"):
        started = time.monotonic()
        data = build(spec)
    console.print(f"generated in {time.monotonic() - started:.1f}s")
    with Progress(
        TextColumn("{task.description:<22}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(entity: str, rows: int, total: int) -> None:
            if entity not in tasks:
                tasks[entity] = bar.add_task(entity, total=max(total, 1))
            bar.advance(tasks[entity], rows)

        report = load_seed(s, data, docs, reset_first=reset, progress=progress)
    for entity, t in {**report.oltp, **report.documents}.items():
        console.print(
            f"{entity:<22} {t.rows:>10,} rows {t.seconds:7.1f}s {t.rows_per_second:>10,.0f} rows/s"
        )
    if report.resumed_batches:
        console.print(f"resumed: {report.resumed_batches} batch(es) were already committed")


# -- ingestion ---------------------------------------------------------------------------------------
@command(app)
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
        from stripe_platform.ingestion.airbyte_api import connect_from_env, trigger_sync

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
    with _lake_errors_named(s, catalog, connection):
        _sync_embedded(s, catalog, connection, as_json, follow, interval)


@contextlib.contextmanager
def _lake_errors_named(s: Settings, catalog: Any, connection: str) -> Iterator[None]:
    """A lake that cannot be reached or written (a bucket that does not exist, no credentials,
    a full or read-only disk) fails a sync with the variable that names it, not a traceback."""
    from stripe_platform.ingestion.catalog import S3Destination

    try:
        yield
    except OSError as exc:  # pyarrow's filesystems raise OSError for local and S3 failures
        known = {c.name: c for c in catalog.connections}
        target = known.get(connection)
        if target is None or not isinstance(catalog.destination(target.destination), S3Destination):
            raise
        raise SettingsError(
            f"{ENV_PREFIX}LAKE_URI: the lake {s.lake_root} cannot be written ({exc}); {LAKE_FORMS}"
        ) from None


def _sync_embedded(
    s: Settings, catalog: Any, connection: str, as_json: bool, follow: bool, interval: float
) -> None:
    from rich.progress import Progress, TextColumn

    from stripe_platform.ingestion.engine import open_writer, run_sync

    if follow:
        import threading

        from stripe_platform.ingestion.engine import follow as follow_changes

        stop = threading.Event()
        err.print(f"{connection}: following changes every {interval}s; Ctrl-C stops cleanly")
        try:
            report = follow_changes(
                s,
                connection,
                stop,
                interval,
                catalog=catalog,
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

        report = run_sync(s, catalog, open_writer(s, catalog, connection), connection, progress)
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
    from stripe_platform.ingestion import airbyte_api
    from stripe_platform.ingestion.catalog import load_catalog

    catalog = load_catalog()
    console.print(airbyte_api.plan(airbyte_api.connect_from_env(catalog), catalog).render())


@command(airbyte_app, "apply")
def airbyte_apply(
    yes: Annotated[bool, typer.Option("--yes", help="Apply without asking")] = False,
) -> None:
    """Create or update sources, destinations and connections, matched by name (idempotent)."""
    from stripe_platform.ingestion import airbyte_api
    from stripe_platform.ingestion.catalog import load_catalog

    catalog = load_catalog()
    client = airbyte_api.connect_from_env(catalog)
    plan = airbyte_api.plan(client, catalog)
    console.print(plan.render())
    if not plan.pending:
        return
    if not yes and not typer.confirm("apply these changes?"):
        raise typer.Exit(1)
    applied = airbyte_api.apply(client, plan)
    console.print(f"applied: { {k: len(v) for k, v in applied.items()} }")


# -- transformation (dbt) ----------------------------------------------------------------------------
@command(app)
def transform(
    select: Annotated[
        str | None, typer.Option(help="dbt node selection, e.g. 'tag:fraud' or 'FACT_Revenue+'")
    ] = None,
    full_refresh: Annotated[
        bool, typer.Option("--full-refresh", help="Rebuild incremental models from scratch")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON summary on stdout")] = False,
) -> None:
    """Build the star schema: one `dbt build` (seeds, snapshots, models, tests) on the warehouse."""
    from stripe_platform.transform.dbt import NodeResult, TransformError, build

    s = settings()
    colours = {"success": "green", "pass": "green", "error": "red", "fail": "red", "warn": "yellow"}

    def show(node: NodeResult) -> None:
        # One line per built node; tests only when they do not pass (the summary counts them).
        if as_json or (node.resource_type == "test" and node.status == "pass"):
            return
        colour = colours.get(node.status, "white")
        err.print(
            f"[{colour}]{escape(node.status):<7}[/{colour}] {escape(node.resource_type):<8} "
            f"{escape(node.name):<36} {node.seconds:6.2f}s",
            markup=True,
        )

    err.print(f"dbt build on the {s.warehouse_backend} warehouse...")
    summary = build(s, select=select, full_refresh=full_refresh, on_node=show)
    if as_json:
        console.print_json(data=summary.as_dict())
    else:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items()))
        console.print(f"dbt build ({summary.target}): {counts} in {summary.seconds:.1f}s")
        for node in summary.failures:
            console.print(
                f"[red]{escape(node.resource_type)} {escape(node.name)}[/red]: "
                f"{escape(str(node.message))}",
                markup=True,
            )
    if not summary.success:
        raise TransformError(f"dbt build failed: {len(summary.failures)} node(s) failed")
    if select and not summary.nodes:
        raise TransformError(f"--select {select!r} matched no seed, model, snapshot or test")


@command(app)
def query(
    name: Annotated[str, typer.Argument(help="One of the brief's analytics queries")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run one of the brief's OLAP queries (dbt_project/analyses) on the marts and print it."""
    from rich.table import Table

    from stripe_platform.transform.analyses import run_analysis

    result = run_analysis(settings(), name)
    if as_json:
        console.print_json(
            data={
                "query": name,
                "columns": result.columns,
                "rows": [list(r) for r in result.rows],
                "seconds": result.seconds,
            },
            default=str,
        )
        return
    table = Table(
        *result.columns, title=f"{name} ({len(result.rows)} rows, {result.seconds * 1000:.0f} ms)"
    )
    for row in result.rows:
        table.add_row(*(str(v) for v in row))
    console.print(f"[cyan]{escape(result.sql)}[/cyan]", markup=True)
    console.print(table, soft_wrap=False)  # a table fits itself to the terminal


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def dbt(ctx: typer.Context) -> None:
    """Any dbt command on the platform's project and generated profile, e.g. `dbt docs generate`."""
    from stripe_platform.transform.dbt import run_dbt

    if not ctx.args:
        err.print("usage: stripe-platform dbt <dbt command> [args], e.g. dbt docs generate")
        raise typer.Exit(2)
    summary = run_dbt(settings(), *ctx.args)
    raise typer.Exit(0 if summary.success else 1)


# -- benchmarks --------------------------------------------------------------------------------------
@command(app)
def bench(
    scale: Annotated[float, typer.Option(help="1 = 1,000,000 payments")] = 1.0,
    runs: Annotated[int, typer.Option(min=1, help="Measured runs, after a warm-up")] = 3,
    only: Annotated[
        str | None, typer.Option(help="Comma-separated: seed,ingest,transform,mongo,demo")
    ] = None,
    output_dir: Annotated[
        str | None, typer.Option(help="Where <date>.json and <date>.md go (default bench/results)")
    ] = None,
) -> None:
    """Run every benchmark (bench/run_all.py) on the embedded profile and print the table."""
    import subprocess

    from stripe_platform.paths import REPO_ROOT

    script = REPO_ROOT / "bench" / "run_all.py"
    if not script.exists():
        raise RuntimeErrorWithHint(f"{script} not found: `bench` runs from a repository checkout")
    args = [sys.executable, str(script), "--scale", str(scale), "--runs", str(runs)]
    args += ["--only", only] if only else []
    args += ["--output-dir", output_dir] if output_dir else []
    raise typer.Exit(subprocess.run(args, check=False).returncode)


# -- documents ---------------------------------------------------------------------------------------
@command(mongo_app, "apply")
def mongo_apply() -> None:
    """Create the collections, validators, indexes and views of mongo/collections."""
    from stripe_platform.docstore.client import connect
    from stripe_platform.docstore.specs import apply_specs

    for r in apply_specs(connect(settings())):
        made = "created" if r.created else "exists"
        console.print(
            f"{r.collection:<20} {made:<8} indexes +{len(r.indexes_created)}  "
            f"validator: {r.validator}" + (f"  views: {', '.join(r.views)}" if r.views else "")
        )


@command(mongo_app, "query")
def mongo_query(
    name: Annotated[str, typer.Argument(help="A query in mongo/queries")],
    limit: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Run one of the brief's document queries and print the documents as JSON."""
    from bson import json_util

    from stripe_platform.docstore.client import connect
    from stripe_platform.docstore.queries import load_queries, run_query

    queries = load_queries()
    if name not in queries:
        raise QueryError(f"unknown query {name!r}; known: {', '.join(queries)}")
    results = run_query(connect(settings()), queries[name], limit=limit)
    console.print(f"[cyan]{escape(queries[name].shell)}[/cyan]", markup=True)
    console.print_json(json_util.dumps(results, json_options=json_util.RELAXED_JSON_OPTIONS))


if __name__ == "__main__":  # pragma: no cover
    app()
