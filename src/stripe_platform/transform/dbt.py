"""Runs the dbt project against the configured warehouse.

The profile is generated from the platform's settings into ``<home>/dbt/profiles.yml`` (one target,
named after the backend), so nobody edits a profiles.yml by hand. Passwords are not written to the
file: it names ``DBT_ENV_SECRET_*`` variables, which dbt scrubs from its logs, and ``dbt_env``
supplies them. dbt runs in-process (dbtRunner): its imports dominate a small build's wall time, so
one invocation does the whole ``dbt build``.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from psycopg.conninfo import conninfo_to_dict

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.paths import REPO_ROOT
from stripe_platform.warehouse import snowflake_params

DBT_PROJECT_DIR = REPO_ROOT / "dbt_project"
PROFILE = "stripe_platform"
# The schema the marts live in on every target (staging, intermediate... have their own).
MARTS_SCHEMA = "analytics"
PG_PASSWORD_VAR = "DBT_ENV_SECRET_PG_PASSWORD"  # noqa: S105 - a variable name, not a secret
SF_PASSWORD_VAR = "DBT_ENV_SECRET_SF_PASSWORD"  # noqa: S105
# Set only by the test suite: switches on the macro overrides fakesnow needs (macros/fakesnow.sql).
FAKESNOW_SHIMS_VAR = "STRIPE_PLATFORM_DBT_FAKESNOW_SHIMS"


class TransformError(PlatformError, RuntimeError):
    """dbt could not run, or the build failed; the message names what failed."""


def dbt_dir(settings: Settings) -> Path:
    return settings.home_dir / "dbt"


def _secret(variable: str) -> str:
    """A profile value dbt reads from the environment when it runs (never written to the file)."""
    return "{{ env_var('" + variable + "', '') }}"


def profile_target(settings: Settings) -> dict[str, Any]:
    """The dbt output for the configured warehouse backend."""
    backend = settings.warehouse_backend
    if backend == "duckdb":
        return {
            "type": "duckdb",
            "path": str(settings.warehouse_file),
            "schema": MARTS_SCHEMA,
            "threads": 2,
            # Dates of timestamps are UTC dates whatever the machine's zone.
            "settings": {"TimeZone": "UTC"},
        }
    if backend == "postgres":
        assert settings.warehouse_dsn is not None  # checked by Settings
        params = conninfo_to_dict(settings.warehouse_dsn.get_secret_value())
        target: dict[str, Any] = {
            "type": "postgres",
            "host": params.get("host", "127.0.0.1"),
            "port": int(params.get("port", 5432)),
            "user": params.get("user", "postgres"),
            "password": _secret(PG_PASSWORD_VAR),
            "dbname": params.get("dbname", "postgres"),
            "schema": MARTS_SCHEMA,
            "threads": 2,
        }
        for key in ("sslmode", "sslrootcert", "sslcert", "sslkey"):
            if key in params:
                target[key] = params[key]
        return target
    params = snowflake_params(settings)
    target = {
        "type": "snowflake",
        "account": params.get("account"),
        "user": params.get("user"),
        "password": _secret(SF_PASSWORD_VAR),
        "database": settings.snowflake_database,
        "schema": MARTS_SCHEMA.upper(),
        "threads": 2,
    }
    for key in ("warehouse", "role", "host", "port", "protocol"):
        if key in params:
            target[key] = params[key]
    return target


def masked_schema() -> str:
    """The schema of the masked marts' views (var masked_schema of dbt_project.yml)."""
    project = yaml.safe_load((DBT_PROJECT_DIR / "dbt_project.yml").read_text())
    return str(project["vars"]["masked_schema"])


def dbt_env(settings: Settings) -> dict[str, str]:
    """What dbt reads from its environment: the secrets the generated profile refers to, and the
    roles the masking macros grant (from the access policy: the one list of who reads the marts
    in clear; security/access_warehouse.masking_env). DuckDB has no roles: its builds do not read
    the policy."""
    env: dict[str, str] = {}
    if settings.warehouse_backend in ("postgres", "snowflake"):
        from stripe_platform.security.access_warehouse import masking_env
        from stripe_platform.security.policy import load_policy

        env.update(masking_env(load_policy(settings)))
    if settings.warehouse_backend == "postgres" and settings.warehouse_dsn is not None:
        password = conninfo_to_dict(settings.warehouse_dsn.get_secret_value()).get("password")
        if password:
            env[PG_PASSWORD_VAR] = password
    if settings.warehouse_backend == "snowflake" and settings.snowflake_password is not None:
        env[SF_PASSWORD_VAR] = settings.snowflake_password.get_secret_value()
    return env


def write_profiles(settings: Settings) -> Path:
    """Writes <home>/dbt/profiles.yml for the configured backend and returns its directory."""
    directory = dbt_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    backend = settings.warehouse_backend
    profiles = {PROFILE: {"target": backend, "outputs": {backend: profile_target(settings)}}}
    text = (
        "# Generated by stripe-platform from its settings: edit the settings, not this file.\n"
        + yaml.safe_dump(profiles, sort_keys=False)
    )
    path = directory / "profiles.yml"
    # DAG files call this at every parse: rewrite only when the settings changed.
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return directory


