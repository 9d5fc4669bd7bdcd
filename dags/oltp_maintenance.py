"""OLTP maintenance, daily: Transaction's monthly partitions created ahead and those past the
retention window archived (stripe_platform.oltp.partitions), and the document store's indexes
checked against mongo/collections (missing ones are created, as `stripe-platform mongo apply`)."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from stripe_platform.orchestration.assets import document_indexes_asset, oltp_partitions_asset
from stripe_platform.orchestration.defaults import default_args


@dag(
    dag_id="oltp_maintenance",
    schedule="0 1 * * *",
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(execution_timeout=dt.timedelta(minutes=30)),
    tags=["oltp", "docstore", "maintenance"],
    doc_md=__doc__,
)
def oltp_maintenance() -> None:
    @task(outlets=[oltp_partitions_asset()])
    def partitions() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.maintenance import maintain_partitions

        return maintain_partitions(load_settings())

    @task(outlets=[document_indexes_asset()])
    def document_indexes() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.maintenance import check_document_indexes

        return check_document_indexes(load_settings())

    partitions()
    document_indexes()


oltp_maintenance()
