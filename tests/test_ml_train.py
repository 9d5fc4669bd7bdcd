"""Training, the promotion gate, the registry, the time split and the metrics of the fraud model.

Everything runs on a real MLflow store (SQLite and artifact files in tmp_path) and real LightGBM,
on the seed's generated payments (tests/ml_data.py) or on hand-built tables whose expected values
are written here by hand.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from pydantic import SecretStr

from ml_data import seed_transactions
from stripe_platform.config import Settings, load_settings
from stripe_platform.ml import rules
from stripe_platform.ml.contract import (
    MissingColumn,
    MistypedColumn,
    NoPositiveLabels,
    Transactions,
    canonicalize,
    read_transactions,
)
from stripe_platform.ml.evaluate import (
    EvaluationError,
    card_precision_at_k,
    evaluate,
    expected_hits,
)
from stripe_platform.ml.features import FEATURE_NAMES, FEATURE_VERSION, FeatureMismatch
from stripe_platform.ml.registry import (
    CHAMPION,
    NoChampion,
    Registry,
    RegistryUnreachable,
    load_champion,
)
from stripe_platform.ml.split import EmptyPeriod, NoPositivesInPeriod, SplitSpec, split
from stripe_platform.ml.train import evaluate_champion, prepare, snapshot_id, train_fraud
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec

UTC = dt.UTC
ROUNDS = 60  # boosting rounds in API tests: enough to learn the seed's fraud, quick


# -- data and stores ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seed_tx() -> Transactions:
    """A year of the seed's payments with its planted fraud (13k training payments with 74
    frauds, 6k test payments with 20 in the default split)."""
    return seed_transactions(
        build(make_spec(scale=0.02, seed=3, end=dt.date(2026, 1, 1), days=365))
    )


@pytest.fixture(scope="module")
def seed_file(seed_tx: Transactions, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ml-data") / "transactions.parquet"
    pq.write_table(seed_tx.table, path)
    return path


def home_settings(home: Path, **values: object) -> Settings:
    return load_settings(home=home, profile="embedded", **values)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One store for the tests that each use a model name of their own (creating a SQLite store
    takes seconds)."""
    return home_settings(tmp_path_factory.mktemp("ml-home"))


def client(settings: Settings) -> MlflowClient:
    return Registry.from_settings(settings).client()


def champion_version(settings: Settings, name: str) -> str:
    return str(client(settings).get_model_version_by_alias(name, CHAMPION).version)


def registered_names(settings: Settings) -> list[str]:
    return [m.name for m in client(settings).search_registered_models()]


def cli_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STRIPE_PLATFORM_") and k != "MONGODB_URI"
    }
    env.update(STRIPE_PLATFORM_HOME=str(home), COLUMNS="200")
    return env


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", "ml", *args],
        capture_output=True,
        text=True,
        env=cli_env(home),
        check=False,
        timeout=900,
    )


