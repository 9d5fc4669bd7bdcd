"""Log collection every 5 minutes (issue 22, "Collect"): PostgreSQL's jsonlog and the API's access
log since the saved positions, redacted, into the Log collection, the sealed trail and the lake
(stripe_platform.orchestration.audit.collect; docs/audit.md). A pass is incremental and exactly
once across crashes, so a skipped run only makes the next one longer; `stripe-platform audit
collect --follow` is the continuous alternative."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from stripe_platform.orchestration.defaults import default_args


@dag(
    dag_id="audit_collect",
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
    tags=["audit", "security"],
    doc_md=__doc__,
)
def audit_collect() -> None:
    @task
    def collect() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.audit import collect

        return collect(load_settings())

    collect()


audit_collect()
