"""Access review, hourly (the brief: least privilege, temporary access for contractors, automatic
detection of expired access rights): access still usable past its end date is revoked everywhere
the policy applies, and any difference between the access policy (access/policy.yaml) and what is
really granted raises an alert (stripe_platform.orchestration.access_review; docs/access.md)."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from stripe_platform.orchestration.defaults import default_args


@dag(
    dag_id="security_access_review",
    schedule="@hourly",
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(execution_timeout=dt.timedelta(minutes=30)),
    tags=["security", "access"],
    doc_md=__doc__,
)
def security_access_review() -> None:
    @task
    def review_access() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.access_review import review_access

        return review_access(load_settings())

    review_access()


security_access_review()
