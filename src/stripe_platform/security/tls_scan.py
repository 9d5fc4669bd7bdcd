"""The TLS scan: every TCP port the platform's own servers listen on must refuse plaintext and
complete a TLS handshake verified against the platform's CA (issue 20, "TLS everywhere").

Which ports: the processes the runtime started and knows by pid (the embedded PostgreSQL, the
document server, the Kafka broker and Kafka Connect) and the servers that record themselves under
``<home>/run/servers/`` (:func:`record_server`: the API, Airflow), with their child processes;
every LISTEN socket those processes hold is read from ``/proc/<pid>/fd`` and ``/proc/net/tcp{,6}``,
so a port nobody declared (a debug or log server) is scanned too. Where ``/proc/<pid>/fd`` cannot
be read (a server running as another OS user), the port the runtime recorded is scanned.

How each port is judged, with the protocol its owner speaks:

- plaintext: a first message in clear (PostgreSQL's startup packet without SSLRequest, MongoDB's
  ``hello`` as OP_MSG, an HTTP ``GET /``, Kafka's ApiVersions). Refused when the server answers
  with no protocol message: it closes, sends a TLS alert, or PostgreSQL rejects the
  connection for want of encryption. An answer in the protocol means plaintext is served.
- TLS: a handshake verified against the CA (chain and host name), then the same first message
  over it, whose answer shows the protocol is really behind the TLS.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.runtime.tls import ca_file

Protocol = Literal["postgres", "mongo", "http", "kafka"]
PROTOCOLS: tuple[Protocol, ...] = ("postgres", "mongo", "http", "kafka")
TIMEOUT_S = 3.0
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column
_WILDCARDS = frozenset({"0.0.0.0", "::"})  # noqa: S104 - addresses read, never bound


class TlsScanError(PlatformError, ValueError):
    """A server record the scan cannot use (unknown protocol, bad name)."""


@dataclass(frozen=True)
class Listener:
    """One listening port of a platform server, and the protocol spoken on it."""

    name: str
    port: int
    protocol: Protocol
    host: str = "127.0.0.1"
    pid: int | None = None


@dataclass(frozen=True)
class PortResult:
    name: str
    host: str
    port: int
    protocol: Protocol
    pid: int | None
    tls_ok: bool
    plaintext_refused: bool
    detail: str

    @property
    def ok(self) -> bool:
        return self.tls_ok and self.plaintext_refused

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


# -- servers that record themselves ------------------------------------------------------------------
def _run_dir(settings: Settings) -> Path:
    return settings.home_dir / "run" / "servers"


def record_server(
    settings: Settings, name: str, protocol: Protocol, pid: int | None = None
) -> Path:
    """Declare a running server of the platform to the scan (``pid`` default: this process).
    Its record is dropped by :func:`forget_server` or ignored once the pid is gone."""
    if protocol not in PROTOCOLS:
        raise TlsScanError(f"server {name!r}: unknown protocol {protocol!r} (one of {PROTOCOLS})")
    if not name or "/" in name or name.startswith("."):
        raise TlsScanError(f"server name {name!r} cannot name a record file")
    directory = _run_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    record = directory / f"{name}.json"
    pid = os.getpid() if pid is None else pid
    record.write_text(json.dumps({"name": name, "protocol": protocol, "pid": pid}))
    return record


def forget_server(settings: Settings, name: str) -> None:
    (_run_dir(settings) / f"{name}.json").unlink(missing_ok=True)


def _recorded(settings: Settings) -> list[tuple[str, Protocol, int]]:
    found = []
    for record in sorted(_run_dir(settings).glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(record.read_text())
            if _alive(int(data["pid"])):
                found.append((str(data["name"]), data["protocol"], int(data["pid"])))
            else:
                record.unlink(missing_ok=True)  # the server is gone: its record too
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


# -- ports from /proc ----------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn's workers, standalone's components)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _socket_inodes(pid: int) -> set[str] | None:
    """The socket inodes ``pid`` holds; None when its fds cannot be read (another OS user)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return None
    return inodes


def _decode_address(hex_address: str) -> str:
    if len(hex_address) == 8:  # IPv4, little-endian
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_address)[::-1])
    raw = bytes.fromhex(hex_address)  # IPv6: four little-endian 32-bit words
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_sockets() -> dict[str, tuple[str, int]]:
    """inode -> (address, port) of every TCP socket in LISTEN on this machine."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _LISTEN:
                    address, port = fields[1].rsplit(":", 1)
                    found[fields[9]] = (_decode_address(address), int(port, 16))
    return found


def _connect_host(address: str) -> str:
    """Where to reach a listener: its own address, 127.0.0.1 for a wildcard one, the IPv4 address
    of an IPv4-mapped one (the certificate names 127.0.0.1 and localhost)."""
    if address in _WILDCARDS:
        return "127.0.0.1"
    return address.removeprefix("::ffff:")


def ports_of(pid: int) -> list[tuple[str, int]] | None:
    """(host, port) of every listening socket of ``pid`` and its descendants; None when the
    process's sockets cannot be read."""
    sockets = listening_sockets()
    found: set[tuple[str, int]] = set()
    readable = False
    for process in _descendants(pid):
        inodes = _socket_inodes(process)
        if inodes is None:
            continue
        readable = True
        found.update((_connect_host(sockets[i][0]), sockets[i][1]) for i in inodes if i in sockets)
    return sorted(found) if readable else None


