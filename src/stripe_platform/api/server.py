"""Serving the app: uvicorn over TLS with the runtime's certificates.

The certificates are the platform home's (``runtime.tls.ensure_certificates(<home>/tls)``, the
ones the embedded PostgreSQL serves): clients verify the API with ``<home>/tls/ca.crt``. The
server certificate names ``localhost`` and ``127.0.0.1``; another host needs its own.

The socket is bound here, before the app starts, so a port in use is one clear error at once.
"""

from __future__ import annotations

import copy
import errno
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stripe_platform.errors import PlatformError

if TYPE_CHECKING:
    from stripe_platform.config import Settings
    from stripe_platform.runtime.tls import TlsFiles


class ServeError(PlatformError, RuntimeError):
    """The API cannot be served as asked (a port in use, an address this machine lacks)."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: TlsFiles

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, or a ServeError that says why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} on {host} is in use by another process: stop it, or choose "
                "another port (--port, or STRIPE_PLATFORM_API_PORT)"
            ) from None
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def endpoint(settings: Settings, *, host: str | None = None, port: int | None = None) -> Endpoint:
    from stripe_platform.runtime.tls import ensure_certificates

    return Endpoint(
        host or settings.api_host,
        port or settings.api_port,
        ensure_certificates(settings.home_dir / "tls"),
    )


def log_config() -> dict:
    """uvicorn's logging, with the platform's API loggers (model refreshes, follower) beside it."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["stripe_platform"] = {
        "handlers": ["default"],
        "level": "INFO",
        "propagate": False,
    }
    return config


def serve(
    settings: Settings, where: Endpoint, sock: socket.socket, *, access_log: bool = False
) -> None:
    """Serve the app on ``sock`` (``bind(where.host, where.port)``) until SIGINT/SIGTERM
    (uvicorn's graceful shutdown)."""
    import uvicorn

    from stripe_platform.api.app import create_app
    from stripe_platform.security.tls_scan import forget_server, record_server

    config = uvicorn.Config(
        create_app(settings),
        ssl_certfile=str(where.tls.server_cert),
        ssl_keyfile=str(where.tls.server_key),
        access_log=access_log,  # off by default: a log line per request costs latency
        log_config=log_config(),
        timeout_graceful_shutdown=10,
    )
    record_server(settings, "api", "http")  # so `tls scan` checks this port too
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        forget_server(settings, "api")
        sock.close()
