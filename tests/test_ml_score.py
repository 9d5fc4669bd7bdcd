"""Batch scoring with the champion: the platform's payments into FraudScore and the Transaction
documents (idempotent, resumable, a new version scores again), a user's file into a parquet file,
and every refusal (no champion, other features, bad files) with nothing written. Real PostgreSQL,
FerretDB and MLflow (SQLite in tmp_path); the champion is trained by the platform's own code."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ml_data import seed_transactions
from ml_platform import ROUNDS, SPLIT, ml_settings, seeded_platform, train_champion
from stripe_platform.cli import app
from stripe_platform.config import get_settings
from stripe_platform.ml.contract import (
    MissingColumn,
    load_platform_transactions,
    read_transactions,
)
from stripe_platform.ml.features import FEATURE_NAMES, FeatureMismatch, batch_features
from stripe_platform.ml.registry import NoChampion, Registry, load_champion
from stripe_platform.ml.score import Scorer, ScoringError, score_file, score_platform
from stripe_platform.ml.train import train_fraud
from stripe_platform.oltp import db
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec


@pytest.fixture
def platform(settings, database, docdb, tmp_path, monkeypatch, seed_templates):
    return seeded_platform(
        settings, database, docdb, tmp_path, monkeypatch, templates=seed_templates
    )


def fraud_scores(s) -> dict[tuple[int, int], tuple]:
    with db.connect(s, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT TransactionID, ModelVersion, Score, IsFraud, Threshold, ScoredAt, "
            "DocumentWrittenAt FROM FraudScore"
        ).fetchall()
    return {(r[0], r[1]): r[2:] for r in rows}


def documents(docdb) -> dict[int, tuple]:
    return {
        d["transaction_id"]: (d.get("AnomalyScore"), d.get("isFraud"))
        for d in docdb.Transaction.find({}, {"transaction_id": 1, "AnomalyScore": 1, "isFraud": 1})
    }


def test_scoring_writes_each_payment_once_and_resumes_what_was_left(platform):
    s, docdb = platform.settings, platform.docdb
    trained = train_champion(s)
    assert trained.promoted
    n = platform.data.transactions.num_rows
    documented = docdb.Transaction.count_documents({})
    assert documented == 300 and n == 10_000

    first = score_platform(s)
    assert (first.scored, first.already_scored) == (n, 0)
    assert first.documents_updated == documented
    assert first.documents_missing == n - documented
    # On the embedded FerretDB, one set-based UPDATE of its backend table per batch of 10,000.
    assert first.document_statements == 1
    rows = fraud_scores(s)
    assert len(rows) == n and {v for _, v in rows} == {int(trained.version)}

    # The scores are the model's on each payment's point-in-time features (computed here from
    # the whole history, the scorer's from the history it loaded).
    loaded = load_champion(Registry.from_settings(s), s.ml_model_name)
    history = load_platform_transactions(s, require_labels=False)
    expected = loaded.raw.predict(batch_features(history)[list(FEATURE_NAMES)])
    ids = [int(i) for i in history.table["transaction_id"].to_pylist()]
    got = np.array([rows[(i, int(trained.version))][0] for i in ids])
    assert np.allclose(got, expected, rtol=0, atol=1e-12)
    threshold = Scorer.from_loaded(loaded).threshold
    assert all(r[2] == threshold and r[1] == (r[0] >= threshold) for r in rows.values())
    assert first.flagged == sum(r[1] for r in rows.values())
    # Every document carries its payment's score and decision, as the brief's shape has them.
    docs = documents(docdb)
    version = int(trained.version)
    for tid, (score, is_fraud) in docs.items():
        assert score == rows[(tid, version)][0] and is_fraud == int(rows[(tid, version)][1])
    assert all(r[4] is not None for r in rows.values())  # every outbox row written

    # Again: nothing to score, nothing to write.
    again = score_platform(s)
    assert (again.scored, again.already_scored, again.documents_updated) == (0, n, 0)
    assert again.document_statements == 0
    assert fraud_scores(s) == rows

    # Payments not scored yet (rows removed here) are scored alone, with the same history.
    with db.connect(s, autocommit=True) as conn:
        removed = [
            r[0]
            for r in conn.execute(
                "DELETE FROM FraudScore WHERE TransactionID % 97 = 0 RETURNING TransactionID"
            )
        ]
    third = score_platform(s)
    assert third.scored == len(removed) > 50
    after = fraud_scores(s)
    for tid in removed:
        assert after[(tid, version)][0] == rows[(tid, version)][0]
    # An interrupted document write (rows scored, documents not yet marked) resumes: exactly the
    # documents still pending are written, once.
    pending = sorted(docs)[:45]
    docdb.Transaction.update_many(
        {"transaction_id": {"$in": pending}}, {"$set": {"AnomalyScore": None}}
    )
    with db.connect(s, autocommit=True) as conn:
        conn.execute(
            "UPDATE FraudScore SET DocumentWrittenAt = NULL WHERE TransactionID = ANY(%s)",
            (pending,),
        )
    fourth = score_platform(s)
    assert fourth.scored == 0
    assert fourth.documents_updated == len(pending) and fourth.document_statements == 1
    assert documents(docdb) == docs


def test_a_new_champion_version_scores_every_payment_again(platform):
    s = platform.settings
    train_champion(s)
    score_platform(s)
    second = train_champion(s, num_boost_round=60)
    Registry.from_settings(s).promote(s.ml_model_name, second.version)
    report = score_platform(s)
    assert report.model_version == second.version
    n = platform.data.transactions.num_rows
    assert report.scored == n and report.already_scored == 0
    versions = {}
    for _, version in fraud_scores(s):
        versions[version] = versions.get(version, 0) + 1
    assert versions == {1: n, int(second.version): n}
    latest = {tid: row[0] for (tid, v), row in fraud_scores(s).items() if v == int(second.version)}
    for tid, (score, _) in documents(platform.docdb).items():
        assert score == latest[tid]  # the documents carry the newest champion's scores


# -- a user's file --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def user_history() -> pa.Table:
    """A user's labelled history in the contract's shape: integer ids, a terminal_id column."""
    import datetime as dt

    t = seed_transactions(build(make_spec(scale=0.01, seed=9, end=dt.date(2026, 1, 1)))).table
    t = t.set_column(0, "transaction_id", t["transaction_id"].cast(pa.int64()))
    return t.rename_columns(["terminal_id" if c == "merchant_id" else c for c in t.column_names])


@pytest.fixture
def file_champion(settings, tmp_path, monkeypatch, user_history):
    """A champion trained on the user's file (no platform data needed)."""
    s = ml_settings(settings, tmp_path, monkeypatch, ml_model_name="fraud_file")
    pq.write_table(user_history, tmp_path / "history.parquet")
    result = train_fraud(
        s, transactions=tmp_path / "history.parquet", split=SPLIT, num_boost_round=ROUNDS
    )
    assert result.promoted
    return s


