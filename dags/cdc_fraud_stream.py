"""The supervisor of the fraud stream (`stripe-platform stream fraud`, which scores every payment
as its change is committed): every five minutes it starts the stream when none runs and restarts
it when it died or hangs, then checks its lag (slot lag, commit-to-score p95): a lagging or
failing stream fails the check, and the failure alert carries the reasons. The stream's scores
reach the warehouse with the OLTP syncs (FraudScoreEvent). Task logic:
stripe_platform.orchestration.streaming."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from stripe_platform.orchestration.defaults import default_args


@dag(
    dag_id="cdc_fraud_stream",
    schedule=dt.timedelta(minutes=5),
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(
        retries=1,
        retry_delay=dt.timedelta(seconds=30),
        execution_timeout=dt.timedelta(minutes=4),
    ),
    dagrun_timeout=dt.timedelta(minutes=10),
    tags=["cdc", "fraud", "streaming"],
    doc_md=__doc__,
)
def cdc_fraud_stream() -> None:
    @task
    def ensure_running() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.streaming import ensure_stream

        return ensure_stream(load_settings())

    @task
    def check_stream() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.streaming import check_stream

        return check_stream(load_settings())

    ensure_running() >> check_stream()


cdc_fraud_stream()
