"""ELT to the warehouse, daily: PostgreSQL and MongoDB synced to the raw layer, then the dbt project
(staging, intermediate, the star schema's marts, snapshots, tests) rendered as one task per node
with astronomer-cosmos, then the marts published as Assets for the DAGs that read them.

The syncs are airbyte/connections.yaml's `postgres-to-snowflake` and `mongodb-to-snowflake`: Airbyte
runs them on the `prod` profile (deferrable operator), the embedded engine elsewhere, into the
profile's warehouse (DuckDB, PostgreSQL or Snowflake)."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag

from stripe_platform.orchestration.defaults import default_args
from stripe_platform.orchestration.syncs import sync_task
from stripe_platform.orchestration.transform import dbt_task_group, publish_marts_task

CONNECTIONS = ("postgres-to-snowflake", "mongodb-to-snowflake")


@dag(
    dag_id="elt_warehouse_daily",
    schedule="0 3 * * *",
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    tags=["elt", "warehouse", "dbt", "airbyte"],
    doc_md=__doc__,
)
def elt_warehouse_daily() -> None:
    syncs = [sync_task(connection) for connection in CONNECTIONS]
    syncs >> dbt_task_group(group_id="transform") >> publish_marts_task()


elt_warehouse_daily()
