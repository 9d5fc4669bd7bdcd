"""The model CI's smoke (Jenkinsfile, stage "Train/evaluate smoke": `pytest -m ml_smoke`; `make test`
runs it with everything else): a small training and evaluation of the fraud model on the seed's
planted fraud, end to end through the platform's own entry points, held to a quality floor.
Also checks that the Jenkinsfile's steps name files and tests that exist."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from ml_data import seed_transactions
from stripe_platform.config import load_settings
from stripe_platform.ml.split import SplitSpec
from stripe_platform.ml.train import evaluate_champion, train_fraud
from stripe_platform.paths import REPO_ROOT
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec

# The floor: the issue's goal (average precision at least twice the rules') and a ROC AUC no
# useful fraud model falls below on the seed's planted patterns.
MIN_AP_RATIO = 2.0
MIN_ROC_AUC = 0.9
SMOKE = "test_train_then_evaluate_clears_the_quality_floor"


@pytest.mark.ml_smoke
def test_train_then_evaluate_clears_the_quality_floor(tmp_path):
    data = build(make_spec(scale=0.02, seed=21, end=dt.date(2026, 1, 1), days=365))
    pq.write_table(seed_transactions(data).table, tmp_path / "history.parquet")
    settings = load_settings(home=tmp_path / "home", profile="embedded")
    split = SplitSpec(test_days=90, gap_days=7)

    trained = train_fraud(
        settings, transactions=tmp_path / "history.parquet", split=split, num_boost_round=100
    )
    assert trained.promoted and trained.version == "1"
    model, rules = trained.metrics, trained.rules_metrics
    assert model["positives"] >= 10  # enough frauds in the test period for the floor to mean much
    assert model["average_precision"] >= MIN_AP_RATIO * rules["average_precision"], (model, rules)
    assert model["roc_auc"] >= MIN_ROC_AUC, model

    # The evaluation command's path: the champion, reloaded from the registry, on the same period.
    evaluated = evaluate_champion(settings, transactions=tmp_path / "history.parquet", split=split)
    assert evaluated.version == "1"
    assert evaluated.metrics == pytest.approx(model, rel=1e-9)
    assert evaluated.rules_metrics == pytest.approx(rules, rel=1e-9)


def test_the_jenkinsfile_runs_steps_that_exist():
    text = (REPO_ROOT / "Jenkinsfile").read_text()
    commands = re.findall(r"sh '([^']+)'", text)
    assert commands, "no sh steps"
    paths = {p for c in commands for p in re.findall(r"((?:src|tests|dags)/[\w/.*-]+)", c)}
    assert {"src/stripe_platform/ml", "tests/test_k8s.py"} <= paths
    for path in paths:
        assert list(REPO_ROOT.glob(path)), f"{path} matches nothing"
    # The smoke stage selects this module's marked test, and the unit stage leaves it out.
    smoke = next(c for c in commands if "-m ml_smoke" in c)
    unit = next(c for c in commands if "not ml_smoke" in c)
    runner = "python3 -m uv run --frozen pytest"
    for command, expected in ((smoke, [SMOKE]), (unit, None)):
        assert command.startswith(runner), command
        # The same arguments, through a shell as Jenkins runs them (globs, quotes), collected only.
        args = re.sub(r"--junitxml=\S+", "", command[len(runner) :])
        done = subprocess.run(
            ["bash", "-c", f"{sys.executable} -m pytest --collect-only -q {args}"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        selected = [line.rsplit("::", 1)[1] for line in done.stdout.splitlines() if "::" in line]
        if expected is not None:
            assert selected == expected
        else:
            assert len(selected) > 20 and SMOKE not in selected