# -- training on a fresh store -----------------------------------------------------------------------
def test_training_registers_a_champion_on_a_fresh_store(tmp_path, seed_file, seed_tx):
    """`ml train --transactions FILE` on a home without a store: the home's SQLite store and
    artifacts are created, the run logs params, metrics, the model, the feature list and version
    and the data snapshot, version 1 is registered with its feature tags and becomes
    models:/fraud@champion (an alias, no stage); `ml evaluate` then reports the same champion on
    the same test period; the model's average precision is at least twice the rules'."""
    home = tmp_path / "home"
    result = cli(home, "train", "--transactions", str(seed_file), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["version"], report["promoted"], report["passed_gate"]) == ("1", True, True)
    assert report["gate_reason"] == "no champion to beat"
    assert report["model_uri"] == "models:/fraud/1"
    assert report["split"]["test_start"] == "2025-10-03"  # 90 days before the data's end
    assert report["split"]["train_end"] == "2025-09-26"  # a 7-day gap before it
    assert report["metrics"]["positives"] == report["split"]["test_positives"] == 20
    # The quality floor on the seed's planted fraud.
    model_ap = report["metrics"]["average_precision"]
    rules_ap = report["rules_metrics"]["average_precision"]
    assert model_ap >= 2 * rules_ap, (model_ap, rules_ap)
    assert (home / "mlflow" / "mlflow.db").is_file()

    settings = home_settings(home)
    mlflow_client = client(settings)
    version = mlflow_client.get_model_version_by_alias("fraud", CHAMPION)
    assert str(version.version) == "1"
    assert version.current_stage == "None"  # aliases only
    assert version.tags["feature_version"] == FEATURE_VERSION
    assert json.loads(version.tags["feature_names"]) == list(FEATURE_NAMES)
    # The same payments read from the file or built in memory are the same snapshot.
    assert version.tags["data_snapshot"] == snapshot_id(seed_tx) == report["snapshot_id"]
    run = mlflow_client.get_run(version.run_id)
    assert run.data.params["num_boost_round"] == "300"
    assert run.data.params["split_gap_days"] == "7"
    assert run.data.metrics["test_average_precision"] == pytest.approx(model_ap)
    assert run.data.metrics["rules_average_precision"] == pytest.approx(rules_ap)
    assert run.data.tags["data_source"] == str(seed_file)
    assert run.data.tags["data_rows"] == str(seed_tx.num_rows)
    features = json.loads(
        Path(
            mlflow_client.download_artifacts(run.info.run_id, "features.json", str(tmp_path))
        ).read_text()
    )
    assert features == {"version": FEATURE_VERSION, "names": list(FEATURE_NAMES)}
    # The model files sit under the home's artifact directory.
    assert list((home / "mlflow" / "artifacts").rglob("model.lgb"))

    # The alias addresses the model: its scores are the champion's, loaded by the registry.
    champion = load_champion(Registry.from_settings(settings), "fraud")
    prepared = prepare(seed_tx)
    test_x = prepared.rows(prepared.split.test_rows)
    with Registry.from_settings(settings).active():
        by_alias = mlflow.pyfunc.load_model("models:/fraud@champion").predict(test_x)
    np.testing.assert_allclose(champion.raw.predict(test_x), np.asarray(by_alias))

    evaluated = cli(home, "evaluate", "--transactions", str(seed_file), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads(evaluated.stdout)
    assert again["version"] == "1"
    assert again["split"] == report["split"]
    assert again["metrics"] == pytest.approx(report["metrics"])
    assert again["rules_metrics"] == pytest.approx(report["rules_metrics"])


# -- the gate ---------------------------------------------------------------------------------------
def test_the_gate_promotes_only_a_better_candidate(shared, seed_tx):
    """A weak first model becomes champion (none to beat); a better one replaces it; a worse one
    (a crippled feature set) is registered but the alias stays where it was, and both were scored
    on the same held-back payments."""
    name = "gate"
    weak = ["hour_of_day", "is_weekend"]
    first = train_fraud(
        shared, transactions=seed_tx, model_name=name, feature_columns=weak, num_boost_round=ROUNDS
    )
    assert (first.version, first.promoted) == ("1", True)
    assert champion_version(shared, name) == "1"

    better = train_fraud(shared, transactions=seed_tx, model_name=name, num_boost_round=ROUNDS)
    assert (better.version, better.promoted, better.champion_version) == ("2", True, "1")
    assert better.gate_metrics["average_precision"] > better.champion_metrics["average_precision"]
    assert champion_version(shared, name) == "2"

    worse = train_fraud(
        shared, transactions=seed_tx, model_name=name, feature_columns=weak, num_boost_round=ROUNDS
    )
    assert (worse.version, worse.promoted, worse.passed_gate) == ("3", False, False)
    assert champion_version(shared, name) == "2"
    assert "does not beat champion version 2" in worse.gate_reason
    # The champion was evaluated on the candidate's own test period: the same payments.
    assert worse.champion_metrics["transactions"] == worse.metrics["transactions"]
    assert worse.champion_metrics["positives"] == worse.metrics["positives"] == 20
    assert worse.champion_metrics["average_precision"] == pytest.approx(
        better.metrics["average_precision"]
    )
    tags = client(shared).get_model_version(name, "3").tags
    assert tags["gate"].startswith("not promoted: average_precision")

    # promote=False (the DAG's train task): the gate is decided, the alias left alone.
    deferred = train_fraud(
        shared, transactions=seed_tx, model_name="deferred", num_boost_round=ROUNDS, promote=False
    )
    assert (deferred.passed_gate, deferred.promoted) == (True, False)
    assert Registry.from_settings(shared).champion("deferred") is None


def test_the_gate_compares_on_payments_the_champion_did_not_train_on(shared, seed_tx):
    """A champion trained on a later period than the candidate's test start is compared only on
    the test payments after its training ended, for both models."""
    name = "overlap"
    late = train_fraud(
        shared,
        transactions=seed_tx,
        model_name=name,
        split=SplitSpec(test_days=30),  # trains up to 37 days before the end
        num_boost_round=ROUNDS,
    )
    assert late.promoted and late.split["train_end"] == "2025-11-25"
    candidate = train_fraud(shared, transactions=seed_tx, model_name=name, num_boost_round=ROUNDS)
    ts = seed_tx.table["timestamp"]
    after = pc.greater_equal(ts, pa.scalar(dt.datetime(2025, 11, 25, tzinfo=UTC), ts.type))
    unseen = pc.sum(after).as_py()
    unseen_frauds = pc.sum(pc.and_(after, pc.equal(seed_tx.table["label"], 1))).as_py()
    assert candidate.champion_metrics["transactions"] == unseen
    assert candidate.gate_metrics["transactions"] == unseen
    assert candidate.champion_metrics["positives"] == unseen_frauds
    assert candidate.metrics["transactions"] > unseen  # its own metrics: the whole test period
    assert any("the gate compares on the" in n for n in candidate.notes)


# -- the registry ------------------------------------------------------------------------------------
def test_a_model_with_other_features_refuses_to_load(shared, seed_tx):
    """A champion recorded with another feature version (or list) is refused by the loader and by
    `ml evaluate`; a new candidate replaces it, since it cannot be compared."""
    name = "mismatch"
    trained = train_fraud(shared, transactions=seed_tx, model_name=name, num_boost_round=ROUNDS)
    registry = Registry.from_settings(shared)
    mlflow_client = client(shared)
    mlflow_client.set_model_version_tag(
        name, trained.version, "feature_version", "fv1-0123456789ab"
    )
    with pytest.raises(FeatureMismatch, match="fv1-0123456789ab"):
        load_champion(registry, name)
    with pytest.raises(FeatureMismatch):
        evaluate_champion(shared, transactions=seed_tx, model_name=name)

    mlflow_client.set_model_version_tag(name, trained.version, "feature_version", FEATURE_VERSION)
    mlflow_client.set_model_version_tag(
        name, trained.version, "feature_names", json.dumps(list(FEATURE_NAMES[:-1]))
    )
    with pytest.raises(FeatureMismatch, match=FEATURE_NAMES[-1]):
        load_champion(registry, name)

    replacement = train_fraud(shared, transactions=seed_tx, model_name=name, num_boost_round=ROUNDS)
    assert replacement.promoted and replacement.gate_reason == "no champion to beat"
    assert any("cannot be scored" in n for n in replacement.notes)
    assert load_champion(registry, name).version == replacement.version


def test_no_champion_is_a_clear_error(shared, seed_tx, tmp_path, seed_file):
    with pytest.raises(NoChampion, match=r"'nobody' has no champion .*stripe-platform ml train"):
        evaluate_champion(shared, transactions=seed_tx, model_name="nobody")
    result = cli(tmp_path / "home", "evaluate", "--transactions", str(seed_file))
    assert result.returncode == 1
    assert "error: model 'fraud' has no champion" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_tracking_server_fails_before_training(seed_tx, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = home_settings(
        tmp_path, mlflow_tracking_uri=SecretStr(f"http://user:secret@127.0.0.1:{port}")
    )
    with pytest.raises(RegistryUnreachable, match="unreachable") as caught:
        train_fraud(settings, transactions=seed_tx, num_boost_round=ROUNDS)
    assert "secret" not in str(caught.value)  # the password is not printed
    with pytest.raises(RegistryUnreachable):
        evaluate_champion(settings, transactions=seed_tx)


# -- bad training files ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "error", "column"),
    [
        (lambda t: t.drop_columns(["customer_id"]), MissingColumn, "customer_id"),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("amount"), "amount", pc.cast(t["amount"], pa.string())
            ),
            MistypedColumn,
            "amount",
        ),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("label"), "label", pa.array(np.zeros(len(t), np.int8))
            ),
            NoPositiveLabels,
            "label",
        ),
    ],
    ids=["missing", "mistyped", "no-positives"],
)
def test_a_bad_training_file_registers_nothing(shared, seed_tx, tmp_path, change, error, column):
    path = tmp_path / "bad.parquet"
    pq.write_table(change(seed_tx.table), path)
    name = f"bad-{column}"
    with pytest.raises(error) as caught:
        train_fraud(shared, transactions=path, model_name=name, num_boost_round=ROUNDS)
    assert caught.value.column == column
    assert str(path) in str(caught.value)
    assert name not in registered_names(shared)
    assert not client(shared).get_experiment_by_name(name)  # not even a run was started


