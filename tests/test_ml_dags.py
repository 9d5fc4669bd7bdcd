"""The fraud model's DAGs: ml_fraud_training (weekly: drift check, retrain on a drift verdict, gate,
promote; a Kubernetes pod on prod) and ml_fraud_scoring (hourly). They load with the right tasks,
order and schedules, and run end to end with real Airflow (`dag.test()`, the Airflow home of
test_dags) on the embedded profile against the session's PostgreSQL and FerretDB and a real MLflow
store in tmp_path."""

from __future__ import annotations

import json

import pytest

from ml_platform import seeded_platform
from stripe_platform.ml.registry import Registry
from stripe_platform.oltp import db
from stripe_platform.orchestration import defaults
from stripe_platform.orchestration import ml as ml_jobs

# One Airflow home per session: test_dags points Airflow at it when first imported.
from test_dags import _AIRFLOW_SETTINGS, DAGS_DIR, clear_platform_env


@pytest.fixture(scope="session")
def airflow_metadata() -> None:
    """`airflow db migrate` of that home (a no-op when test_dags did it first)."""
    from stripe_platform.orchestration.airflow_runtime import migrate_airflow_db

    migrate_airflow_db(_AIRFLOW_SETTINGS)


def bag(*files: str):
    from airflow.dag_processing.dagbag import DagBag

    if not files:
        return DagBag(dag_folder=str(DAGS_DIR))
    found = {}
    for name in files:
        one = DagBag(dag_folder=str(DAGS_DIR / name))
        assert one.import_errors == {}, one.import_errors
        found.update(one.dags)
    return found


def upstream(dag, task_id: str) -> set[str]:
    return set(dag.get_task(task_id).upstream_task_ids)


def test_the_ml_dags_load_with_their_tasks_order_and_schedules():
    dags = bag("ml_fraud_training.py", "ml_fraud_scoring.py")
    training, scoring = dags["ml_fraud_training"], dags["ml_fraud_scoring"]
    assert training.schedule == "0 4 * * 1"  # Mondays 04:00 UTC
    assert {t.task_id for t in training.tasks} == {
        "drift_check",
        "retrain_needed",
        "train",
        "gate",
        "promote",
    }
    assert upstream(training, "retrain_needed") == {"drift_check"}
    assert upstream(training, "train") == {"retrain_needed"}
    assert upstream(training, "gate") == {"train"}
    assert upstream(training, "promote") == {"gate", "train"}
    assert training.params["force"] is False
    # On the embedded profile the training entry point runs in the worker.
    assert type(training.get_task("train")).__name__ != "KubernetesPodOperator"
    assert scoring.schedule == "@hourly"
    assert {t.task_id for t in scoring.tasks} == {"score"}
    assert {a.name for a in scoring.get_task("score").outlets} == {"oltp.fraud_scores"}
    for dag in (training, scoring):
        assert dag.max_active_runs == 1 and not dag.catchup and "ml" in dag.tags
        for t in dag.tasks:
            assert t.owner == defaults.OWNER and t.retries >= 1, t.task_id
            assert t.execution_timeout is not None and t.on_failure_callback, t.task_id


def test_on_prod_the_training_runs_in_a_kubernetes_pod(monkeypatch, tmp_path):
    clear_platform_env(monkeypatch)
    for key, value in {
        "STRIPE_PLATFORM_PROFILE": "prod",
        "STRIPE_PLATFORM_HOME": str(tmp_path),
        "STRIPE_PLATFORM_PG_DSN": "host=oltp.invalid dbname=stripe",
        "MONGODB_URI": "mongodb://docstore.invalid:27017",
        "STRIPE_PLATFORM_PII_KEY": "k" * 32,
        "STRIPE_PLATFORM_SNOWFLAKE_ACCOUNT": "acct",
        "STRIPE_PLATFORM_SNOWFLAKE_USER": "loader",
    }.items():
        monkeypatch.setenv(key, value)
    training = bag("ml_fraud_training.py")["ml_fraud_training"]
    train = training.get_task("train")
    assert type(train).__name__ == "KubernetesPodOperator"
    assert train.pod_template_dict == ml_jobs.training_pod()
    assert train.namespace == "stripe-ml" and train.base_container_name == "train"
    assert train.arguments == ["train", "--result", "/airflow/xcom/return.json"]
    assert train.do_xcom_push and train.deferrable
    assert upstream(training, "gate") == {"train"}  # its XCom result feeds the gate


