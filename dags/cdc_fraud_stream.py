"""The CDC stream for fraud analytics: every five minutes, the changes captured since the last run
(PostgreSQL's WAL through the replication slot, the scored Transaction documents) land in the
warehouse and the fraud models are brought up to date incrementally: FACT_FraudAnalysis recomputes
only the days that received changes."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag

from stripe_platform.orchestration.defaults import default_args
from stripe_platform.orchestration.syncs import sync_task
from stripe_platform.orchestration.transform import dbt_task_group, publish_marts_task

CONNECTIONS = ("postgres-to-snowflake", "mongodb-to-snowflake")


@dag(
    dag_id="cdc_fraud_stream",
    schedule=dt.timedelta(minutes=5),
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(
        retries=1,
        retry_delay=dt.timedelta(seconds=30),
        execution_timeout=dt.timedelta(minutes=10),
    ),
    dagrun_timeout=dt.timedelta(minutes=15),
    tags=["cdc", "fraud", "streaming", "dbt"],
    doc_md=__doc__,
)
def cdc_fraud_stream() -> None:
    syncs = [
        sync_task(connection, task_id=f"cdc_{connection.replace('-', '_')}")
        for connection in CONNECTIONS
    ]
    # The fraud mart and what it is computed from (staging, int_transactions, reference seeds).
    fraud = dbt_task_group(group_id="fraud_models", select=["+tag:fraud"])
    syncs >> fraud >> publish_marts_task(("FACT_FraudAnalysis",), task_id="publish_fraud_mart")


cdc_fraud_stream()
