"""The platform's API served for a test module: the real app under uvicorn over TLS on a free
loopback port, in a thread, with an HTTPS client that trusts the platform's CA."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI

from stripe_platform.config import Settings
from stripe_platform.runtime.tls import ensure_certificates


@contextmanager
def served_over_tls(
    app: FastAPI, settings: Settings, *, name: str = "api", timeout: float = 20
) -> Iterator[httpx.Client]:
    """Serve ``app`` until the block ends; yields a client on its base URL (``timeout`` a call)."""
    tls = ensure_certificates(settings.home_dir / "tls")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ssl_certfile=str(tls.server_cert),
            ssl_keyfile=str(tls.server_key),
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
    )
    thread = threading.Thread(target=server.run, name=f"{name}-uvicorn", daemon=True)
    thread.start()
    client = httpx.Client(
        base_url=f"https://127.0.0.1:{port}",
        verify=ssl.create_default_context(cafile=str(tls.ca_cert)),
        timeout=timeout,
    )
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield client
    finally:
        client.close()
        server.should_exit = True
        thread.join(30)