# -- end to end on the embedded profile --------------------------------------------------------------
@pytest.fixture
def ml_env(settings, database, docdb, tmp_path, monkeypatch, seed_templates):
    """A seeded platform and the environment a task sees (settings from the environment)."""
    platform = seeded_platform(
        settings, database, docdb, tmp_path, monkeypatch, templates=seed_templates
    )
    s = platform.settings
    clear_platform_env(monkeypatch)
    for key, value in {
        "STRIPE_PLATFORM_PROFILE": "embedded",
        "STRIPE_PLATFORM_HOME": str(s.home_dir),
        "STRIPE_PLATFORM_PG_DATABASE": s.pg_database,
        "STRIPE_PLATFORM_MONGODB_DATABASE": s.mongodb_database,
        "STRIPE_PLATFORM_MLFLOW_TRACKING_URI": s.mlflow_tracking_uri.get_secret_value(),
    }.items():
        monkeypatch.setenv(key, value)
    return platform


def task_states(run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def xcom(run, task_id: str):
    (ti,) = [ti for ti in run.get_task_instances() if ti.task_id == task_id]
    return ti.xcom_pull(task_ids=task_id)


def test_training_dag_trains_a_champion_then_retrains_only_on_drift_or_force(
    airflow_metadata, ml_env
):
    from airflow.utils.state import DagRunState

    s = ml_env.settings
    registry = Registry.from_settings(s)
    assert registry.champion(s.ml_model_name) is None
    dag = bag("ml_fraud_training.py")["ml_fraud_training"]

    # No champion: no drift verdict to wait for, a champion is trained and promoted.
    first = dag.test()
    assert first.state == DagRunState.SUCCESS
    assert task_states(first) == dict.fromkeys(
        ("drift_check", "retrain_needed", "train", "gate", "promote"), "success"
    )
    champion = registry.champion(s.ml_model_name)
    assert champion is not None and str(champion.version) == "1"
    assert xcom(first, "promote") == {"model_name": "fraud", "champion": "1", "previous": None}

    # With a champion: the drift verdict decides (its file is the one the run wrote).
    second = dag.test()
    assert second.state == DagRunState.SUCCESS
    verdict = json.loads((s.home_dir / "ml" / "drift" / "latest.json").read_text())
    assert verdict["model"] == {"name": "fraud", "version": "1"}
    states = task_states(second)
    expected = "success" if verdict["drifted"] else "skipped"
    assert states["train"] == expected and states["drift_check"] == "success"

    # Forced: a candidate is trained and compared with the champion on the same payments; the
    # alias moves only if the gate let it through.
    third = dag.test(run_conf={"force": True})
    assert third.state == DagRunState.SUCCESS
    states = task_states(third)
    candidate = xcom(third, "train")
    assert states["train"] == "success" and candidate["champion_version"] == "1"
    now = str(registry.champion(s.ml_model_name).version)
    if candidate["passed_gate"]:
        assert states["promote"] == "success" and now == candidate["version"]
    else:
        assert states["promote"] == "skipped" and now == "1"
        assert "does not beat" in candidate["gate_reason"]


def test_scoring_dag_scores_once_hourly_runs_write_nothing_twice(airflow_metadata, ml_env):
    from airflow.utils.state import DagRunState

    from ml_platform import train_champion

    s = ml_env.settings
    train_champion(s)
    dag = bag("ml_fraud_scoring.py")["ml_fraud_scoring"]
    first = dag.test()
    assert first.state == DagRunState.SUCCESS
    n = ml_env.data.transactions.num_rows
    assert xcom(first, "score")["scored"] == n
    second = dag.test()
    assert second.state == DagRunState.SUCCESS
    report = xcom(second, "score")
    assert (report["scored"], report["documents_updated"], report["already_scored"]) == (0, 0, n)
    with db.connect(s) as conn:
        assert conn.execute("SELECT count(*) FROM FraudScore").fetchone() == (n,)


def test_the_pods_entry_point_writes_its_report_where_the_operator_reads_it(
    ml_env, tmp_path, capsys
):
    """`python -m stripe_platform.orchestration.ml train --result FILE`, as the training pod runs
    it (settings from the environment): the candidate's report on stdout and in FILE."""
    result = tmp_path / "airflow" / "xcom" / "return.json"
    assert ml_jobs.main(["train", "--result", str(result)]) == 0
    report = json.loads(result.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert (report["version"], report["passed_gate"], report["promoted"]) == ("1", True, False)
    assert Registry.from_settings(ml_env.settings).champion("fraud") is None  # promote's job


def test_the_entry_point_fails_clearly_without_data(
    settings, database, tmp_path, monkeypatch, capsys
):
    clear_platform_env(monkeypatch)
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(settings.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", database)
    monkeypatch.setenv("STRIPE_PLATFORM_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    result = tmp_path / "return.json"
    assert ml_jobs.main(["train", "--result", str(result)]) == 1
    assert not result.exists()
    err = capsys.readouterr().err
    assert f"error: PostgreSQL database {database!r}" in err and "Traceback" not in err
