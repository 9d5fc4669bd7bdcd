"""Kafka beside the embedded PostgreSQL cluster: one Kafka 4.4 broker (KRaft, broker and controller
in one process), Kafka Connect standalone with the Debezium PostgreSQL connector, all on 127.0.0.1.

The jars come from Maven Central through the project's own pom (``kafka_stack/pom.xml``): Maven
copies them once into ``<repo>/.cache/kafka/<digest of the pom>/`` (``libs/`` for the broker,
``connect/`` for the Connect worker, ``plugins/debezium-connector-postgres/`` for the connector,
without the jars Connect provides), so a changed pom fetches a new set and an unchanged one never
fetches again. Java 17+ runs them; Maven is needed only for the first fetch. The worker is Kafka
Connect 4.3 (:data:`CONNECT_VERSION`): Debezium 3.6 fails on a 4.4 worker (pom.xml says why).

State and logs live under ``<home>/kafka/`` (``runtime.json``: pids, ports, cluster id;
``broker.log``, ``connect.log``). The connector's login is a PostgreSQL role of its own
(:data:`CDC_ROLE`: LOGIN REPLICATION, writing only Debezium's heartbeat table); its password reaches Connect through a file
config provider, never through the connector's configuration or its REST answers.

On compose and prod the broker and Connect are services (docker-compose.yml); ``stripe-platform
kafka up --connect-url`` registers the same connector with that Connect.

TLS only: the broker's listeners (clients and the KRaft controller) are SSL and Connect's REST API is
https, with the runtime's certificate (``runtime/tls.py``); every client (librdkafka's here and in
``streaming/kafka.py``, Connect's worker, this module's REST calls) verifies it against the CA
(:func:`client_tls`), and the connector reaches PostgreSQL with ``sslmode=verify-full``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from stripe_platform.config import Settings
from stripe_platform.paths import REPO_ROOT
from stripe_platform.runtime.postgres import RuntimeErrorWithHint, free_port, port_in_use
from stripe_platform.runtime.processes import log_tail, terminate
from stripe_platform.runtime.tls import (
    ca_file,
    ensure_certificates,
    pem_keystore,
    pkcs12_keystore,
    tls_files,
)
from stripe_platform.streaming import debezium

KAFKA_VERSION = "4.4.0"
CONNECT_VERSION = "4.3.1"  # the Kafka Debezium is built against (pom.xml says why)
DEBEZIUM_VERSION = "3.6.1.Final"
POM = Path(__file__).parent / "kafka_stack" / "pom.xml"
CACHE_DIR = REPO_ROOT / ".cache" / "kafka"
PLUGIN_DIR = "debezium-connector-postgres"
MIN_JAVA = 17
CDC_ROLE = "stripe_cdc"
BROKER_HEAP = ("-Xms512m", "-Xmx1g")
CONNECT_HEAP = ("-Xms256m", "-Xmx768m")
BROKER_START_TIMEOUT_S = 120.0
CONNECT_START_TIMEOUT_S = 180.0
CONNECTOR_START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
JAVA_HINT = (
    f"The Kafka stack (Kafka {KAFKA_VERSION}, Debezium {DEBEZIUM_VERSION}) needs Java >= {MIN_JAVA} "
    "(Debian: apt-get install openjdk-17-jre-headless; or set JAVA_HOME)"
)
MAVEN_HINT = (
    "The Kafka stack's jars are fetched once by Maven from the project's pom "
    f"({POM.relative_to(REPO_ROOT)}): install Maven (Debian: apt-get install maven) or run "
    "`make bootstrap`"
)


# -- the jars ----------------------------------------------------------------------------------------
def pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()[:16]


def jars_dir() -> Path:
    return CACHE_DIR / pom_digest()


def _java_home_candidates() -> list[Path]:
    found: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        found.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    on_path = shutil.which("java")
    if on_path:
        found.append(Path(on_path))
    found.extend(sorted(Path("/usr/lib/jvm").glob("*/bin/java")))
    return found


def java_major(java: Path) -> int | None:
    result = subprocess.run(
        [str(java), "-version"], capture_output=True, text=True, check=False, timeout=60
    )
    found = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not found:
        return None
    major = int(found[1])
    return int(found[2] or 0) if major == 1 else major  # "1.8.0" is Java 8


def find_java() -> Path:
    """A Java 17+ runtime: JAVA_HOME, then PATH, then /usr/lib/jvm."""
    seen: list[str] = []
    for candidate in _java_home_candidates():
        if not candidate.is_file():
            continue
        major = java_major(candidate)
        if major is not None and major >= MIN_JAVA:
            return candidate
        seen.append(f"{candidate} (Java {major})")
    where = f"found only {', '.join(seen)}" if seen else "no java found"
    raise RuntimeErrorWithHint(f"{JAVA_HINT}: {where}.")


def fetch_jars(*, force: bool = False) -> tuple[Path, float | None]:
    """The directory of the stack's jars, fetched first if missing. Returns it and the fetch's
    seconds (None when the cached one was used)."""
    target = jars_dir()
    if target.is_dir() and not force:  # made whole by one rename, below
        return target, None
    java = find_java()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeErrorWithHint(f"Maven (mvn) was not found on PATH. {MAVEN_HINT}.")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = CACHE_DIR / f"{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    env = {**os.environ, "JAVA_HOME": str(java.resolve().parents[1])}
    started = time.monotonic()
    for profile, output in (
        ("kafka", partial / "libs"),
        ("connect", partial / "connect"),
        ("debezium", partial / "plugins" / PLUGIN_DIR),
    ):
        result = subprocess.run(
            [
                mvn,
                "--batch-mode",
                "--quiet",
                "--file",
                str(POM),
                f"--activate-profiles={profile}",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={output}",
            ],
            cwd=CACHE_DIR,
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeErrorWithHint(
                f"fetching the Kafka stack's jars ({profile}: mvn dependency:copy-dependencies "
                f"on {POM}) failed ({result.returncode}):\n"
                f"{(result.stdout + result.stderr)[-4000:]}"
            )
    if target.exists():
        if not force:  # another process fetched the same set meanwhile
            shutil.rmtree(partial, ignore_errors=True)
            return target, time.monotonic() - started
        shutil.rmtree(target)
    partial.rename(target)  # atomic: a killed fetch never leaves a half-filled directory
    for old in CACHE_DIR.iterdir():
        if old != target and old.is_dir() and ".partial-" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return target, time.monotonic() - started


# -- the processes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class KafkaStatus:
    broker_running: bool
    broker_pid: int | None
    bootstrap_servers: str | None
    connect_running: bool
    connect_pid: int | None
    connect_url: str | None
    connectors: dict[str, Any] = field(default_factory=dict)
    versions: str = (
        f"Kafka {KAFKA_VERSION} (Connect {CONNECT_VERSION}), Debezium {DEBEZIUM_VERSION}"
    )
    root: Path | None = None

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


LOG4J = """# Written by stripe-platform; Kafka and Connect log here through log4j2 (slf4j binding).
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = %d{ISO8601} %-5p [%t] %c{1}: %m%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.clients.name = org.apache.kafka.clients
logger.clients.level = warn
logger.state.name = state.change.logger
logger.state.level = warn
logger.raft.name = org.apache.kafka.raft
logger.raft.level = warn
logger.log.name = kafka.log
logger.log.level = warn
logger.storage.name = org.apache.kafka.storage
logger.storage.level = warn
logger.coordinator.name = org.apache.kafka.coordinator
logger.coordinator.level = warn
logger.reflections.name = org.reflections
logger.reflections.level = error
"""


class KafkaStack:
    """One broker and one Connect worker under ``<home>/kafka``. Every method is idempotent."""

    def __init__(self, home: Path) -> None:
        self.root = home / "kafka"
        self.state_file = self.root / "runtime.json"
        self.broker_dir = self.root / "broker"
        self.connect_dir = self.root / "connect"
        self.broker_log = self.root / "broker.log"
        self.connect_log = self.root / "connect.log"
        self.secrets_file = self.root / "secrets.properties"
        self.tls_dir = home / "tls"
        self._children: dict[int, subprocess.Popen] = {}

    # -- state -----------------------------------------------------------------------------------
    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save_state(self, **values: object) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({**self._state(), **values}, indent=2))

    def _pid(self, role: str) -> int | None:
        """The pid of our ``role`` process if it is alive (and really ours: a pid is reused)."""
        pid = self._state().get(f"{role}_pid")
        if not pid:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            self._reap(pid)
            return None
        return pid if self._marker(role).encode() in cmdline else None

    def _marker(self, role: str) -> str:
        return f"-Dstripe.platform.kafka={self.root}:{role}"

    @property
    def bootstrap_servers(self) -> str | None:
        port = self._state().get("broker_port")
        return f"127.0.0.1:{port}" if port else None

    @property
    def connect_url(self) -> str | None:
        port = self._state().get("rest_port")
        return f"https://127.0.0.1:{port}" if port else None

    @property
    def ca(self) -> Path:
        """The CA the broker's and Connect's certificate is verified against."""
        return tls_files(self.tls_dir).ca_cert

    def status(self) -> KafkaStatus:
        broker, connect = self._pid("broker"), self._pid("connect")
        connectors: dict[str, Any] = {}
        if connect is not None and self.connect_url:
            with contextlib.suppress(RuntimeErrorWithHint):
                for name in list_connectors(self.connect_url, ca=self.ca):
                    connectors[name] = connector_state(self.connect_url, name, ca=self.ca)
        return KafkaStatus(
            broker_running=broker is not None,
            broker_pid=broker,
            bootstrap_servers=self.bootstrap_servers,
            connect_running=connect is not None,
            connect_pid=connect,
            connect_url=self.connect_url,
            connectors=connectors,
            root=self.root,
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def up(self) -> KafkaStatus:
        """Fetch the jars if needed, format the broker's storage on first use, start the broker
        and the Connect worker, wait until both answer."""
        jars, _ = fetch_jars()
        java = find_java()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # the secrets file and the connector's offsets live here
        (self.root / "log4j2.properties").write_text(LOG4J)
        if not self.secrets_file.exists():
            self.secrets_file.write_text("")
        self.secrets_file.chmod(0o600)
        ensure_certificates(self.tls_dir)
        if self._pid("broker") is None:
            self._start_broker(java, jars)
        if self._pid("connect") is None:
            self._start_connect(java, jars)
        return self.status()

    def _port(self, key: str) -> int:
        """The port of the last start when it is still free, else a free one."""
        port = self._state().get(key)
        if port is None or port_in_use(port):
            port = free_port()
        return port

    def _java(self, java: Path, classpath: Path, role: str, heap: tuple[str, ...]) -> list[str]:
        return [
            str(java),
            *heap,
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
            self._marker(role),
            "-cp",
            str(classpath / "*"),
        ]

    def _spawn(self, args: list[str], log: Path, role: str, **state: object) -> subprocess.Popen:
        with log.open("ab") as out:
            os.chmod(log, 0o600)
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self.root,
                start_new_session=True,  # not killed with the shell that started it
            )
        self._children[process.pid] = process
        self._save_state(**{f"{role}_pid": process.pid}, **state)
        return process

    def _start_broker(self, java: Path, jars: Path) -> None:
        broker_port, controller_port = self._port("broker_port"), self._port("controller_port")
        while controller_port == broker_port:
            controller_port = free_port()
        data = self.broker_dir / "data"
        self.broker_dir.mkdir(parents=True, exist_ok=True)
        properties = self.broker_dir / "server.properties"
        tls = tls_files(self.tls_dir)
        keystore = pem_keystore(tls, self.broker_dir / "server.pem")
        properties.write_text(
            "# Written by stripe-platform on every start; edit runtime/kafka.py, not this file.\n"
            + _properties(
                {
                    "process.roles": "broker,controller",
                    "node.id": "1",
                    "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
                    # TLS only, the controller's listener too; no client certificates (the
                    # broker has no ACLs: it listens on 127.0.0.1 only).
                    "listeners": (
                        f"SSL://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}"
                    ),
                    "advertised.listeners": f"SSL://127.0.0.1:{broker_port}",
                    "controller.listener.names": "CONTROLLER",
                    "inter.broker.listener.name": "SSL",
                    "listener.security.protocol.map": "SSL:SSL,CONTROLLER:SSL",
                    "ssl.keystore.type": "PEM",
                    "ssl.keystore.location": str(keystore),
                    "ssl.truststore.type": "PEM",
                    "ssl.truststore.location": str(tls.ca_cert),
                    "ssl.client.auth": "none",
                    "ssl.endpoint.identification.algorithm": "https",
                    "ssl.enabled.protocols": "TLSv1.3,TLSv1.2",
                    "log.dirs": str(data),
                    "num.partitions": "1",
                    # One node: every internal topic has one replica.
                    "offsets.topic.replication.factor": "1",
                    "offsets.topic.num.partitions": "4",
                    "transaction.state.log.replication.factor": "1",
                    "transaction.state.log.min.isr": "1",
                    "transaction.state.log.num.partitions": "4",
                    "share.coordinator.state.topic.replication.factor": "1",
                    "share.coordinator.state.topic.min.isr": "1",
                    "default.replication.factor": "1",
                    "min.insync.replicas": "1",
                    # A consumer group's first member starts at once, not after 3 s.
                    "group.initial.rebalance.delay.ms": "0",
                    "log.retention.hours": "24",
                    "log.segment.bytes": str(64 * 1024 * 1024),
                }
            )
        )
        if not (data / "meta.properties").exists():
            cluster_id = self._state().get("cluster_id") or _cluster_id()
            self._save_state(cluster_id=cluster_id)
            result = subprocess.run(
                [
                    *self._java(java, jars / "libs", "format", ("-Xmx256m",)),
                    "kafka.tools.StorageTool",
                    "format",
                    "--ignore-formatted",
                    "--cluster-id",
                    cluster_id,
                    "--config",
                    str(properties),
                ],
                capture_output=True,
                text=True,
                check=False,
                cwd=self.root,
            )
            if result.returncode != 0:
                raise RuntimeErrorWithHint(
                    f"formatting the Kafka broker's storage in {data} failed "
                    f"({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}"
                )
        process = self._spawn(
            [
                *self._java(java, jars / "libs", "broker", BROKER_HEAP),
                "kafka.Kafka",
                str(properties),
            ],
            self.broker_log,
            "broker",
            broker_port=broker_port,
            controller_port=controller_port,
            jars=str(jars),
        )
        self._wait_broker(process)

    def _wait_broker(self, process: subprocess.Popen) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            {"bootstrap.servers": self.bootstrap_servers, "log_level": 0, **client_tls(self.ca)}
        )
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeErrorWithHint(
                    f"the Kafka broker exited at start ({process.returncode}); its log "
                    f"{self.broker_log}:\n{_tail(self.broker_log)}"
                )
            with contextlib.suppress(KafkaException):  # until the broker answers
                if admin.list_topics(timeout=2).brokers:
                    return
            if time.monotonic() > deadline:
                self.down()
                raise RuntimeErrorWithHint(
                    f"the Kafka broker did not answer on {self.bootstrap_servers} within "
                    f"{BROKER_START_TIMEOUT_S:.0f} s; its log {self.broker_log}:\n"
                    f"{_tail(self.broker_log)}"
                )
            time.sleep(0.2)

    def _start_connect(self, java: Path, jars: Path) -> None:
        rest_port = self._port("rest_port")
        self.connect_dir.mkdir(parents=True, exist_ok=True)
        tls = tls_files(self.tls_dir)
        # Jetty reads no PEM: the REST listener's key is a PKCS#12 file, its password made here
        # (the worker's file is as private as the key's).
        password = secrets.token_urlsafe(24)
        keystore = pkcs12_keystore(tls, self.connect_dir / "rest.p12", password)
        # The worker's clients (its own, and the producer/consumer/admin of the connector's task)
        # reach the broker over TLS, verified against the CA.
        to_broker = {
            "security.protocol": "SSL",
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(tls.ca_cert),
            "ssl.endpoint.identification.algorithm": "https",
        }
        worker = self.connect_dir / "worker.properties"
        worker.touch(mode=0o600)
        worker.chmod(0o600)
        worker.write_text(
            "# Written by stripe-platform on every start; edit runtime/kafka.py, not this file.\n"
            + _properties(
                {
                    "bootstrap.servers": self.bootstrap_servers or "",
                    **to_broker,
                    **{
                        f"{c}.{k}": v
                        for c in ("producer", "consumer", "admin")
                        for k, v in to_broker.items()
                    },
                    # https only; the listener's own ssl settings (the prefix: Connect then ignores
                    # the worker's PEM truststore above, which Jetty could not read).
                    "listeners": f"https://127.0.0.1:{rest_port}",
                    "listeners.https.ssl.keystore.type": "PKCS12",
                    "listeners.https.ssl.keystore.location": str(keystore),
                    "listeners.https.ssl.keystore.password": password,
                    "listeners.https.ssl.key.password": password,
                    "listeners.https.ssl.client.auth": "none",
                    "listeners.https.ssl.enabled.protocols": "TLSv1.3,TLSv1.2",
                    "rest.advertised.host.name": "127.0.0.1",
                    "rest.advertised.port": str(rest_port),
                    "plugin.path": str(jars / "plugins"),
                    # Plugins declare themselves in META-INF/services: no class-path scan at start.
                    "plugin.discovery": "service_load",
                    # Standalone: the connector's position (the LSN it confirmed) in a file.
                    "offset.storage.file.filename": str(self.connect_dir / "offsets.dat"),
                    # The slot's confirmed position follows the file's: flush often.
                    "offset.flush.interval.ms": "1000",
                    "key.converter": debezium.JSON_CONVERTER,
                    "value.converter": debezium.JSON_CONVERTER,
                    "key.converter.schemas.enable": "false",
                    "value.converter.schemas.enable": "false",
                    # Secrets are read from a file at start: never in a connector's config.
                    "config.providers": "file",
                    "config.providers.file.class": (
                        "org.apache.kafka.common.config.provider.FileConfigProvider"
                    ),
                }
            )
        )
        process = self._spawn(
            [
                *self._java(java, jars / "connect", "connect", CONNECT_HEAP),
                "org.apache.kafka.connect.cli.ConnectStandalone",
                str(worker),
            ],
            self.connect_log,
            "connect",
            rest_port=rest_port,
        )
        self._wait_connect(process)

    def _wait_connect(self, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + CONNECT_START_TIMEOUT_S
        assert self.connect_url is not None
        while True:
            if process.poll() is not None:
                raise RuntimeErrorWithHint(
                    f"Kafka Connect exited at start ({process.returncode}); its log "
                    f"{self.connect_log}:\n{_tail(self.connect_log)}"
                )
            try:
                health = f"{self.connect_url}/health"  # https on 127.0.0.1, built here
                context = ssl.create_default_context(cafile=str(self.ca))
                with urllib.request.urlopen(health, timeout=2, context=context) as answer:  # noqa: S310
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass  # not listening yet, or 503 while the worker starts
            if time.monotonic() > deadline:
                self.down()
                raise RuntimeErrorWithHint(
                    f"Kafka Connect did not become ready on {self.connect_url} within "
                    f"{CONNECT_START_TIMEOUT_S:.0f} s; its log {self.connect_log}:\n"
                    f"{_tail(self.connect_log)}"
                )
            time.sleep(0.2)

    def set_secret(self, key: str, value: str) -> str:
        """Store a secret for connectors; returns the reference a connector config carries."""
        lines = {}
        if self.secrets_file.exists():
            for line in self.secrets_file.read_text().splitlines():
                name, _, rest = line.partition("=")
                if name:
                    lines[name] = rest
        lines[key] = value
        self.secrets_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        self.secrets_file.chmod(0o600)
        return "${file:" + str(self.secrets_file) + ":" + key + "}"

    def down(self) -> bool:
        """Stop Connect (its task flushes the connector's position), then the broker."""
        stopped = False
        for role in ("connect", "broker"):
            pid = self._pid(role)
            if pid is None:
                continue
            stopped = True
            # A shutdown stuck on an unreachable peer is killed: the data is on disk (broker) or
            # re-read from the slot (connector).
            terminate(
                pid,
                lambda role=role: self._pid(role) is not None,
                STOP_TIMEOUT_S,
                reap=lambda pid=pid: self._reap(pid),
            )
            self._save_state(**{f"{role}_pid": None})
        return stopped

    def _reap(self, pid: int) -> None:
        """Collect the exit status of a process this one started (else it stays a zombie)."""
        process = self._children.pop(pid, None)
        if process is not None:
            if process.poll() is None:
                self._children[pid] = process
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    # -- connectors ------------------------------------------------------------------------------
    def forget_positions(self) -> None:
        """Drop the connectors' stored positions (standalone keeps them in a file): for a stopped
        stack whose slots were dropped, so a new slot is not matched with an old position."""
        if self._pid("connect") is not None:
            raise RuntimeErrorWithHint("stop Kafka Connect before forgetting its positions")
        (self.connect_dir / "offsets.dat").unlink(missing_ok=True)

    def delete(self, name: str) -> bool:
        if self.connect_url is None or self._pid("connect") is None:
            return False
        return delete_connector(self.connect_url, name, ca=self.ca)


# -- TLS to the broker --------------------------------------------------------------------------------
def client_tls(ca: Path) -> dict[str, str]:
    """librdkafka's settings for a broker that speaks TLS only, verified against ``ca`` (its
    certificate's name must match the host of the bootstrap address)."""
    return {
        "security.protocol": "ssl",
        "ssl.ca.location": str(ca),
        "ssl.endpoint.identification.algorithm": "https",
    }


def client_config(settings: Settings) -> dict[str, str]:
    """``bootstrap.servers`` and TLS for a client of the platform's brokers."""
    return {"bootstrap.servers": bootstrap_servers(settings), **client_tls(ca_file(settings))}


# -- Connect's REST API (any Connect: this stack's or compose's) --------------------------------------
def _rest(
    base: str, method: str, path: str, body: object | None = None, *, ca: Path | None = None
) -> Any:
    """One call to Connect's REST API, https only (the platform's Connect and compose's
    verified against ``ca``: a plain http:// URL is refused, it would carry connector configs)."""
    data = None if body is None else json.dumps(body).encode()
    if not base.startswith("https://"):
        raise RuntimeErrorWithHint(f"Kafka Connect's URL must be https://..., not {base!r}")
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    request = urllib.request.Request(  # noqa: S310 - http(s) only (checked above)
        base.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as answer:  # noqa: S310
            text = answer.read().decode()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError):
            detail = json.loads(detail).get("message", detail)
        raise RuntimeErrorWithHint(
            f"Kafka Connect at {base} answered {exc.code} to {method} {path}: {detail}"
        ) from None
    except (OSError, urllib.error.URLError) as exc:
        raise RuntimeErrorWithHint(f"Kafka Connect at {base} cannot be reached: {exc}") from None
    return json.loads(text) if text.strip() else None


def validate(base: str, config: Mapping[str, str], *, ca: Path | None = None) -> list[str]:
    """Connect's own check of a connector configuration: ``key: message`` per refused value."""
    plugin = config["connector.class"].rsplit(".", 1)[-1]
    answer = _rest(base, "PUT", f"/connector-plugins/{plugin}/config/validate", dict(config), ca=ca)
    problems = []
    for entry in answer.get("configs", []):
        value = entry.get("value") or {}
        for message in value.get("errors") or []:
            problems.append(f"{value.get('name')}: {message}")
    return problems


def list_connectors(base: str, *, ca: Path | None = None) -> list[str]:
    return list(_rest(base, "GET", "/connectors", ca=ca) or [])


def connector_state(base: str, name: str, *, ca: Path | None = None) -> dict:
    """``{"connector": state, "tasks": [state, ...], "trace": first task trace line or None}``."""
    answer = _rest(base, "GET", f"/connectors/{name}/status", ca=ca)
    tasks = answer.get("tasks", [])
    traces = [t.get("trace") for t in tasks if t.get("trace")]
    trace = answer.get("connector", {}).get("trace") or (traces[0] if traces else None)
    return {
        "connector": answer.get("connector", {}).get("state"),
        "tasks": [t.get("state") for t in tasks],
        "trace": trace,
    }


def failure_cause(trace: str | None) -> str:
    """The innermost 'Caused by' of a Java stack trace: what actually went wrong."""
    if not trace:
        return "(no trace)"
    causes = [line for line in trace.splitlines() if line.startswith("Caused by:")]
    return (causes[-1] if causes else trace.splitlines()[0]).strip()


def deploy_connector(
    base: str, name: str, config: Mapping[str, str], *, ca: Path | None = None
) -> dict:
    problems = validate(base, {**config, "name": name}, ca=ca)
    if problems:
        raise RuntimeErrorWithHint(
            f"Kafka Connect refuses the configuration of connector {name!r}: " + "; ".join(problems)
        )
    _rest(base, "PUT", f"/connectors/{name}/config", {**config, "name": name}, ca=ca)
    deadline = time.monotonic() + CONNECTOR_START_TIMEOUT_S
    while True:
        try:
            state = connector_state(base, name, ca=ca)
        except RuntimeErrorWithHint:
            state = {"connector": None, "tasks": [], "trace": None}  # 404 until it is created
        if "FAILED" in (state["connector"], *state["tasks"]):
            raise RuntimeErrorWithHint(
                f"connector {name!r} failed at start: {failure_cause(state['trace'])}"
            )
        if (
            state["connector"] == "RUNNING"
            and state["tasks"]
            and set(state["tasks"]) == {"RUNNING"}
        ):
            return state
        if time.monotonic() > deadline:
            raise RuntimeErrorWithHint(
                f"connector {name!r} was not running after {CONNECTOR_START_TIMEOUT_S:.0f} s "
                f"(state {state})"
            )
        time.sleep(0.2)


def delete_connector(base: str, name: str, *, ca: Path | None = None) -> bool:
    try:
        _rest(base, "DELETE", f"/connectors/{name}", ca=ca)
    except RuntimeErrorWithHint as exc:
        if " 404 " in str(exc):
            return False
        raise
    return True


# -- the embedded profile: the stack beside the embedded cluster --------------------------------------
def embedded_stack(settings: Settings) -> KafkaStack:
    return KafkaStack(settings.home_dir)


def bootstrap_servers(settings: Settings) -> str:
    """The brokers a client uses: the setting, else the embedded stack's running broker."""
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    stack = embedded_stack(settings)
    if settings.profile == "embedded" and stack._pid("broker") is not None:
        servers = stack.bootstrap_servers
        assert servers is not None
        return servers
    raise RuntimeErrorWithHint(
        "no Kafka broker: set STRIPE_PLATFORM_KAFKA_BOOTSTRAP_SERVERS, or start the embedded "
        "stack with `stripe-platform kafka up`"
    )


def _cdc_login(settings: Settings, stack: KafkaStack) -> str:
    """The connector's PostgreSQL login (REPLICATION, no privilege on the platform's tables:
    pgoutput sends a publication's rows whatever the login may read); returns the
    reference to its password in the stack's secrets file."""
    from stripe_platform.oltp import db

    password_file = stack.root / f"{CDC_ROLE}.password"
    if not password_file.exists():
        password_file.write_text(secrets.token_urlsafe(24) + "\n")
        password_file.chmod(0o600)
    password = password_file.read_text().strip()
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (CDC_ROLE,)).fetchone()
        # Statements are logged (log_statement = all): the password travels as its SCRAM verifier.
        verifier = conn.pgconn.encrypt_password(
            password.encode(), CDC_ROLE.encode(), b"scram-sha-256"
        ).decode()
        conn.execute(
            sql.SQL(
                "{} ROLE {} LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}"
            ).format(
                sql.SQL("ALTER" if exists else "CREATE"),
                sql.Identifier(CDC_ROLE),
                sql.Literal(verifier),
            )
        )
    return stack.set_secret(f"{CDC_ROLE}.password", password)


