"""The Assets the DAGs publish, named once here so producers and consumers agree.

An Asset names a logical data set, the same on every profile and deployment, so a downstream DAG
schedules on it whatever the lake root or the DSNs are (Airflow also treats one name with two URIs
as a conflict). URIs use the platform's own ``stripe-platform://`` scheme; where the data physically
is comes from the settings (``lake_location`` for the lake).
"""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import Asset

from stripe_platform.config import Settings

SCHEME = "stripe-platform"


def lake_location(settings: Settings, source: str) -> str:
    """Where one source's raw parquet is: ``s3://bucket/raw/<source>`` or ``file:///.../raw/<source>``."""
    root = settings.lake_root.rstrip("/")
    root = root if "://" in root else Path(root).resolve().as_uri()
    return f"{root}/raw/{source}"


def lake_asset(source: str) -> Asset:
    """Raw parquet of one source in the lake (see :func:`lake_location`)."""
    return Asset(name=f"lake.raw.{source}", uri=f"{SCHEME}://lake/raw/{source}")


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


def fraud_scores_asset() -> Asset:
    """The fraud model's batch scores: OLTP FraudScore and the Transaction documents' scores."""
    return Asset(name="oltp.fraud_scores", uri=f"{SCHEME}://oltp/public/fraudscore")


def mart_asset(name: str) -> Asset:
    """A mart of the star schema (dbt_project/models/marts), e.g. ``FACT_Revenue``."""
    return Asset(name=f"warehouse.analytics.{name}", uri=f"{SCHEME}://warehouse/analytics/{name}")
