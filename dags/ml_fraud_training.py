"""The fraud model, weekly: the latest week's payments are checked for drift against the champion's
training payments (Evidently; report and verdict under the platform home); a drift verdict (or no
champion yet, or the run's `force` parameter) triggers retraining: a candidate is trained on the
platform's data, registered in MLflow and evaluated beside the champion on the same held-back
period; the gate lets it through only if it beats the champion, and promote moves
`models:/fraud@champion` to it.

On the `prod` profile the training runs as a Kubernetes pod (KubernetesPodOperator, the Job's pod
template in deploy/k8s/training-job.yaml, the image of deploy/training.Dockerfile); elsewhere the
same entry point runs in the worker. Task logic: stripe_platform.orchestration.ml."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, dag, get_current_context, task

from stripe_platform.orchestration.defaults import default_args
from stripe_platform.orchestration.ml import training_task


@dag(
    dag_id="ml_fraud_training",
    schedule="0 4 * * 1",
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(execution_timeout=dt.timedelta(hours=1)),
    params={"force": Param(False, type="boolean", description="Retrain without a drift verdict")},
    tags=["ml", "fraud", "training", "drift"],
    doc_md=__doc__,
)
def ml_fraud_training() -> None:
    @task
    def drift_check() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration import ml

        return ml.drift_check(load_settings())

    @task.short_circuit
    def retrain_needed(verdict: dict) -> bool:
        import logging

        from stripe_platform.orchestration import ml

        force = bool(get_current_context()["params"].get("force"))
        needed, why = ml.retrain_needed(verdict, force=force)
        logging.getLogger(__name__).info(why)
        return needed

    @task.short_circuit
    def gate(candidate: dict) -> bool:
        import logging

        from stripe_platform.orchestration import ml

        passed, why = ml.gate(candidate)
        logging.getLogger(__name__).info(why)
        return passed

    @task
    def promote(candidate: dict) -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration import ml

        return ml.promote(load_settings(), candidate)

    candidate = training_task()
    retrain_needed(drift_check()) >> candidate
    gate(candidate) >> promote(candidate)


ml_fraud_training()