# -- the platform's servers ----------------------------------------------------------------------------
def _known(settings: Settings) -> list[tuple[str, Protocol, int | None, list[int]]]:
    """(name, protocol, pid, ports the runtime recorded) of the servers the runtime started."""
    from stripe_platform.runtime.ferretdb import EmbeddedFerretDB
    from stripe_platform.runtime.kafka import KafkaStack
    from stripe_platform.runtime.postgres import EmbeddedPostgres

    home = settings.home_dir
    known: list[tuple[str, Protocol, int | None, list[int]]] = []
    postgres = EmbeddedPostgres(home).status()
    if postgres.running:
        known.append(
            ("postgres", "postgres", postgres.pid, [postgres.port] if postgres.port else [])
        )
    documents = EmbeddedFerretDB(EmbeddedPostgres(home), home).status()
    if documents.running:
        known.append(
            ("documents", "mongo", documents.pid, [documents.port] if documents.port else [])
        )
    stack = KafkaStack(home)
    state = stack._state()
    if (pid := stack._pid("broker")) is not None:
        ports = [state[k] for k in ("broker_port", "controller_port") if state.get(k)]
        known.append(("kafka", "kafka", pid, ports))
    if (pid := stack._pid("connect")) is not None:
        known.append(
            ("kafka-connect", "http", pid, [state["rest_port"]] if state.get("rest_port") else [])
        )
    known.extend((name, protocol, pid, []) for name, protocol, pid in _recorded(settings))
    return known


def listeners(settings: Settings) -> list[Listener]:
    """Every listening port of the platform's running servers."""
    found: dict[tuple[str, int], Listener] = {}
    for name, protocol, pid, recorded in _known(settings):
        ports = ports_of(pid) if pid is not None else None
        if ports is None:  # sockets unreadable: the ports the runtime wrote down
            ports = [("127.0.0.1", port) for port in recorded]
        for host, port in ports:
            found.setdefault((host, port), Listener(name, port, protocol, host, pid))
    return sorted(found.values(), key=lambda item: (item.name, item.port))


# -- probes ---------------------------------------------------------------------------------------------
def _recv_some(sock: socket.socket | ssl.SSLSocket, size: int = 4096) -> bytes:
    """What the server sends back (b"" when it closes, resets or stays silent)."""
    try:
        return sock.recv(size)
    except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
        return b""


