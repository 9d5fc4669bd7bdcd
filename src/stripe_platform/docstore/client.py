"""The one factory for the document store: a pymongo ``Database`` on a real server.

``MONGODB_URI`` set: that MongoDB (or Atlas). Unset (the embedded profile): the embedded
document server, FerretDB on the embedded PostgreSQL cluster (``runtime/ferretdb.py``), reached
over TLS with its own login. FerretDB v1 speaks the same protocol but lacks $jsonSchema
validators, views, change streams and transactions; code that needs them asks :func:`server_kind`.
"""

from __future__ import annotations

from typing import Any, Literal

import pymongo
from pymongo.database import Database

from stripe_platform.config import Settings
from stripe_platform.runtime.ferretdb import EmbeddedFerretDB
from stripe_platform.runtime.postgres import RuntimeErrorWithHint

ServerKind = Literal["mongodb", "ferretdb"]


def embedded_server(settings: Settings) -> EmbeddedFerretDB:
    from stripe_platform.oltp.db import embedded_cluster

    return EmbeddedFerretDB(
        embedded_cluster(settings), settings.home_dir, port=settings.docstore_port
    )


def uri(settings: Settings) -> str:
    if settings.mongodb_uri is not None:
        return settings.mongodb_uri.get_secret_value()
    server = embedded_server(settings)
    if not server.status().running:
        raise RuntimeErrorWithHint(
            f"The embedded document server (FerretDB) under {server.root} is not running: run "
            "`stripe-platform up`."
        )
    return server.uri()


def connect(settings: Settings) -> Database[Any]:
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(
        uri(settings), serverSelectionTimeoutMS=10_000, tz_aware=True
    )
    return client[settings.mongodb_database]


def server_kind(db: Database[Any]) -> ServerKind:
    # FerretDB answers buildInfo with its own version beside the MongoDB one it emulates.
    info = db.client.admin.command("buildInfo")
    return "ferretdb" if "ferretdbVersion" in info else "mongodb"
