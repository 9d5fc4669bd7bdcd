"""`api`: serve the platform's API (the one FastAPI app) over TLS."""

from __future__ import annotations

from typing import Annotated

import typer

from stripe_platform.cli.common import command, err, settings

commands = typer.Typer()  # merged into the top level


@command(commands, "api")
def api(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: settings' api_host)")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Port to listen on (default: settings' api_port)"),
    ] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Log a line per request")
    ] = False,
) -> None:
    """Serve the API (POST /v1/fraud/score, /healthz, /readyz, /docs) with uvicorn over TLS with
    the runtime's certificates, until Ctrl-C or SIGTERM. It serves at once: /readyz answers 503
    until the champion is loaded and the online features are warm."""
    from stripe_platform.api import server

    s = settings()
    where = server.endpoint(s, host=host, port=port)
    sock = server.bind(where.host, where.port)  # a port in use: one line, exit 1
    err.print(
        f"serving {where.url} (OpenAPI: {where.url}/docs; clients verify it with "
        f"{where.tls.ca_cert}); readiness: {where.url}/readyz"
    )
    if where.host not in ("127.0.0.1", "localhost"):
        err.print(
            "note: the runtime's certificate names localhost and 127.0.0.1 only: clients that "
            f"reach {where.host} by another name cannot verify it"
        )
    server.serve(s, where, sock, access_log=access_log)
