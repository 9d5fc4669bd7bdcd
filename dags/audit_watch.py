"""Security monitoring, hourly (issue 22, "Watch" and "Alert"): the last two hours of the Log
collection through the detection rules and, when a champion is registered, the log anomaly model;
the findings become incidents, new ones and escalations alerted to the webhook and the access log
(stripe_platform.orchestration.audit.watch; `stripe-platform incidents list`)."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from stripe_platform.orchestration.defaults import default_args


@dag(
    dag_id="audit_watch",
    schedule="@hourly",
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(execution_timeout=dt.timedelta(minutes=50)),
    tags=["audit", "security", "ml"],
    doc_md=__doc__,
)
def audit_watch() -> None:
    @task
    def watch() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.audit import watch

        return watch(load_settings())

    watch()


audit_watch()