def dbt_args(settings: Settings, *args: str) -> list[str]:
    """Command-line arguments for one dbt invocation on the platform's project and profile."""
    directory = write_profiles(settings)
    return [
        *args,
        "--project-dir",
        str(DBT_PROJECT_DIR),
        "--profiles-dir",
        str(directory),
        "--target-path",
        str(directory / "target"),
        "--log-path",
        str(directory / "logs"),
    ]


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class NodeResult:
    name: str
    resource_type: str
    status: str
    seconds: float
    message: str = ""


@dataclass
class RunSummary:
    command: str
    target: str
    success: bool
    seconds: float
    nodes: list[NodeResult] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(node.status for node in self.nodes))

    @property
    def failures(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.status in {"error", "fail", "runtime error"}]

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "target": self.target,
            "success": self.success,
            "seconds": round(self.seconds, 2),
            "counts": self.counts,
            "failures": [n.__dict__ for n in self.failures],
        }


def run_dbt(
    settings: Settings,
    *args: str,
    on_node: Callable[[NodeResult], None] | None = None,
) -> RunSummary:
    """Runs one dbt command in-process (``args`` as on dbt's command line, e.g. "docs",
    "generate"); ``on_node`` is called as each node finishes."""
    import time

    from dbt.cli.main import dbtRunner

    def callback(event: Any) -> None:
        if on_node is None or event.info.name != "NodeFinished":
            return
        info = event.data.node_info
        result = event.data.run_result
        on_node(
            NodeResult(
                name=info.node_name,
                resource_type=info.resource_type,
                status=info.node_status,
                seconds=float(result.execution_time or 0.0),
                message=result.message or "",
            )
        )

    command = args[0] if args else "dbt"
    env = dbt_env(settings)
    argv = dbt_args(settings, *args)
    started = time.monotonic()
    # With a node callback the caller owns stdout (progress, --json); dbt's own lines go to stderr.
    output = redirect_stdout(sys.stderr) if on_node else nullcontext()
    private: AbstractContextManager[None] = nullcontext()
    if settings.warehouse_backend == "duckdb":  # dbt writes the warehouse file and its WAL
        from stripe_platform.warehouse.duckdb import private_duckdb_file, private_files

        private_duckdb_file(settings.warehouse_file)
        private = private_files()
    with _environment(env), output, private:
        outcome = dbtRunner(callbacks=[callback]).invoke(argv)
    elapsed = time.monotonic() - started
    if outcome.exception is not None:
        raise TransformError(f"dbt {command} could not run: {outcome.exception}")
    nodes = []
    for result in getattr(outcome.result, "results", None) or []:
        node = getattr(result, "node", None)  # run-operation results name no node
        if node is None:
            continue
        nodes.append(
            NodeResult(
                name=node.name,
                resource_type=str(node.resource_type),
                status=str(result.status),
                seconds=float(result.execution_time or 0.0),
                message=result.message or "",
            )
        )
    return RunSummary(command, settings.warehouse_backend, bool(outcome.success), elapsed, nodes)


def build(
    settings: Settings,
    *,
    select: str | None = None,
    full_refresh: bool = False,
    on_node: Callable[[NodeResult], None] | None = None,
) -> RunSummary:
    """One `dbt build` (seeds, snapshots, models and tests in dependency order)."""
    # dbt's own log lines would repeat what on_node reports; errors are still printed.
    extra: list[str] = ["--quiet"] if on_node else []
    if select:
        extra += ["--select", select]
    if full_refresh:
        extra.append("--full-refresh")
    return run_dbt(settings, "build", *extra, on_node=on_node)


# The manifest cosmos renders the DAGs from. It describes the project (nodes and their
# dependencies), not a warehouse, so one copy beside the project serves every profile and home.
MANIFEST = DBT_PROJECT_DIR / "target" / "manifest.json"


def _project_files() -> list[Path]:
    return [
        p
        for p in DBT_PROJECT_DIR.rglob("*")
        if p.is_file()
        and p.suffix in {".sql", ".yml", ".yaml", ".csv"}
        and "target" not in p.relative_to(DBT_PROJECT_DIR).parts
    ]


def manifest_is_fresh() -> bool:
    if not MANIFEST.exists():
        return False
    built = MANIFEST.stat().st_mtime
    return all(p.stat().st_mtime <= built for p in _project_files())


def ensure_manifest(settings: Settings) -> Path:
    """``dbt parse`` when the manifest is missing or older than a project file; returns it."""
    if manifest_is_fresh():
        return MANIFEST
    summary = run_dbt(settings, "parse", "--quiet")
    written = dbt_dir(settings) / "target" / "manifest.json"
    if not summary.success or not written.exists():
        raise TransformError(f"dbt parse failed: see {dbt_dir(settings) / 'logs' / 'dbt.log'}")
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    tmp = MANIFEST.with_suffix(".tmp")
    tmp.write_bytes(written.read_bytes())
    tmp.replace(MANIFEST)
    return MANIFEST
