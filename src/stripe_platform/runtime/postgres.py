"""The embedded PostgreSQL cluster: a private server under ``<home>/pg`` built from the machine's
PostgreSQL server binaries, configured for what the platform needs (logical decoding, TLS, SCRAM,
audit logging as JSON)."""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from stripe_platform.errors import PlatformError
from stripe_platform.runtime.tls import ensure_certificates, tls_files

SUPERUSER = "postgres"
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH, via pg_config "
    "or under /usr/lib/postgresql/*/bin. Install them, e.g. `sudo apt-get install postgresql "
    "postgresql-contrib` on Debian/Ubuntu, or run `make bootstrap` as root."
)


class RuntimeErrorWithHint(PlatformError, RuntimeError):
    """The embedded runtime cannot do what was asked; the message says why and what to do."""


def find_bindir() -> Path:
    """Locate a directory holding initdb, pg_ctl and postgres (the newest major wins)."""
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates.extend(Path(p) for p in reversed(versioned))
    for directory in candidates:
        if all((directory / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    raise RuntimeErrorWithHint(INSTALL_HINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class ClusterStatus:
    running: bool
    initialised: bool
    port: int | None
    datadir: Path
    bindir: Path | None
    version: str | None
    pid: int | None
    audit_log_dir: Path

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


class EmbeddedPostgres:
    """One private cluster. Every method is idempotent."""

    def __init__(
        self,
        home: Path,
        *,
        port: int | None = None,
        database: str = "stripe",
        fsync: bool = True,
        os_user: str = "postgres",
    ) -> None:
        self.root = home / "pg"
        self.datadir = self.root / "data"
        self.state_file = self.root / "runtime.json"
        self.password_file = self.root / "superuser.password"
        self.tls_dir = home / "tls"
        self.requested_port = port
        self.database = database
        self.fsync = fsync
        self.os_user = os_user

    # -- identity of the process that runs the server --------------------------------------------
    def _run_as(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(self.os_user)
        except KeyError:
            raise RuntimeErrorWithHint(
                f"Running as root, the embedded cluster needs an unprivileged OS user "
                f"'{self.os_user}' (initdb refuses root). Create it (`useradd --system "
                f"{self.os_user}`, or install the postgresql package) or set "
                f"STRIPE_PLATFORM_PG_OS_USER."
            ) from None

    def _run(self, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        user = self._run_as()
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        kwargs: dict = {}
        if user is not None:
            env["HOME"] = user.pw_dir
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        result = subprocess.run(
            args, capture_output=True, text=True, env=env, cwd="/", check=False, **kwargs
        )
        if check and result.returncode != 0:
            raise RuntimeErrorWithHint(
                f"`{' '.join(args)}` failed ({result.returncode}):\n{result.stderr or result.stdout}"
            )
        return result

    def _own(self, path: Path, mode: int) -> None:
        path.chmod(mode)
        user = self._run_as()
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    # -- state -------------------------------------------------------------------------------------
    def _state(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {}

    def _save_state(self, **values: object) -> None:
        state = {**self._state(), **values}
        self.state_file.write_text(json.dumps(state, indent=2))

    @property
    def port(self) -> int | None:
        return self.requested_port or self._state().get("port")

    def superuser_password(self) -> str:
        if not self.password_file.exists():
            raise RuntimeErrorWithHint(
                f"The embedded cluster under {self.root} is not initialised: run `stripe-platform up`."
            )
        return self.password_file.read_text().strip()

    def conninfo(self, database: str | None = None, **extra: str) -> str:
        port = self.port
        if port is None:
            raise RuntimeErrorWithHint(
                f"The embedded cluster under {self.root} has never started: run `stripe-platform up`."
            )
        params = {
            "host": "127.0.0.1",
            "port": str(port),
            "user": SUPERUSER,
            "password": self.superuser_password(),
            "dbname": database or self.database,
            "sslmode": "verify-full",
            "sslrootcert": str(tls_files(self.tls_dir).ca_cert),
            "application_name": "stripe-platform",
            "connect_timeout": "10",
        }
        params.update(extra)
        return make_conninfo(**params)

    # -- lifecycle ---------------------------------------------------------------------------------
    def status(self) -> ClusterStatus:
        initialised = (self.datadir / "PG_VERSION").exists()
        version = (self.datadir / "PG_VERSION").read_text().strip() if initialised else None
        bindir = self._state().get("bindir")
        pid = None
        running = False
        pidfile = self.datadir / "postmaster.pid"
        if initialised and pidfile.exists():
            try:
                pid = int(pidfile.read_text().splitlines()[0])
                os.kill(pid, 0)
                running = True
            except (ValueError, IndexError, ProcessLookupError):
                pid = None
            except PermissionError:
                running = True
        return ClusterStatus(
            running=running,
            initialised=initialised,
            port=self.port,
            datadir=self.datadir,
            bindir=Path(bindir) if bindir else None,
            version=version,
            pid=pid,
            audit_log_dir=self.datadir / "log",
        )

    def up(self) -> ClusterStatus:
        """Initialise on first use, (re)write the configuration, start, ensure the database."""
        bindir = find_bindir()
        if self.status().running:
            self._ensure_database()
            return self.status()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb(bindir)
        port = self.requested_port or self._state().get("port")
        if port is None or (self.requested_port is None and port_in_use(port)):
            port = free_port()
        if port_in_use(port):
            raise RuntimeErrorWithHint(
                f"Port {port} on 127.0.0.1 is already in use; set STRIPE_PLATFORM_PG_PORT to a free one."
            )
        self._save_state(port=port, bindir=str(bindir))
        self._configure(port)
        self._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.datadir / "pg_ctl.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        self._ensure_database()
        return self.status()

    def down(self) -> bool:
        """Stop the server (fast shutdown: sessions are rolled back, data is kept)."""
        if not self.status().running:
            return False
        bindir = find_bindir()
        self._run([str(bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"])
        return True

    def _initdb(self, bindir: Path) -> None:
        user = self._run_as()
        self._own(self.root, 0o755)
        if user is not None:
            probe = self._run(["test", "-w", str(self.root)], check=False)
            if probe.returncode != 0:
                raise RuntimeErrorWithHint(
                    f"OS user '{self.os_user}' cannot write {self.root} (a parent directory is "
                    "not reachable). Set STRIPE_PLATFORM_HOME to a path it can reach."
                )
        if self.datadir.exists():
            shutil.rmtree(self.datadir)  # a half-made directory from an interrupted initdb
        password = secrets.token_urlsafe(24)
        pwfile = self.root / ".initdb-pw"
        pwfile.write_text(password + "\n")
        self._own(pwfile, 0o600)
        try:
            self._run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    SUPERUSER,
                    "--pwfile",
                    str(pwfile),
                    "--auth-local=reject",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    *([] if self.fsync else ["--no-sync"]),
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)

    def _configure(self, port: int) -> None:
        tls = ensure_certificates(self.tls_dir)
        # The server reads its key as the OS user and insists on 0600.
        key = self.datadir / "server.key"
        cert = self.datadir / "server.crt"
        shutil.copyfile(tls.server_key, key)
        shutil.copyfile(tls.server_cert, cert)
        self._own(key, 0o600)
        self._own(cert, 0o644)
        conf = f"""# Written by stripe-platform on every `up`; edit the platform, not this file.
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = ''
max_connections = 100
shared_buffers = '256MB'
timezone = 'UTC'
log_timezone = 'UTC'
fsync = {"on" if self.fsync else "off"}
synchronous_commit = {"on" if self.fsync else "off"}
full_page_writes = {"on" if self.fsync else "off"}

# Change data capture (logical decoding with pgoutput)
wal_level = logical
max_replication_slots = 16
max_wal_senders = 16

# TLS in transit; password authentication with SCRAM only
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'

# Technical audit logging (the brief's ALTER SYSTEM settings), as JSON lines carrying
# user, database, pid, remote host, session id/start, application, severity, SQLSTATE, statement.
logging_collector = on
log_destination = 'jsonlog'
log_directory = 'log'
log_filename = 'postgresql-%Y-%m-%d.log'
log_rotation_age = '1d'
log_rotation_size = 0
log_file_mode = 0600
log_connections = on
log_disconnections = on
log_statement = 'all'
# Bind parameters can carry card data and keys: statements are logged, their values are not.
log_parameter_max_length = 0
log_parameter_max_length_on_error = 0
"""
        conf_file = self.datadir / "stripe_platform.conf"
        conf_file.write_text(conf)
        self._own(conf_file, 0o600)
        main_conf = self.datadir / "postgresql.conf"
        include = "include_if_exists = 'stripe_platform.conf'\n"
        if include not in main_conf.read_text():
            with main_conf.open("a") as fh:
                fh.write("\n" + include)
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(
            "# TLS is mandatory: plain TCP is rejected, TLS needs a SCRAM password.\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostssl replication all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 0.0.0.0/0 reject\n"
        )
        self._own(hba, 0o600)

    def _ensure_database(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
                    ).fetchone()
                    if not exists:
                        conn.execute(
                            sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database))
                        )
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
