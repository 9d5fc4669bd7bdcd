"""The model the API serves: the champion, kept current by a background refresher.

:class:`ModelHolder` loads ``models:/<ml_model_name>@champion`` and checks the alias again every
few seconds in a thread of its own; a new champion is loaded there and swapped in (one reference
assignment: a request sees the old model or the new one, never half of each). A failed check (an
unreachable MLflow, a version whose model cannot be loaded or was trained on other features, no
champion any more) keeps the last good model serving and is reported by readiness. Nothing in a
request touches MLflow.

:class:`ServingModel` scores one payment with LightGBM's booster itself on a numpy row (about
40 us; MLflow's pyfunc wrapper adds a schema check and a DataFrame, about 1 ms) and explains it
with the booster's SHAP values (``pred_contrib``). Another kind of model is scored through its
pyfunc wrapper (``Scorer.scores``) and gives no contributions.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stripe_platform.errors import PlatformError
from stripe_platform.ml.features import FEATURE_NAMES
from stripe_platform.ml.score import Scorer, ScoringError

if TYPE_CHECKING:
    from stripe_platform.config import Settings
    from stripe_platform.ml.registry import Registry

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0  # how often the champion alias is read again
TOP_CONTRIBUTIONS = 5


@dataclass(frozen=True)
class Scored:
    score: float
    is_fraud: bool
    contributions: list[tuple[str, float, float]] | None  # (feature, value, contribution)


@dataclass(frozen=True)
class ServingModel:
    scorer: Scorer
    booster: Any | None  # lightgbm.Booster, or None: scored through the pyfunc wrapper
    order: np.ndarray  # the model's feature order as indices into FEATURE_NAMES
    loaded_at: dt.datetime

    @classmethod
    def from_scorer(cls, scorer: Scorer) -> ServingModel:
        raw = scorer.loaded.raw
        booster = raw if type(raw).__module__.startswith("lightgbm") else None
        # load_version refused any model whose names differ from the code's, so this is the
        # identity today; it keeps the row right if a model ever recorded another order.
        order = np.array([FEATURE_NAMES.index(n) for n in scorer.loaded.feature_names])
        return cls(scorer, booster, order, dt.datetime.now(dt.UTC))

    @property
    def names(self) -> list[str]:
        return self.scorer.loaded.feature_names

    def score(self, features: np.ndarray) -> Scored:
        """Score one payment's feature vector (``FEATURE_NAMES`` order)."""
        row = features[self.order].reshape(1, -1)
        contributions = None
        if self.booster is not None:
            score = float(self.booster.predict(row, num_threads=1)[0])
            # SHAP values in log-odds, one per feature, then the expected value (dropped).
            shap = self.booster.predict(row, pred_contrib=True, num_threads=1)[0][:-1]
            top = np.argsort(-np.abs(shap), kind="stable")[:TOP_CONTRIBUTIONS]
            names = self.names
            contributions = [(names[i], float(row[0, i]), float(shap[i])) for i in top]
        else:
            import pandas as pd

            score = float(self.scorer.scores(pd.DataFrame(row, columns=self.names))[0])
        if not 0 <= score <= 1:  # NaN too
            raise ScoringError(f"{self.scorer.label} returned {score}, not a probability")
        return Scored(score, score >= self.scorer.threshold, contributions)


class ModelHolder:
    """The champion now serving, and what the last check of the registry found."""

    def __init__(self, settings: Settings, *, registry: Registry | None = None) -> None:
        from stripe_platform.ml.registry import Registry

        self.registry = registry or Registry.from_settings(settings)
        self.model_name = settings.ml_model_name
        self.current: ServingModel | None = None
        self.error: str | None = None  # the last check's failure (None: it succeeded)
        self.checked_at: dt.datetime | None = None
        self.checked = threading.Event()  # set once the first check has ended
        self._lock = threading.Lock()  # one check at a time

    def refresh(self) -> ServingModel | None:
        """Read the champion alias; load the version it names unless it is the one serving.
        Any failure keeps the model serving and is remembered for readiness."""
        from stripe_platform.ml import registry as reg

        with self._lock:
            try:
                self.registry.check()  # a dead server fails in seconds, not MLflow's retries
                version = self.registry.require_champion(self.model_name)
                current = self.current
                if current is None or current.scorer.version != str(version.version):
                    scorer = Scorer.from_loaded(reg.load_version(self.registry, version))
                    self.current = ServingModel.from_scorer(scorer)
                    log.info("serving %s", scorer.label)
                self.error = None
            except PlatformError as exc:
                self.error = str(exc)
            except Exception as exc:  # MLflow raises anything on a broken model
                # The refresher must outlive whatever one check meets: the last model serves.
                log.exception("checking the champion failed")
                self.error = f"{type(exc).__name__}: {exc}"
            finally:
                self.checked_at = dt.datetime.now(dt.UTC)
                self.checked.set()
            if self.error is not None:
                log.warning("champion check: %s", self.error)
            return self.current

    def run(self, stop: threading.Event, interval: float = REFRESH_SECONDS) -> None:
        """The refresher thread's loop: a check now, then every ``interval`` seconds."""
        while True:
            self.refresh()
            if stop.wait(interval):
                return

    def detail(self) -> str:
        current = self.current
        if current is None:
            return "no model loaded" if self.checked.is_set() else "loading the champion"
        label = current.scorer.label
        if self.error is not None:
            return f"serving {label}, the last good champion (the last check failed)"
        return f"serving {label} (models:/{self.model_name}@champion)"