def test_the_command_names_the_bad_column(tmp_path, seed_tx):
    path = tmp_path / "bad.parquet"
    pq.write_table(seed_tx.table.drop_columns(["amount"]), path)
    home = tmp_path / "home"
    result = cli(home, "train", "--transactions", str(path))
    assert result.returncode == 1
    assert f"error: {path}: required column 'amount' is missing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (home / "mlflow" / "artifacts").exists()  # nothing logged


# -- the time split ----------------------------------------------------------------------------------------
def daily(
    days: int, frauds: dict[int, dt.datetime | None], *, start=dt.datetime(2025, 3, 1, tzinfo=UTC)
) -> Transactions:
    """One payment a day at noon for ``days`` days; ``frauds``: day -> its label time (None =
    unknown)."""
    rows = []
    for d in range(days):
        rows.append(
            {
                "transaction_id": f"t{d:03d}",
                "timestamp": start + dt.timedelta(days=d, hours=12),
                "customer_id": f"c{d % 3}",
                "merchant_id": "m1",
                "amount": 10.0,
                "label": int(d in frauds),
                "label_time": frauds.get(d),
            }
        )
    table = pa.Table.from_pylist(rows)
    table = table.set_column(
        6, "label_time", pa.array(table["label_time"].to_pylist(), pa.timestamp("us", tz="UTC"))
    )
    return canonicalize(table, source="hand-built")


