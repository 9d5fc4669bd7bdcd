"""The fraud model's batch scores, hourly: every payment the champion (`models:/fraud@champion`)
has not scored yet is scored once, into PostgreSQL's FraudScore (keyed by payment and model
version, read by the warehouse) and the Transaction documents' AnomalyScore and isFraud. A re-run
scores and writes nothing twice. Task logic: stripe_platform.orchestration.ml."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from stripe_platform.orchestration.assets import fraud_scores_asset
from stripe_platform.orchestration.defaults import default_args


@dag(
    dag_id="ml_fraud_scoring",
    schedule="@hourly",
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(execution_timeout=dt.timedelta(minutes=50)),
    tags=["ml", "fraud", "scoring"],
    doc_md=__doc__,
)
def ml_fraud_scoring() -> None:
    @task(outlets=[fraud_scores_asset()])
    def score() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.ml import score_batch

        return score_batch(load_settings())

    score()


ml_fraud_scoring()
