"""A seeded platform with a trained champion, for the scoring, drift and DAG tests (import it from
a test module): the session's PostgreSQL and document server, a database of each per test, and a
real MLflow store (SQLite) in the test's tmp_path."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pydantic import SecretStr

from stripe_platform.config import Settings
from stripe_platform.ml.split import SplitSpec
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import Dataset, build
from stripe_platform.seed.spec import make_spec

if TYPE_CHECKING:
    from seed_templates import SeedTemplates

SPLIT = SplitSpec(test_days=180)  # the small seed's test period needs room for a few frauds
ROUNDS = 40  # boosting rounds: enough to beat the rules on the seed, quick to train


@dataclass
class Platform:
    settings: Settings
    data: Dataset
    docdb: object


def ml_settings(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **update: object
) -> Settings:
    """``settings`` with a real MLflow store in tmp_path (the working directory too: a store
    named by URI keeps its artifacts in ./mlruns)."""
    monkeypatch.chdir(tmp_path)
    return settings.model_copy(
        update={"mlflow_tracking_uri": SecretStr(f"sqlite:///{tmp_path}/mlflow.db"), **update}
    )


def seeded_platform(
    settings: Settings,
    database: str,
    docdb: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    scale: float = 0.01,
    max_documents: int = 300,
    templates: SeedTemplates | None = None,
) -> Platform:
    """``templates`` (the ``seed_templates`` fixture): the stores cloned from a template seeded
    once per session, not seeded again."""
    s = ml_settings(
        settings,
        tmp_path,
        monkeypatch,
        pg_database=database,
        mongodb_database=docdb.name,  # type: ignore[attr-defined]
    )
    data = build(
        make_spec(scale=scale, seed=5, end=dt.date(2026, 1, 1), max_documents=max_documents)
    )
    (templates or seed_load).seed(s, data, docdb)
    return Platform(s, data, docdb)


def train_champion(s: Settings, **kwargs: object):
    """A champion trained by the platform's own entry point (the first version is promoted)."""
    from stripe_platform.ml.train import train_fraud

    kwargs.setdefault("split", SPLIT)
    kwargs.setdefault("num_boost_round", ROUNDS)
    result = train_fraud(s, **kwargs)  # type: ignore[arg-type]
    return result
