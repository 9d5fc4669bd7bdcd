"""ELT to the lake, daily: PostgreSQL and MongoDB synced to the raw lake (parquet under
raw/<source>/<stream>/extracted_date=...), for exploration and experimentation.

The connections are airbyte/connections.yaml's `postgres-to-s3` and `mongodb-to-s3`. On the `prod`
profile Airbyte runs them (deferrable operator, connection ids resolved by name); elsewhere the
embedded engine does. Each task publishes its source's lake Asset."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag

from stripe_platform.orchestration.defaults import default_args
from stripe_platform.orchestration.syncs import sync_task

CONNECTIONS = ("postgres-to-s3", "mongodb-to-s3")


@dag(
    dag_id="elt_lake_daily",
    schedule="0 2 * * *",
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    tags=["elt", "lake", "airbyte"],
    doc_md=__doc__,
)
def elt_lake_daily() -> None:
    for connection in CONNECTIONS:
        sync_task(connection)


elt_lake_daily()
