"""The audit trail's daily retention (issue 22, "Seal"): the lake copy brought up to date, records
past the hot period removed by the only path allowed to (itself recorded on the trail), lake days
past the retention period removed, a signed checkpoint, then the whole trail verified against the
lake copy. A failed verify raises a critical incident and fails the task
(stripe_platform.orchestration.audit.retention; docs/audit.md)."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from stripe_platform.orchestration.defaults import default_args


@dag(
    dag_id="audit_retention",
    schedule="30 1 * * *",
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(execution_timeout=dt.timedelta(hours=2)),
    tags=["audit", "security", "retention"],
    doc_md=__doc__,
)
def audit_retention() -> None:
    @task
    def retention() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.audit import retention

        return retention(load_settings())

    retention()


audit_retention()