@dataclass(frozen=True)
class Attached:
    """A connector following one database: what its consumers need."""

    name: str
    database: str
    slot: str
    bootstrap_servers: str
    topics: dict[str, str]
    heartbeat_topic: str
    dead_letter_topic: str


def attach(
    settings: Settings,
    stack: KafkaStack | None = None,
    *,
    connect_url: str | None = None,
    database: str | None = None,
    heartbeat_ms: int = debezium.HEARTBEAT_MS,
    extra: Mapping[str, str] | None = None,
) -> Attached:
    """Point a Debezium connector at ``database`` (default: the OLTP database): the publication,
    the connector; returns once its slot is streaming.

    With ``stack`` (the embedded profile) the connector logs in as :data:`CDC_ROLE`, its password
    in the stack's secrets file. With ``connect_url`` (compose, prod) it logs in as the platform's
    DSN says, from the Connect service, which must reach the same host and CA file."""
    from stripe_platform.oltp import db

    database = database or settings.pg_database
    conninfo = db.conninfo(settings, database=database, with_key=False)
    password_ref = None
    login = None
    if stack is not None:
        password_ref = _cdc_login(settings, stack)
        login = CDC_ROLE
        params = conninfo_to_dict(conninfo)
        params.update(user=CDC_ROLE, password="")
        conninfo = make_conninfo(**params)
        if stack.connect_url is None or stack._pid("connect") is None:
            raise RuntimeErrorWithHint(
                "Kafka Connect is not running: run `stripe-platform kafka up`"
            )
        connect_url = stack.connect_url
    if connect_url is None:
        raise ValueError("attach needs the embedded stack or a Connect URL")
    with db.connect(settings, database=database, autocommit=True) as conn:
        debezium.ensure_publication(conn, login)
    config = debezium.connector_config(
        settings, conninfo, password=password_ref, heartbeat_ms=heartbeat_ms, extra=extra
    )
    servers = stack.bootstrap_servers if stack is not None else settings.kafka_bootstrap_servers
    ca = stack.ca if stack is not None else ca_file(settings)
    if servers:
        ensure_topics(servers, debezium.topics(settings).values(), ca=ca)
    name = debezium.connector_name(settings, database)
    deploy_connector(connect_url, name, config, ca=ca)
    slot = debezium.slot_name(database)
    _wait_slot_active(settings, database, slot, name)
    return Attached(
        name=name,
        database=database,
        slot=slot,
        bootstrap_servers=servers or "",
        topics=debezium.topics(settings),
        heartbeat_topic=debezium.heartbeat_topic(settings),
        dead_letter_topic=debezium.dead_letter_topic(settings),
    )


