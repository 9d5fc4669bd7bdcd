"""Airflow on the platform's profiles.

Embedded (no services): ``AIRFLOW_HOME`` is ``<platform home>/airflow`` with SQLite metadata, the
repository's dags/ and no examples; :func:`migrate_airflow_db` prepares it (once per Airflow
version) and :func:`run_airflow_standalone` starts its components on 127.0.0.1.
The api-server (UI, REST API, and the execution API tasks report to) serves https only, with the
runtime's certificate (``runtime/tls.py``); Airflow's task client verifies it against the CA.

docker compose: the environment comes from docker-compose.yml; its ``airflow-init`` service runs
``python -m stripe_platform.orchestration.airflow_runtime init`` (migrate + pools).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

from stripe_platform.config import Settings, load_settings
from stripe_platform.errors import PlatformError
from stripe_platform.orchestration.defaults import pools_file
from stripe_platform.paths import REPO_ROOT
from stripe_platform.runtime.tls import ensure_certificates

DAGS_DIR = REPO_ROOT / "dags"
DEFAULT_PORT = 8080
AIRFLOW = [sys.executable, "-m", "airflow"]
# The running interpreter's scripts (airflow, dbt, ...): Airflow and the libraries its tasks use
# start some of them by name, so they must resolve to this environment whatever the user's PATH
# (`.venv/bin/stripe-platform airflow` without an activated virtualenv).
SCRIPTS_DIR = Path(sys.executable).parent


class AirflowSetupError(PlatformError, RuntimeError):
    """An Airflow command the platform runs failed; the message carries its output's end."""


def airflow_home(settings: Settings) -> Path:
    return settings.home_dir / "airflow"


def airflow_env(
    settings: Settings, base: Mapping[str, str] | None = None, *, port: int = DEFAULT_PORT
) -> dict[str, str]:
    """The environment of every Airflow process of the embedded Airflow (CLI, standalone, tests).

    The platform's own variables are passed through, with the home made absolute so tasks find
    the same cluster, documents and warehouse whatever their working directory. The api-server
    listens with TLS only (uvicorn takes ``[api] ssl_cert/ssl_key``; there is no plain listener
    beside it) and tasks verify it against the runtime's CA (``[api] ssl_ca_file``). ``PATH``
    starts with this interpreter's scripts directory (:data:`SCRIPTS_DIR`).
    """
    home = airflow_home(settings)
    tls = ensure_certificates(settings.home_dir / "tls")
    base_url = f"https://127.0.0.1:{port}"
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__COSMOS__CACHE_DIR": str(home / "cosmos"),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": base_url,
            "AIRFLOW__API__SSL_CERT": str(tls.server_cert),
            "AIRFLOW__API__SSL_KEY": str(tls.server_key),
            "AIRFLOW__API__SSL_CA_FILE": str(tls.ca_cert),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # No usage reporting to third parties (cosmos and Airflow both phone home otherwise).
            "AIRFLOW__COSMOS__ENABLE_TELEMETRY": "False",
            "AIRFLOW__USAGE_DATA_COLLECTION__ENABLED": "False",
            "SCARF_NO_ANALYTICS": "true",
            "DO_NOT_TRACK": "true",
            "STRIPE_PLATFORM_HOME": str(settings.home_dir),
            "STRIPE_PLATFORM_PROFILE": settings.profile,
        }
    )
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != str(SCRIPTS_DIR)]
    env["PATH"] = os.pathsep.join([str(SCRIPTS_DIR), *path])
    if "AIRFLOW_CONN_AIRBYTE_DEFAULT" not in env and settings.ingestion_backend == "airbyte":
        from stripe_platform.orchestration.airbyte import airflow_connection_from_env

        if conn := airflow_connection_from_env(env):
            env["AIRFLOW_CONN_AIRBYTE_DEFAULT"] = conn
    return env


