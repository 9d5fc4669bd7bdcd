"""The Assets the DAGs publish, named once here so producers and consumers agree.

Lake assets carry the lake's real location (``s3://...`` or ``file://...``). Assets without one
stable address (a database table reached through a profile-specific DSN) use the platform's own
``stripe-platform://`` scheme; their names are what downstream DAGs schedule on.
"""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import Asset

from stripe_platform.config import Settings

SCHEME = "stripe-platform"


def _lake_uri(settings: Settings) -> str:
    root = settings.lake_root.rstrip("/")
    return root if "://" in root else Path(root).resolve().as_uri()


def lake_asset(settings: Settings, source: str) -> Asset:
    """Raw parquet of one source in the lake: ``<lake>/raw/<source>``."""
    return Asset(name=f"lake.raw.{source}", uri=f"{_lake_uri(settings)}/raw/{source}")


def warehouse_raw_asset(namespace: str, source: str) -> Asset:
    """The raw tables one source lands in the warehouse (``RAW`` schema, prefixed by source)."""
    schema = namespace.lower()
    return Asset(name=f"warehouse.{schema}.{source}", uri=f"{SCHEME}://warehouse/{schema}/{source}")


def oltp_partitions_asset() -> Asset:
    """Transaction's monthly partitions (created ahead, archived past retention)."""
    return Asset(name="oltp.transaction_partitions", uri=f"{SCHEME}://oltp/public/transaction")


def document_indexes_asset() -> Asset:
    """The document store's collections and indexes, checked against mongo/collections."""
    return Asset(name="docstore.indexes", uri=f"{SCHEME}://docstore/indexes")
