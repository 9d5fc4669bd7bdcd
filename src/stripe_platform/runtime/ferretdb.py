"""The embedded document server: FerretDB v1 (a MongoDB wire-protocol server) storing its documents
in the embedded PostgreSQL cluster, in a database of its own.

FerretDB is built from its published Go module by a small launcher of ours
(``ferretdb_launcher/``): the plain ``go install`` binary panics at start for want of a version
file the module zip lacks. The binary is cached under ``<repo>/.cache/ferretdb/`` by the digest of
the launcher's sources, so a changed go.mod or main.go builds a new one and an unchanged one is
never rebuilt.

Security: it listens on 127.0.0.1 with TLS only (the runtime's certificates). Authentication is
FerretDB v1's: PLAIN, passed through to PostgreSQL, so the MongoDB user is a PostgreSQL login role
(``stripe_docstore``, owner of the ``ferretdb`` database and nothing else). Without credentials a
client can do nothing: the launcher scrubs the libpq defaults it would otherwise fall back on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql

from stripe_platform.paths import REPO_ROOT
from stripe_platform.runtime.postgres import (
    EmbeddedPostgres,
    RuntimeErrorWithHint,
    free_port,
    port_in_use,
)
from stripe_platform.runtime.processes import log_tail, terminate
from stripe_platform.runtime.tls import ensure_certificates, tls_files

FERRETDB_VERSION = "v1.24.2"
LAUNCHER_SOURCES = Path(__file__).parent / "ferretdb_launcher"
CACHE_DIR = REPO_ROOT / ".cache" / "ferretdb"
MIN_GO = (1, 24)
ROLE = "stripe_docstore"
BACKEND_DATABASE = "ferretdb"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
GO_HINT = (
    "The embedded document server (FerretDB) is built from its Go module and needs Go >= "
    f"{MIN_GO[0]}.{MIN_GO[1]} (https://go.dev/doc/install; Debian 12's golang package is too old). "
    "Or point the platform at a MongoDB server with STRIPE_PLATFORM_MONGODB_URI."
)


# -- the binary --------------------------------------------------------------------------------------
def source_digest() -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode() + b"\0" + (LAUNCHER_SOURCES / name).read_bytes())
    return digest.hexdigest()[:16]


def binary_path() -> Path:
    return CACHE_DIR / f"ferretdb-launcher-{source_digest()}"


def find_go() -> Path:
    candidates = [shutil.which("go"), "/usr/local/go/bin/go", "/usr/lib/go/bin/go"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise RuntimeErrorWithHint(f"Go was not found on PATH or in /usr/local/go. {GO_HINT}")


def build_launcher(*, force: bool = False) -> tuple[Path, float | None]:
    """The launcher binary, built first if it is missing. Returns it and the build's seconds
    (None when the cached one was used)."""
    target = binary_path()
    if target.is_file() and not force:
        return target, None
    go = find_go()
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",  # never download a toolchain: use the machine's Go or fail
        "GOFLAGS": "-mod=readonly",  # go.sum is committed: the build uses exactly those modules
        "CGO_ENABLED": "0",
    }
    version = subprocess.run(
        [str(go), "env", "GOVERSION"], capture_output=True, text=True, env=env, check=False
    ).stdout.strip()
    found = re.match(r"go(\d+)\.(\d+)", version)
    if not found or (int(found[1]), int(found[2])) < MIN_GO:
        raise RuntimeErrorWithHint(f"{go} is {version or 'unknown'}. {GO_HINT}")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    started = time.monotonic()
    result = subprocess.run(
        [str(go), "build", "-trimpath", "-ldflags=-s -w", "-o", str(partial), "."],
        cwd=LAUNCHER_SOURCES,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeErrorWithHint(
            f"building FerretDB {FERRETDB_VERSION} (go build in {LAUNCHER_SOURCES}) failed "
            f"({result.returncode}):\n{result.stderr[-4000:]}"
        )
    partial.chmod(0o755)
    partial.replace(target)  # atomic: a killed build never leaves a half-written binary
    for old in CACHE_DIR.glob("ferretdb-launcher-*"):
        if old != target and ".partial-" not in old.name:
            old.unlink(missing_ok=True)
    return target, time.monotonic() - started


# -- the server --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DocServerStatus:
    running: bool
    pid: int | None
    port: int | None
    version: str
    backend_database: str
    log: Path

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


class EmbeddedFerretDB:
    """FerretDB beside one embedded PostgreSQL cluster. Every method is idempotent."""

    def __init__(self, postgres: EmbeddedPostgres, home: Path, *, port: int | None = None) -> None:
        self.postgres = postgres
        self.root = home / "docstore"
        self.state_file = self.root / "runtime.json"
        self.password_file = self.root / f"{ROLE}.password"
        self.log_file = self.root / "ferretdb.log"
        self.tls_dir = home / "tls"
        self.requested_port = port

    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save_state(self, **values: object) -> None:
        self.state_file.write_text(json.dumps({**self._state(), **values}, indent=2))

    @property
    def port(self) -> int | None:
        return self.requested_port or self._state().get("port")

    def password(self) -> str:
        if not self.password_file.exists():
            raise RuntimeErrorWithHint(
                f"The embedded document server under {self.root} was never started: run "
                "`stripe-platform up`."
            )
        return self.password_file.read_text().strip()

    def uri(self) -> str:
        """The MongoDB URI of the running server (TLS verified against the runtime's CA)."""
        port = self.port
        if port is None:
            raise RuntimeErrorWithHint(
                f"The embedded document server under {self.root} was never started: run "
                "`stripe-platform up`."
            )
        query = urlencode(
            {
                "tls": "true",
                "tlsCAFile": str(tls_files(self.tls_dir).ca_cert),
                "authMechanism": "PLAIN",
                "authSource": "$external",
                "directConnection": "true",
            }
        )
        return f"mongodb://{ROLE}:{quote(self.password(), safe='')}@127.0.0.1:{port}/?{query}"

    def _pid(self) -> int | None:
        """The launcher's pid if it is alive (and is really our launcher, not a reused pid)."""
        pid = self._state().get("pid")
        if not pid:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"ferretdb-launcher" in cmdline else None

    def status(self) -> DocServerStatus:
        pid = self._pid()
        return DocServerStatus(
            running=pid is not None,
            pid=pid,
            port=self.port,
            version=f"FerretDB {FERRETDB_VERSION}",
            backend_database=f"PostgreSQL database {BACKEND_DATABASE!r}",
            log=self.log_file,
        )

    def up(self) -> DocServerStatus:
        """Build if needed, prepare the backend database and role, start, wait until it answers."""
        if self._pid() is not None:
            return self.status()
        binary, _ = build_launcher()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._prepare_backend()
        port = self.requested_port or self._state().get("port")
        if port is None or (self.requested_port is None and port_in_use(port)):
            port = free_port()
        if port_in_use(port):
            raise RuntimeErrorWithHint(
                f"Port {port} on 127.0.0.1 is already in use; set "
                "STRIPE_PLATFORM_DOCSTORE_PORT to a free one."
            )
        tls = ensure_certificates(self.tls_dir)
        pg_url = f"postgres://127.0.0.1:{self.postgres.port}/{BACKEND_DATABASE}?" + urlencode(
            {"sslmode": "verify-full", "sslrootcert": str(tls.ca_cert)}
        )
        args = [
            str(binary),
            "-listen-addr=",  # no plain TCP: PLAIN authentication would send passwords in clear
            f"-listen-tls=127.0.0.1:{port}",
            f"-tls-cert-file={tls.server_cert}",
            f"-tls-key-file={tls.server_key}",
            f"-postgresql-url={pg_url}",
            "-log-level=warn",
        ]
        with self.log_file.open("ab") as log:
            os.chmod(self.log_file, 0o600)
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.root,
                start_new_session=True,  # not killed with the shell that started it
                env={**os.environ, "DO_NOT_TRACK": "1"},
            )
        self._save_state(pid=process.pid, port=port, binary=str(binary))
        self._wait_ready(process, port)
        return self.status()

    def _wait_ready(self, process: subprocess.Popen, port: int) -> None:
        context = ssl.create_default_context(cafile=str(tls_files(self.tls_dir).ca_cert))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeErrorWithHint(
                    f"FerretDB exited at start ({process.returncode}); its log "
                    f"{self.log_file}:\n{self._log_tail()}"
                )
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
                    context.wrap_socket(raw, server_hostname="127.0.0.1"),
                ):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.down()
                    raise RuntimeErrorWithHint(
                        f"FerretDB did not accept TLS connections on 127.0.0.1:{port} within "
                        f"{START_TIMEOUT_S:.0f} s; its log {self.log_file}:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.1)

    def _log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_file, lines)

    def down(self) -> bool:
        pid = self._pid()
        if pid is None:
            return False
        # A statement stuck in PostgreSQL can hold FerretDB's shutdown (SIGKILL then): its data
        # is in PostgreSQL.
        terminate(pid, lambda: self._pid() is not None, STOP_TIMEOUT_S, reap=lambda: _reap(pid))
        self._save_state(pid=None)
        return True

    def _prepare_backend(self) -> None:
        """The login role FerretDB passes clients through to, and the database it owns."""
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
            self.password_file.chmod(0o600)
        password = self.password()
        with psycopg.connect(self.postgres.conninfo("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            # The password is a statement literal here: statements are logged (log_statement =
            # all), so it is hashed first; PostgreSQL stores and compares the SCRAM verifier.
            verifier = conn.pgconn.encrypt_password(
                password.encode(), ROLE.encode(), b"scram-sha-256"
            ).decode()
            conn.execute(
                sql.SQL("{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                    sql.SQL(verb), sql.Identifier(ROLE), sql.Literal(verifier)
                )
            )
            if not conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (BACKEND_DATABASE,)
            ).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(BACKEND_DATABASE), sql.Identifier(ROLE)
                    )
                )
            # FerretDB pushes a keyed filter down as `_jsonb->$1 @> $2`, the field a bind
            # parameter: only a custom plan sees the field and can use the index that serves it
            # (docstore/ferretdb.py).
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET plan_cache_mode = force_custom_plan").format(
                    sql.Identifier(BACKEND_DATABASE)
                )
            )


def _reap(pid: int) -> None:
    """Collect the exit status of a launcher this process started (else it stays a zombie)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


if __name__ == "__main__":  # the bootstrap builds the binary up front: `python -m ...ferretdb`
    built, seconds = build_launcher()
    if seconds is None:
        print(f"FerretDB {FERRETDB_VERSION}: cached build {built}")
    else:
        print(f"FerretDB {FERRETDB_VERSION}: built {built} in {seconds:.1f} s")