def _run(commands: list[list[str]], env: Mapping[str, str], what: str) -> None:
    """Airflow CLI commands, in order, in ONE process (``python -m`` this module ``cli``): each
    Airflow process pays seconds of imports before it does anything."""
    done = subprocess.run(
        [sys.executable, "-m", __name__, "cli", json.dumps(commands)],
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        shown = " && ".join(f"airflow {' '.join(c)}" for c in commands)
        raise AirflowSetupError(f"`{shown}` ({what}) failed:\n{tail}")


def _cli(commands: list[list[str]]) -> None:
    """What ``airflow <command>`` does (airflow/__main__.py), for each command in one process."""
    from airflow.cli import cli_parser
    from airflow.configuration import write_default_airflow_configuration_if_needed

    write_default_airflow_configuration_if_needed()
    parser = cli_parser.get_parser()
    for command in commands:
        args = parser.parse_args(command)
        args.func(args)


def _setup(settings: Settings, env: Mapping[str, str], workdir: Path) -> None:
    pools = workdir / "pools.json"
    pools.write_text(json.dumps(pools_file(settings), indent=2))
    _run([["db", "migrate"], ["pools", "import", str(pools)]], env, "metadata schema and pools")


def migrate_airflow_db(
    settings: Settings, *, env: Mapping[str, str] | None = None, force: bool = False
) -> bool:
    """``airflow db migrate`` and the pools for the embedded Airflow; True if it ran.

    Skipped (in milliseconds) when the SQLite database exists and was migrated by this Airflow
    version: a run takes ~15 s. An upgrade of Airflow migrates again.
    """
    home = airflow_home(settings)
    stamp = home / f".migrated-{version('apache-airflow')}"
    if not force and stamp.exists() and (home / "airflow.db").exists():
        return False
    home.mkdir(parents=True, exist_ok=True)
    _setup(settings, env or airflow_env(settings), home)
    stamp.write_text("airflow db migrate and pools import done\n")
    return True


# The components `airflow standalone` runs, started here instead: standalone also starts each
# scheduler's and triggerer's log server, plain HTTP on every interface (ports 8793/8794), which
# one machine does not need (the api-server reads the log files itself) and TLS-only forbids.
COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}


def run_airflow_standalone(settings: Settings, *, port: int = DEFAULT_PORT) -> int:
    """Prepare the embedded Airflow and run its components (api-server on
    https://127.0.0.1:<port>, scheduler, dag-processor, triggerer) until Ctrl-C or until one of
    them stops; the exit code of the first to stop (130 after Ctrl-C or SIGTERM).

    The UI login is ``admin``; its generated password is in
    ``<home>/airflow/simple_auth_manager_passwords.json.generated``. The components are recorded
    for the TLS scan (``security/tls_scan.py``) while they run.
    """
    from stripe_platform.security.tls_scan import forget_server, record_server

    env = airflow_env(settings, port=port)
    migrate_airflow_db(settings, env=env)
    processes: dict[str, subprocess.Popen] = {}
    record_server(settings, "airflow", "http")  # this process: the components are its children
    code = 0

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the components as Ctrl-C does

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for name, args in COMPONENTS.items():
            processes[name] = subprocess.Popen([*AIRFLOW, *args], env=env)
        while not any(p.poll() is not None for p in processes.values()):
            time.sleep(0.5)
        code = next(p.returncode for p in processes.values() if p.returncode is not None)
    except KeyboardInterrupt:
        code = 130
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        forget_server(settings, "airflow")
        signal.signal(signal.SIGTERM, previous)
    return code


def init_from_environment() -> None:
    """docker compose's ``airflow-init``: migrate the metadata DB the environment names, then the
    pools. Both are idempotent, so every ``docker compose up`` can run it."""
    settings = load_settings()
    workdir = Path(os.environ.get("AIRFLOW_HOME", "/tmp"))  # noqa: S108 - only a pools.json
    workdir.mkdir(parents=True, exist_ok=True)
    _setup(settings, os.environ, workdir)
    print("airflow metadata database migrated; pools:", ", ".join(pools_file(settings)))


if __name__ == "__main__":
    if sys.argv[1:] == ["init"]:
        init_from_environment()
    elif sys.argv[1:2] == ["cli"] and len(sys.argv) == 3:
        _cli(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m stripe_platform.orchestration.airflow_runtime init")
