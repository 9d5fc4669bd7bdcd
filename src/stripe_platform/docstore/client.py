"""The one factory for the document store: a pymongo ``Database``.

``MONGODB_URI`` set: a real MongoDB (or Atlas). Unset: the embedded stand-in (litemongo, the
mongomock engine persisted in SQLite files under ``<home>/docstore``), so separate processes see
the same data. The stand-in has no $jsonSchema validators, views, change streams or transactions;
code that needs them checks ``is_standin``.
"""

from __future__ import annotations

from typing import Any

import pymongo
from pymongo.database import Database

from stripe_platform.config import Settings


def connect(settings: Settings) -> Database[Any]:
    if settings.mongodb_uri is not None:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(
            settings.mongodb_uri.get_secret_value(), serverSelectionTimeoutMS=10_000, tz_aware=True
        )
        return client[settings.mongodb_database]
    import litemongo  # imported lazily: only the embedded profile needs it

    settings.docstore_dir.mkdir(parents=True, exist_ok=True)
    return litemongo.connect(str(settings.docstore_dir), tz_aware=True)[settings.mongodb_database]


def is_standin(db: Any) -> bool:
    return not isinstance(db, Database)