def test_the_split_leaves_a_gap_and_uses_labels_known_at_the_test_start():
    start = dt.datetime(2025, 3, 1, tzinfo=UTC)
    # Day 2: a fraud reported on day 5 (known at the test start, day 15); day 8: reported on day
    # 20 (not yet known); day 9: no report time (taken as known); days 16 and 18: test frauds.
    tx = daily(
        30,
        {
            2: start + dt.timedelta(days=5),
            8: start + dt.timedelta(days=20),
            9: None,
            16: None,
            18: None,
        },
    )
    s = split(
        tx, SplitSpec(train_start=dt.date(2025, 3, 1), train_days=10, gap_days=5, test_days=10)
    )
    assert (s.train_start, s.train_end) == (start, start + dt.timedelta(days=10))
    assert (s.test_start, s.test_end) == (
        start + dt.timedelta(days=15),
        start + dt.timedelta(days=25),
    )
    assert s.train_rows.tolist() == list(range(10))  # days 0-9
    assert s.test_rows.tolist() == list(range(15, 25))  # days 15-24: days 10-14 are the gap
    assert s.train_labels.tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 1]  # day 8's not yet known
    assert s.labels_not_yet_known == 1
    assert s.test_labels.tolist() == [0, 1, 0, 1, 0, 0, 0, 0, 0, 0]

    # Defaults: the test period is the data's last test_days, the gap before it, training the rest.
    s = split(tx, SplitSpec(gap_days=3, test_days=12))
    assert s.test_start == start + dt.timedelta(days=18) and s.test_end == start + dt.timedelta(
        days=30
    )
    assert s.train_start == start and s.train_end == start + dt.timedelta(days=15)
    s = split(tx, SplitSpec(train_days=7, gap_days=3, test_days=12))
    assert s.train_start == start + dt.timedelta(days=8)


