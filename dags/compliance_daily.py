"""The daily compliance controls (issue 23 §5): encryption coverage, access-policy drift, expired
access, retention, PCI scope and unauthorised transfers, each recorded with its evidence (a failure
raises an incident, so an alert); then the breach clocks, an overdue notification raising a
critical incident (stripe_platform.orchestration.compliance.daily; docs/compliance.md)."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from stripe_platform.orchestration.defaults import default_args


@dag(
    dag_id="compliance_daily",
    schedule="0 3 * * *",
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(execution_timeout=dt.timedelta(hours=1)),
    tags=["compliance", "privacy", "security"],
    doc_md=__doc__,
)
def compliance_daily() -> None:
    @task
    def controls() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.compliance import daily

        return daily(load_settings())

    controls()


compliance_daily()
