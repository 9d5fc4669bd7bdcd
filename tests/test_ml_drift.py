"""Drift (Evidently behind ml/drift.py): a later window of the seed's payments gives no drift verdict
against an earlier one, the same window with shifted features does; features present on one side
only drift; the report and verdict are written whole; on the platform, the latest window is
compared with the champion's training period (real PostgreSQL, MLflow in tmp_path), and a champion
trained on a file is refused."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ml_data import seed_transactions
from ml_platform import ROUNDS, SPLIT, ml_settings, seeded_platform, train_champion
from stripe_platform.cli import app
from stripe_platform.config import get_settings
from stripe_platform.ml import drift
from stripe_platform.ml.features import FEATURE_NAMES, batch_features
from stripe_platform.ml.registry import NoChampion
from stripe_platform.ml.train import train_fraud
from stripe_platform.oltp import db
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec

UTC = dt.UTC
# Features a change of prices (amounts x4) and of behaviour (bursts: short-window counts + 3)
# would move. The seed's payments are not stationary over long windows (customers accumulate
# history: 7- and 30-day counts grow), so those are left out of the shift.
SHIFTED = [
    "amount",
    "customer_amount_sum_1h",
    "customer_amount_sum_24h",
    "customer_amount_mean_30d",
    "merchant_amount_mean_7d",
    "device_amount_sum_24h",
    "ip_amount_sum_24h",
    "customer_count_1h",
    "customer_count_24h",
    "device_count_1h",
    "device_count_24h",
    "ip_count_1h",
    "ip_count_24h",
]


@pytest.fixture(scope="module")
def windows():
    """Features of a reference period (after a warm-up) and of a later 30-day window."""
    data = build(make_spec(scale=0.02, seed=3, end=dt.date(2026, 1, 1)))
    t = seed_transactions(data)
    features = batch_features(t)
    ts = t.table["timestamp"]

    def between(a: dt.date, b: dt.date):
        lo, hi = (dt.datetime(d.year, d.month, d.day, tzinfo=UTC) for d in (a, b))
        mask = pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi)).to_numpy(zero_copy_only=False)
        return features[mask].reset_index(drop=True)

    reference = between(dt.date(2024, 4, 1), dt.date(2025, 4, 1))
    current = between(dt.date(2025, 10, 1), dt.date(2025, 11, 1))
    assert len(reference) > 8_000 and len(current) > 700
    return reference, current


def test_the_same_behaviour_later_is_not_drift_and_a_shifted_one_is(windows):
    assert set(SHIFTED) <= set(FEATURE_NAMES)
    reference, current = windows
    calm = drift.compare(reference, current).verdict
    assert calm.drifted is False
    assert calm.drift_share < 0.5
    assert not set(SHIFTED) & set(calm.drifted_features)
    assert [f.name for f in calm.features] == list(FEATURE_NAMES)
    assert all(f.compared and f.method and f.score is not None for f in calm.features)

    shifted = current.copy()
    for name in SHIFTED:
        shifted[name] = shifted[name] * 4 if "amount" in name else shifted[name] + 3
    verdict = drift.compare(reference, shifted).verdict
    assert verdict.drifted is True
    assert set(verdict.drifted_features) == set(SHIFTED) | set(calm.drifted_features)
    assert verdict.drift_share == len(verdict.drifted_features) / len(FEATURE_NAMES) >= 0.5
    # The rule is a share: the same shift judged against a higher bar is not drift.
    assert drift.compare(reference, shifted, drift_share=0.9).verdict.drifted is False


def test_features_present_on_one_side_only_drift_and_absent_ones_are_not_compared(windows):
    reference, current = windows
    no_devices = current.copy()
    device = [c for c in FEATURE_NAMES if c.startswith("device_")]
    no_devices[device] = np.nan  # a source stopped sending device ids
    verdict = drift.compare(reference, no_devices).verdict
    by_name = {f.name: f for f in verdict.features}
    assert all(by_name[c].drifted and by_name[c].method == "presence" for c in device)
    both = reference.copy()
    both[device] = np.nan
    verdict = drift.compare(both, no_devices).verdict
    assert all(not by_name.compared for by_name in verdict.features if by_name.name in device)
    assert sum(f.compared for f in verdict.features) == len(FEATURE_NAMES) - len(device)
    with pytest.raises(drift.DriftError, match="no payments in the window"):
        drift.compare(reference, current.iloc[:0])


def test_report_and_verdict_are_written_whole(windows, tmp_path):
    reference, current = windows
    comparison = drift.compare(reference[:3000], current)
    verdict = drift.write_verdict(comparison, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.html", "verdict.json"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.lstrip().lower().startswith("<html") or "<!doctype html" in html.lower()
    written = json.loads((tmp_path / "run" / "verdict.json").read_text())
    assert written == json.loads(json.dumps(verdict.as_dict()))
    assert written["reference"]["rows"] == 3000 and written["current"]["rows"] == len(current)
    assert written["evidently_version"].startswith("0.7.")


# -- the platform ------------------------------------------------------------------------------------
@pytest.fixture
def platform(settings, database, docdb, tmp_path, monkeypatch, seed_templates):
    return seeded_platform(
        settings, database, docdb, tmp_path, monkeypatch, templates=seed_templates
    )


def test_the_platforms_latest_window_against_the_champions_training(platform):
    s = platform.settings
    champion = train_champion(s)
    verdict = drift.check_platform_drift(s, window_days=30)
    assert verdict.model == {"name": s.ml_model_name, "version": champion.version}
    assert verdict.reference.start.startswith(champion.split["train_start"])
    assert verdict.reference.end.startswith(champion.split["train_end"])
    with db.connect(s) as conn:
        (latest,) = conn.execute("SELECT max(DateTime) FROM Transaction").fetchone()
        (in_window,) = conn.execute(
            "SELECT count(*) FROM Transaction WHERE DateTime > %s",
            (latest - dt.timedelta(days=30),),
        ).fetchone()
        (in_training,) = conn.execute(
            "SELECT count(*) FROM Transaction WHERE DateTime >= %s AND DateTime < %s",
            (champion.split["train_start"], champion.split["train_end"]),
        ).fetchone()
    assert verdict.current.rows == in_window and verdict.reference.rows == in_training
    assert verdict.drifted is False
    home = s.home_dir / "ml" / "drift"
    assert json.loads((home / "latest.json").read_text()) == json.loads(
        json.dumps(verdict.as_dict())
    )
    assert verdict.html_path and (home / "latest.json").parent == home

    # Prices change for the latest month: amounts x10 in PostgreSQL.
    with db.connect(s, autocommit=True) as conn:
        conn.execute(
            "UPDATE Transaction SET Amount = Amount * 10 WHERE DateTime > %s",
            (latest - dt.timedelta(days=30),),
        )
    moved = drift.check_platform_drift(s, window_days=30, drift_share=0.2)
    assert moved.drifted is True
    assert {"amount", "customer_amount_sum_24h", "merchant_amount_mean_7d"} <= set(
        moved.drifted_features
    )
    # The CLI prints the same verdict as JSON.
    env = {
        "STRIPE_PLATFORM_HOME": str(s.home_dir),
        "STRIPE_PLATFORM_PG_DATABASE": s.pg_database,
        "STRIPE_PLATFORM_MLFLOW_TRACKING_URI": s.mlflow_tracking_uri.get_secret_value(),
        "STRIPE_PLATFORM_ML_MODEL_NAME": s.ml_model_name,
    }
    get_settings.cache_clear()
    try:
        done = CliRunner().invoke(app, ["ml", "drift", "--window-days", "30", "--json"], env=env)
    finally:
        get_settings.cache_clear()
    assert done.exit_code == 0, done.output + done.stderr
    printed = json.loads(done.stdout)
    # The same comparison; only the verdict's bar differs (the CLI's default share, 0.5).
    assert printed["drifted_features"] == moved.drifted_features
    assert printed["drift_share"] == moved.drift_share
    assert printed["drifted"] == (moved.drift_share >= 0.5)


def test_a_champion_trained_on_a_file_has_no_platform_reference(
    settings, database, tmp_path, monkeypatch
):
    s = ml_settings(settings, tmp_path, monkeypatch, pg_database=database, ml_model_name="ffile")
    reports = s.home_dir / "ml" / "drift"
    before = sorted(reports.iterdir()) if reports.exists() else []
    with pytest.raises(NoChampion, match="models:/ffile@champion"):
        drift.check_platform_drift(s)
    data = build(make_spec(scale=0.01, seed=9, end=dt.date(2026, 1, 1)))
    pq.write_table(seed_transactions(data).table, tmp_path / "history.parquet")
    train_fraud(s, transactions=tmp_path / "history.parquet", split=SPLIT, num_boost_round=ROUNDS)
    with pytest.raises(drift.DriftError, match=r"history\.parquet, not the platform's"):
        drift.check_platform_drift(s)
    assert (sorted(reports.iterdir()) if reports.exists() else []) == before  # nothing written