def test_the_split_refuses_periods_it_cannot_use():
    start = dt.datetime(2025, 3, 1, tzinfo=UTC)
    tx = daily(30, {2: None, 16: None})
    with pytest.raises(
        EmptyPeriod, match=r"the test period 2025-04-05 .. 2025-04-15 .* holds no transaction"
    ):
        split(
            tx, SplitSpec(train_start=dt.date(2025, 3, 1), train_days=30, gap_days=5, test_days=10)
        )
    with pytest.raises(EmptyPeriod, match="no training period.*--test-days"):
        split(tx, SplitSpec(test_days=30))
    with pytest.raises(EmptyPeriod, match="the training period 2025-01-01 .. 2025-01-11"):
        split(tx, SplitSpec(train_start=dt.date(2025, 1, 1), train_days=10))
    with pytest.raises(NoPositivesInPeriod, match="training period .* holds no fraud known"):
        split(
            tx, SplitSpec(train_start=dt.date(2025, 3, 5), train_days=5, gap_days=1, test_days=15)
        )
    late = daily(30, {2: start + dt.timedelta(days=29), 16: None})  # reported after the test start
    with pytest.raises(NoPositivesInPeriod, match=r"\(1 reported only after 2025-03-16\)"):
        split(
            late,
            SplitSpec(train_start=dt.date(2025, 3, 1), train_days=10, gap_days=5, test_days=10),
        )
    with pytest.raises(
        NoPositivesInPeriod, match="the test period .* holds no fraud in 10 transactions"
    ):
        split(
            tx, SplitSpec(train_start=dt.date(2025, 3, 1), train_days=10, gap_days=10, test_days=10)
        )


def test_an_empty_test_period_fails_training_before_anything_is_written(shared, seed_tx):
    with pytest.raises(EmptyPeriod, match="test period"):
        train_fraud(
            shared,
            transactions=seed_tx,
            model_name="empty-test",
            split=SplitSpec(train_start=dt.date(2025, 6, 1), train_days=220),  # test: 2026-01-14..
        )
    assert "empty-test" not in registered_names(shared)


# -- metrics on hand-computed cases -----------------------------------------------------------------------
def test_metrics_on_a_hand_computed_case():
    """4 frauds, 200 legitimate payments. Descending: 0.95 legit, 0.9 fraud, 0.8 fraud, 0.7 legit,
    0.5 fraud, 198 legit at 0.2, 0.1 fraud."""
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.5] + [0.2] * 198 + [0.1])
    labels = np.array([0, 1, 1, 0, 1] + [0] * 198 + [1])
    ts = np.array([np.datetime64("2025-05-01T10:00")] * len(scores))
    customers = np.arange(len(scores)).astype(str)  # one customer each
    m = evaluate(labels, scores, customers=customers, timestamps=ts, alert_budget=10 / 204, k=3)
    # Pairs where the fraud scores above the legit one: 199 + 199 + 198 + 0, of 4 x 200.
    assert m.roc_auc == pytest.approx(596 / 800)
    # Precision at each new recall level: 1/2, 2/3, 3/5, 4/204, each for a quarter of recall.
    assert m.average_precision == pytest.approx((1 / 2 + 2 / 3 + 3 / 5 + 4 / 204) / 4)
    # At most 2 of 200 legit flagged (1%): the threshold 0.5 catches 3 of 4 frauds.
    assert m.recall_at_1pct_fpr == pytest.approx(0.75)
    # 10 alerts: the 5 above 0.2 (3 frauds), then 5 of the 198 tied at 0.2 (all legit).
    assert (m.budget_alerts, m.budget_precision, m.budget_recall) == (
        10,
        pytest.approx(0.3),
        pytest.approx(0.75),
    )
    # One day, the top 3 customers: 0.95 legit, 0.9 fraud, 0.8 fraud.
    assert m.card_precision_at_k == pytest.approx(2 / 3) and m.card_precision_days == 1
    assert (m.transactions, m.positives) == (204, 4)


