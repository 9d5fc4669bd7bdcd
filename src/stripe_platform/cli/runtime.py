"""Runtime commands: the embedded cluster up and down, what runs where, psql, the main job
(demo) and Airflow."""

from __future__ import annotations

import os
import shutil
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from stripe_platform.cli.common import command, console, err, settings
from stripe_platform.config import ENV_PREFIX, Settings
from stripe_platform.runtime.postgres import RuntimeErrorWithHint

commands = typer.Typer()  # merged into the top level


def require_embedded(s: Settings) -> None:
    if s.profile != "embedded":
        raise RuntimeErrorWithHint(
            f"the profile is {s.profile!r}: its PostgreSQL is managed outside the platform "
            "(STRIPE_PLATFORM_PG_DSN); `up`/`down` only manage the embedded cluster"
        )


@command(commands)
def up() -> None:
    """Start the embedded runtime: the PostgreSQL cluster and the document server (FerretDB,
    built on first use; not started when MONGODB_URI names a MongoDB server)."""
    from stripe_platform.runtime import embedded

    s = settings()
    require_embedded(s)
    with console.status("starting PostgreSQL and the document server"):
        status = embedded.up(s)
    pg = status.postgres
    console.print(
        f"PostgreSQL {pg.version} running on 127.0.0.1:{pg.port} (pid {pg.pid}, data {pg.datadir})"
    )
    if status.documents is not None:
        docs = status.documents
        console.print(
            f"{docs.version} running on 127.0.0.1:{docs.port} with TLS (pid {docs.pid}, "
            f"documents in {docs.backend_database}, log {docs.log})"
        )
    else:
        console.print("documents: MONGODB_URI (no embedded document server)")


@command(commands)
def down() -> None:
    """Stop the embedded document server and PostgreSQL cluster (data is kept)."""
    from stripe_platform.runtime import embedded

    s = settings()
    require_embedded(s)
    postgres, documents = embedded.down(s)
    console.print("document server stopped" if documents else "document server was not running")
    console.print("PostgreSQL stopped" if postgres else "PostgreSQL was not running")


@command(commands)
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Say what runs where."""
    from stripe_platform.runtime import embedded

    s = settings()
    info: dict[str, Any] = {
        "profile": s.profile,
        "home": str(s.home_dir),
        "home_from": s.home_origin,
    }
    runtime = embedded.status(s) if s.profile == "embedded" else None
    if runtime is not None:
        info["postgres"] = runtime.postgres.as_dict()
    else:
        info["postgres"] = {"dsn": "STRIPE_PLATFORM_PG_DSN (set)"}
    if runtime is not None and runtime.documents is not None:
        info["documents"] = {
            **runtime.documents.as_dict(),
            "backend": "ferretdb",
            "database": s.mongodb_database,
        }
    else:
        info["documents"] = {"backend": "mongodb (MONGODB_URI)", "database": s.mongodb_database}
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
    if docs["backend"] == "ferretdb":
        state = "[green]running[/green]" if docs["running"] else "[yellow]stopped[/yellow]"
        console.print(
            f"documents {state}  127.0.0.1:{docs['port']}  {docs['version']}  TLS  "
            f"database {docs['database']} in {escape(docs['backend_database'])}  "
            f"log {escape(docs['log'])}",
            markup=True,
        )
    else:
        console.print(f"documents {docs['backend']}  database {docs['database']}")
    warehouse = info["warehouse"]
    console.print(f"warehouse {warehouse['backend']}  {warehouse.get('path', '')}".rstrip())
    lake = info["lake"]
    console.print(f"lake      {lake['root']}  ({lake['kind']}; {lake['from']})")


@command(commands)
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


@command(commands)
def demo(
    scale: Annotated[
        float, typer.Option(min=0.001, max=10, help="Synthetic data size; 1 = 1M payments")
    ] = 0.05,
) -> None:
    """The main job: runtime up, the brief's statements, seed, Airflow runs the ELT DAGs (sync,
    dbt), then the brief's queries answered."""
    from stripe_platform.showcase import demo as demo_job

    # The showcase styles its lines (and escapes what it prints from data).
    demo_job.run(settings(), Console(), scale=scale)


@command(commands)
def airflow(
    port: Annotated[int, typer.Option(help="Port of the UI and API on 127.0.0.1")] = 8080,
) -> None:
    """Start Airflow on this machine (`airflow standalone`: UI, scheduler, DAG processor,
    triggerer) with the platform's DAGs, until Ctrl-C."""
    from stripe_platform.orchestration.airflow_runtime import airflow_home, run_airflow_standalone
    from stripe_platform.transform.dbt import ensure_manifest

    s = settings()
    ensure_manifest(s)  # what cosmos renders the DAGs from
    err.print(
        f"Airflow on https://127.0.0.1:{port} (user admin; password in "
        f"{airflow_home(s) / 'simple_auth_manager_passwords.json.generated'})"
    )
    raise typer.Exit(run_airflow_standalone(s, port=port))
