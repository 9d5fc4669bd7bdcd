"""The embedded runtime as one thing: the PostgreSQL cluster and, unless MONGODB_URI names a
MongoDB server, the document server that stores its documents in that cluster."""

from __future__ import annotations

from dataclasses import dataclass

from stripe_platform.config import Settings
from stripe_platform.runtime.ferretdb import DocServerStatus
from stripe_platform.runtime.postgres import ClusterStatus


@dataclass(frozen=True)
class RuntimeStatus:
    postgres: ClusterStatus
    documents: DocServerStatus | None  # None: MONGODB_URI names the document store


def up(settings: Settings) -> RuntimeStatus:
    from stripe_platform.docstore.client import embedded_server
    from stripe_platform.oltp.db import embedded_cluster

    postgres = embedded_cluster(settings).up()
    documents = None if settings.mongodb_uri else embedded_server(settings).up()
    return RuntimeStatus(postgres, documents)


def down(settings: Settings) -> tuple[bool, bool]:
    """Stop the document server, then PostgreSQL (its backend). Returns what was running."""
    from stripe_platform.docstore.client import embedded_server
    from stripe_platform.oltp.db import embedded_cluster

    documents = embedded_server(settings).down()
    postgres = embedded_cluster(settings).down()
    return postgres, documents


def status(settings: Settings) -> RuntimeStatus:
    from stripe_platform.docstore.client import embedded_server
    from stripe_platform.oltp.db import embedded_cluster

    documents = None if settings.mongodb_uri else embedded_server(settings).status()
    return RuntimeStatus(embedded_cluster(settings).status(), documents)