def ensure_topics(
    servers: str,
    topics: Iterable[str],
    *,
    ca: Path,
    partitions: int = debezium.PARTITIONS,
    replication_factor: int = 1,
) -> None:
    """Create the change topics up front (Connect would only at the first change): a consumer
    subscribed before any change then gets its partitions at once, and they are partitioned as
    the platform says whatever Connect's topic creation is set to. Existing topics are kept."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": servers, **client_tls(ca)})
    futures = admin.create_topics(
        [NewTopic(t, partitions, replication_factor) for t in topics], request_timeout=30
    )
    for topic, future in futures.items():
        try:
            future.result(timeout=60)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeErrorWithHint(f"creating topic {topic!r} failed: {exc}") from None


def _wait_slot_active(settings: Settings, database: str, slot: str, name: str) -> None:
    """A running task has created its slot; changes committed from then on are captured. Wait
    until the slot is held by the connector's replication connection."""
    from stripe_platform.oltp import db

    deadline = time.monotonic() + CONNECTOR_START_TIMEOUT_S
    with db.connect(settings, database=database, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if row is not None and row[0]:
                return
            if time.monotonic() > deadline:
                raise RuntimeErrorWithHint(
                    f"connector {name!r} runs but its slot {slot!r} in {database!r} is "
                    f"{'missing' if row is None else 'not in use'}"
                )
            time.sleep(0.1)


def detach(
    settings: Settings,
    stack: KafkaStack | None = None,
    database: str | None = None,
    *,
    connect_url: str | None = None,
) -> bool:
    """Remove the connector following ``database`` and drop its slot (an unread slot holds WAL).
    Returns whether a connector was removed."""
    from stripe_platform.oltp import db

    database = database or settings.pg_database
    embedded = stack is not None and stack._pid("connect") is not None
    url = stack.connect_url if embedded and stack is not None else connect_url
    ca = stack.ca if embedded and stack is not None else ca_file(settings)
    removed = bool(url) and delete_connector(
        url, debezium.connector_name(settings, database), ca=ca
    )
    slot = debezium.slot_name(database)
    with db.connect(settings, database=database, autocommit=True) as conn:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while True:
            row = conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if row is None:
                return removed
            if not row[0]:
                with contextlib.suppress(psycopg.errors.UndefinedObject):
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return removed
            if time.monotonic() > deadline:
                raise RuntimeErrorWithHint(
                    f"slot {slot!r} is still in use after its connector's removal"
                )
            time.sleep(0.1)


def _cluster_id() -> str:
    """A KRaft cluster id (a Kafka Uuid: 16 random bytes, base64url without padding), made here
    rather than by one more JVM start (StorageTool random-uuid)."""
    while True:
        value = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not value.startswith("-"):  # Kafka refuses ids that read as command-line flags
            return value


def _properties(values: Mapping[str, str]) -> str:
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("\n", "\\n")

    return "".join(f"{key}={escape(value)}\n" for key, value in values.items())


def _tail(path: Path, lines: int = 30) -> str:
    return log_tail(path, lines)


if __name__ == "__main__":  # the bootstrap fetches the jars up front: `python -m ...kafka`
    found, seconds = fetch_jars()
    if seconds is None:
        print(f"Kafka {KAFKA_VERSION} + Debezium {DEBEZIUM_VERSION}: cached jars {found}")
    else:
        print(
            f"Kafka {KAFKA_VERSION} + Debezium {DEBEZIUM_VERSION}: fetched {found} in {seconds:.1f} s"
        )