def test_ties_at_the_cut_count_as_a_random_order():
    # Above the cut: the 2.0 (a fraud); tied at 1.0: four payments, one fraud, two places left.
    assert expected_hits(np.array([1, 0, 1, 0, 0]), np.array([2.0, 1, 1, 1, 1]), 3) == 1.5
    assert expected_hits(np.array([1, 0, 1]), np.array([3.0, 2, 1]), 2) == 1.0
    assert (
        expected_hits(np.array([1, 0, 1]), np.array([3.0, 2, 1]), 5) == 2.0
    )  # more places than rows


def test_card_precision_per_day_by_hand():
    """Day 1: customers a (0.9, fraud), b (0.8), c (0.3 legit and 0.1 fraud: a fraud card scored
    0.3), d (0.2). Day 2: e only (fraud)."""
    rows = [
        ("a", "2025-05-01T09:00", 0.9, 1),
        ("b", "2025-05-01T10:00", 0.8, 0),
        ("c", "2025-05-01T11:00", 0.3, 0),
        ("c", "2025-05-01T12:00", 0.1, 1),
        ("d", "2025-05-01T23:59", 0.2, 0),
        ("e", "2025-05-02T00:30", 0.5, 1),
    ]
    customers = np.array([r[0] for r in rows])
    days = np.array([np.datetime64(r[1][:10]) for r in rows])
    scores = np.array([r[2] for r in rows])
    labels = np.array([r[3] for r in rows])
    # k=2: day 1 a, b -> 1/2; day 2 e alone -> 1/1. Mean 0.75.
    assert card_precision_at_k(labels, scores, customers, days, k=2) == (pytest.approx(0.75), 2)
    # k=3: day 1 a, b, c (c is a fraud card) -> 2/3; day 2 -> 1.
    assert card_precision_at_k(labels, scores, customers, days, k=3) == (pytest.approx(5 / 6), 2)
    # evaluate() makes the days from UTC timestamps.
    ts = np.array([np.datetime64(r[1]) for r in rows])
    assert evaluate(
        labels, scores, customers=customers, timestamps=ts, k=2
    ).card_precision_at_k == pytest.approx(0.75)


def test_metrics_refuse_a_period_without_both_classes():
    with pytest.raises(EvaluationError, match="0 fraud"):
        evaluate(
            np.zeros(3),
            np.array([0.1, 0.2, 0.3]),
            customers=np.array(["a"] * 3),
            timestamps=np.array([np.datetime64("2025-01-01")] * 3),
        )


def test_the_rules_fire_on_their_thresholds():
    import pandas as pd

    frame = pd.DataFrame(np.zeros((3, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES))
    frame.loc[0, "amount"] = 500.0  # at the threshold: fires
    frame.loc[1, "amount"] = 499.99
    frame.loc[1, "customer_count_1h"] = 3.0
    frame.loc[1, "ip_count_1h"] = 7.0
    frame.loc[2, "customer_amount_ratio_30d"] = np.nan  # unknown: never fires
    assert rules.rules_score(frame).tolist() == [1.0, 2.0, 0.0]


def test_a_training_file_round_trips_to_the_same_snapshot(seed_tx, seed_file):
    assert snapshot_id(read_transactions(seed_file)) == snapshot_id(seed_tx)
    changed = seed_tx.table.set_column(
        seed_tx.table.schema.get_field_index("amount"),
        "amount",
        pc.add(seed_tx.table["amount"], 0.01),
    )
    assert snapshot_id(canonicalize(changed, source="x")) != snapshot_id(seed_tx)