def _recv_exactly(sock: socket.socket | ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = _recv_some(sock, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _pg_startup() -> bytes:
    body = struct.pack("!I", 196608)  # protocol 3.0
    for key, value in (("user", "tls-scan"), ("database", "postgres")):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def _unanswered(data: bytes) -> str:
    """What a server sent that is no answer of its protocol."""
    if not data:
        return "closed without an answer"
    if data[:1] == b"\x15":  # a TLS record of type alert: the server speaks only TLS
        return "answered with a TLS alert"
    return f"answered {data[:8]!r}"


def _pg_answer(data: bytes) -> tuple[bool, str]:
    """(served?, what) for the first message of a PostgreSQL server after a startup packet."""
    if data[:1] == b"R":
        return True, "asked for authentication"
    if data[:1] == b"E":
        fields = dict(
            (part[:1].decode(errors="replace"), part[1:].decode(errors="replace"))
            for part in data[5:].split(b"\0")
            if part
        )
        return False, f"error {fields.get('C', '?')}: {fields.get('M', '')}"
    return False, _unanswered(data)


def _mongo_hello() -> bytes:
    import bson

    body = struct.pack("<I", 0) + b"\0" + bson.encode({"hello": 1, "$db": "admin"})
    return struct.pack("<iiii", 16 + len(body), 1, 0, 2013) + body  # OP_MSG


def _mongo_answer(sock: socket.socket | ssl.SSLSocket) -> tuple[bool, str]:
    header = _recv_exactly(sock, 16)
    if len(header) < 16:
        return False, _unanswered(header)
    _, _, response_to, opcode = struct.unpack("<iiii", header)
    if opcode == 2013 and response_to == 1:
        return True, "answered hello"
    return False, f"answered opcode {opcode}"


def _http_get(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def _http_answer(data: bytes) -> tuple[bool, str]:
    if not data.startswith(b"HTTP/"):
        return False, _unanswered(data)
    status = data.split(b"\r\n", 1)[0].decode(errors="replace")
    # Some servers answer plain HTTP on a TLS port with a 400 that says so: that serves nothing.
    text = data.lower()
    if b" 400 " in data[:16] and (b"https" in text or b"tls" in text or b"ssl" in text):
        return False, f"{status} (use TLS)"
    return True, status


def _kafka_api_versions() -> bytes:
    client = b"tls-scan"
    body = struct.pack("!hhih", 18, 0, 7, len(client)) + client  # ApiVersions v0, correlation 7
    return struct.pack("!i", len(body)) + body


def _kafka_answer(sock: socket.socket | ssl.SSLSocket) -> tuple[bool, str]:
    head = _recv_exactly(sock, 8)
    if len(head) < 8:
        return False, _unanswered(head)
    _, correlation = struct.unpack("!ii", head)
    if correlation == 7:
        return True, "answered ApiVersions"
    return False, f"answered correlation {correlation}"


def _exchange(sock: socket.socket | ssl.SSLSocket, listener: Listener) -> tuple[bool, str]:
    """Send the protocol's first message and judge the answer: (served?, what)."""
    if listener.protocol == "postgres":
        sock.sendall(_pg_startup())
        return _pg_answer(_recv_some(sock))
    if listener.protocol == "mongo":
        sock.sendall(_mongo_hello())
        return _mongo_answer(sock)
    if listener.protocol == "http":
        sock.sendall(_http_get(listener.host))
        return _http_answer(_recv_some(sock))
    sock.sendall(_kafka_api_versions())
    return _kafka_answer(sock)


def probe_plaintext(listener: Listener) -> tuple[bool, str]:
    """(refused?, what happened) for a first message sent in clear."""
    try:
        with socket.create_connection((listener.host, listener.port), timeout=TIMEOUT_S) as sock:
            served, what = _exchange(sock, listener)
    except OSError as exc:
        return True, f"connection failed: {exc}"
    if listener.protocol == "postgres" and not served and "encryption" not in what:
        # PostgreSQL must refuse for want of TLS (hostnossl reject), not for another reason.
        return False, f"not refused for want of TLS: {what}"
    return not served, what


def probe_tls(listener: Listener, ca: Path) -> tuple[bool, str]:
    """(verified handshake?, what happened) for TLS verified against ``ca``."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection((listener.host, listener.port), timeout=TIMEOUT_S) as raw:
            if listener.protocol == "postgres":
                raw.sendall(struct.pack("!II", 8, 80877103))  # SSLRequest
                if raw.recv(1) != b"S":
                    return False, "PostgreSQL declined the SSLRequest"
            with context.wrap_socket(raw, server_hostname=listener.host) as sock:
                version = sock.version()
                served, what = _exchange(sock, listener)
    except ssl.SSLCertVerificationError as exc:
        return False, f"certificate not verified: {exc.verify_message}"
    except (ssl.SSLError, OSError) as exc:
        return False, f"no TLS handshake: {exc}"
    if not served:  # a handshake, but not the server's protocol behind it
        return False, f"{version}, verified, but {what}"
    return True, f"{version}, verified; {what}"


def scan_listener(listener: Listener, ca: Path) -> PortResult:
    refused, plain = probe_plaintext(listener)
    tls_ok, tls = probe_tls(listener, ca)
    return PortResult(
        name=listener.name,
        host=listener.host,
        port=listener.port,
        protocol=listener.protocol,
        pid=listener.pid,
        tls_ok=tls_ok,
        plaintext_refused=refused,
        detail=f"plaintext: {plain}; TLS: {tls}",
    )


def scan(settings: Settings, extra: Sequence[Listener] = ()) -> list[PortResult]:
    """Scan every listening port of the platform's running servers (and ``extra``)."""
    ca = ca_file(settings)
    found = {(item.host, item.port): item for item in listeners(settings)}
    for item in extra:
        found.setdefault((item.host, item.port), item)
    return [scan_listener(item, ca) for item in sorted(found.values(), key=_order)]


def _order(item: Listener) -> tuple[str, int]:
    return item.name, item.port


def render(results: Iterable[PortResult]) -> list[str]:
    """One line per port, for a terminal or the demo; the last line sums up."""
    results = list(results)
    lines = [f"{'server':<16} {'port':>5}  {'protocol':<8}  {'TLS':<4} {'plaintext':<9}  detail"]
    for r in results:
        lines.append(
            f"{r.name:<16} {r.port:>5}  {r.protocol:<8}  {'ok' if r.tls_ok else 'FAIL':<4} "
            f"{'refused' if r.plaintext_refused else 'SERVED':<9}  {r.detail}"
        )
    bad = [r for r in results if not r.ok]
    lines.append(
        f"{len(results)} port(s) scanned: "
        + (
            "every one TLS-only"
            if not bad
            else f"{len(bad)} NOT TLS-only: " + ", ".join(f"{r.name}:{r.port}" for r in bad)
        )
    )
    return lines
