"""`tls`: TLS on every connection the platform serves (issue 20 §4)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from stripe_platform.cli.common import command, console, group, settings

tls_app = group("TLS on every connection: scan the running stack's listening ports.")


@command(tls_app)
def scan(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON report on stdout")] = False,
) -> None:
    """Every port the platform's running servers listen on must refuse plaintext and complete a
    TLS handshake verified against the platform's CA; exit 1 when one does not."""
    from stripe_platform.security.tls_scan import render
    from stripe_platform.security.tls_scan import scan as run_scan

    results = run_scan(settings())
    if as_json:
        console.print_json(data=[dataclasses.asdict(r) | {"ok": r.ok} for r in results])
    else:
        for line in render(results):
            console.print(line)
    if not results or any(not r.ok for r in results):
        raise typer.Exit(1)