def test_a_users_file_gets_one_score_per_transaction_id(file_champion, tmp_path, user_history):
    s = file_champion
    unlabelled = user_history.drop_columns(["label", "label_time"])
    pq.write_table(unlabelled, tmp_path / "new.parquet")
    report = score_file(s, tmp_path / "new.parquet", tmp_path / "scores.parquet")
    out = pq.read_table(tmp_path / "scores.parquet")
    assert out.schema.names == ["transaction_id", "score", "is_fraud"]
    assert out.schema.field("transaction_id").type == pa.int64()  # as the user wrote them
    assert out.num_rows == report.rows == unlabelled.num_rows
    assert sorted(out["transaction_id"].to_pylist()) == sorted(
        unlabelled["transaction_id"].to_pylist()
    )
    # The model's scores on features computed from the file's own history.
    loaded = load_champion(Registry.from_settings(s), "fraud_file")
    canonical = read_transactions(tmp_path / "new.parquet", require_labels=False)
    expected = dict(
        zip(
            [int(i) for i in canonical.table["transaction_id"].to_pylist()],
            loaded.raw.predict(batch_features(canonical)[list(FEATURE_NAMES)]),
            strict=True,
        )
    )
    got = dict(zip(out["transaction_id"].to_pylist(), out["score"].to_pylist(), strict=True))
    assert got.keys() == expected.keys()
    assert max(abs(got[k] - expected[k]) for k in got) < 1e-12
    assert out["is_fraud"].to_pylist() == [v >= report.threshold for v in out["score"].to_pylist()]
    metadata = out.schema.metadata
    assert metadata[b"stripe_platform.model_name"] == b"fraud_file"
    assert metadata[b"stripe_platform.model_version"] == loaded.version.encode()
    assert "terminal_id used as merchant_id" in report.notes


