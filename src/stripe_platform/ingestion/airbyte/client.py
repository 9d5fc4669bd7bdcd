"""The Airbyte public API v1 client: the ``airbyte-api`` SDK that Airflow's Airbyte provider uses,
authenticated with OAuth client credentials."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from airbyte_api import AirbyteAPI, models

from stripe_platform.ingestion.catalog import Catalog, require_env

PAGE = 100  # the public API's largest page


def connect(
    server_url: str, client_id: str, client_secret: str, *, timeout: float = 30.0
) -> AirbyteAPI:
    """An SDK client that authenticates with OAuth client credentials.

    The token URL is made absolute because the SDK resolves a relative one against the host only,
    which drops a path such as OSS's ``/api/public/v1`` and misses the token endpoint.
    """
    server_url = server_url.rstrip("/")
    credentials = models.SchemeClientCredentials(
        client_id=client_id,
        client_secret=client_secret,
        token_url=f"{server_url}/applications/token",
    )
    return AirbyteAPI(
        server_url=server_url,
        security=models.Security(client_credentials=credentials),
        client=httpx.Client(timeout=timeout, follow_redirects=True),
    )


def connect_from_env(catalog: Catalog, env: Mapping[str, str] = os.environ) -> AirbyteAPI:
    """:func:`connect` with the URL and credentials named in workspace.yaml."""
    ws = catalog.workspace

    def read(variable: str) -> str:
        return require_env(env, variable, "airbyte/workspace.yaml")

    return connect(read(ws.server_url_env), read(ws.client_id_env), read(ws.client_secret_env))


def list_all(fetch: Callable[[int], Any]) -> list[Any]:
    """Every item of a paged list: ``fetch(offset)`` returns one page of up to :data:`PAGE`."""
    items: list[Any] = []
    while True:
        page = fetch(len(items)).data
        items += page
        if len(page) < PAGE:
            return items