def test_bad_files_and_outputs_are_refused_and_nothing_is_written(
    file_champion, tmp_path, user_history
):
    s = file_champion
    out = tmp_path / "scores.parquet"
    pq.write_table(user_history.drop_columns(["amount"]), tmp_path / "no_amount.parquet")
    with pytest.raises(MissingColumn, match=r"no_amount.parquet: required column 'amount'"):
        score_file(s, tmp_path / "no_amount.parquet", out)
    pq.write_table(user_history, tmp_path / "ok.parquet")
    with pytest.raises(ScoringError, match="the input file itself"):
        score_file(s, tmp_path / "ok.parquet", tmp_path / "ok.parquet")
    with pytest.raises(ScoringError, match="does not exist"):
        score_file(s, tmp_path / "ok.parquet", tmp_path / "nowhere" / "scores.parquet")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "history.parquet",
        "no_amount.parquet",
        "ok.parquet",
    ]
    # Through the CLI: one line naming the column, exit 1, no traceback.
    env = {
        "STRIPE_PLATFORM_HOME": str(s.home_dir),
        "STRIPE_PLATFORM_MLFLOW_TRACKING_URI": s.mlflow_tracking_uri.get_secret_value(),
        "STRIPE_PLATFORM_ML_MODEL_NAME": "fraud_file",
    }
    args = ["ml", "score", "--transactions", str(tmp_path / "no_amount.parquet")]
    get_settings.cache_clear()  # the CLI's settings come from this environment
    try:
        done = CliRunner().invoke(app, [*args, "--output", str(out)], env=env)
        assert done.exit_code == 1
        assert "required column 'amount' is missing" in done.stderr
        assert "Traceback" not in done.output + done.stderr
        done = CliRunner().invoke(app, args, env=env)
    finally:
        get_settings.cache_clear()
    assert done.exit_code == 2 and "--transactions and --output go together" in done.stderr
    assert not out.exists()


def test_no_champion_or_other_features_refuse_to_score(
    settings, database, tmp_path, monkeypatch, user_history
):
    import lightgbm as lgb
    import mlflow.lightgbm

    s = ml_settings(settings, tmp_path, monkeypatch, pg_database=database, ml_model_name="f2")
    with pytest.raises(NoChampion, match="models:/f2@champion"):
        score_platform(s)
    # A champion trained on another feature definition (an older version of the code).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, len(FEATURE_NAMES)))
    booster = lgb.train(
        {"objective": "binary", "verbosity": -1}, lgb.Dataset(x, (x[:, 0] > 0).astype(int)), 5
    )
    registry = Registry.from_settings(s)
    old = registry.log_and_register(
        "f2",
        log_model=lambda: mlflow.lightgbm.log_model(booster, name="model"),
        params={},
        metrics={},
        tags={},
        documents={},
        version_tags={},
        feature_version="fv0-000000000000",
        feature_names=FEATURE_NAMES,
    )
    registry.promote("f2", old.version)
    with pytest.raises(FeatureMismatch, match="trained with features fv0-000000000000"):
        score_platform(s)
    pq.write_table(user_history, tmp_path / "in.parquet")
    with pytest.raises(FeatureMismatch):
        score_file(s, tmp_path / "in.parquet", tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    with db.connect(s, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM FraudScore").fetchone() == (0,)
