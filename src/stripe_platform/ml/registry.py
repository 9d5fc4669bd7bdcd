"""The model registry: MLflow, models addressed by alias (``models:/fraud@champion``), never by stage.

Where: on the ``embedded`` profile the platform home keeps its own store, a SQLite database
``<home>/mlflow/mlflow.db`` (runs, params, metrics, registered models, aliases) and the artifacts
(the model files) under ``<home>/mlflow/artifacts``; no server runs. ``mlflow_tracking_uri``
(``STRIPE_PLATFORM_MLFLOW_TRACKING_URI``) names another store instead: an MLflow tracking server
(``http://host:5000``, which keeps its own artifacts) or a database URI (its artifacts beside a
SQLite file, else under ``<home>/mlflow/artifacts``). The same URI serves as tracking and
registry store.

What is generic (any model name: the fraud model, later the log anomaly model):

- :class:`Registry` (:meth:`Registry.from_settings`): reachability (:meth:`Registry.check`, a
  dead server is a :class:`RegistryUnreachable` in seconds, not MLflow's minutes of retries), the
  experiment of a model, :meth:`Registry.log_and_register` (one run: params, metrics, tags, JSON
  documents, the model through the caller's flavor, then a registered version with tags),
  :meth:`Registry.champion` / :meth:`Registry.require_champion` (:class:`NoChampion`),
  :meth:`Registry.promote` (moves the ``champion`` alias).
- :func:`decide`: the promotion gate's rule, on one higher-is-better metric measured for both the
  candidate and the champion on the same held-back payments.
- :func:`load_champion`: the champion's version and its model (MLflow pyfunc), after checking the
  feature version and names recorded on the version against the code's
  (:func:`stripe_platform.ml.features.check_compatible` by default): a model trained on other
  features refuses to load (:class:`~stripe_platform.ml.features.FeatureMismatch`).

Every version carries the tags ``feature_version`` and ``feature_names`` (JSON list): what the
scorer checks. MLflow stages (deprecated) are never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from stripe_platform.errors import PlatformError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo
    from mlflow.pyfunc import PyFuncModel

    from stripe_platform.config import Settings

CHAMPION = "champion"
TAG_FEATURE_VERSION = "feature_version"
TAG_FEATURE_NAMES = "feature_names"
PROBE_TIMEOUT_S = 5.0


# The command that trains each model other than the fraud one (`ml train`), for the errors.
TRAIN_COMMANDS = {"log_anomaly": "audit model train"}


class RegistryError(PlatformError, RuntimeError):
    """The model registry refused or failed an operation; the message names the store."""


class RegistryUnreachable(RegistryError):
    """The tracking store cannot be reached or opened."""


class NoChampion(RegistryError, LookupError):
    """The model has no version with the ``champion`` alias (none trained, or none promoted)."""


def _shown(uri: str) -> str:
    """The URI without a password, for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def _translated(registry: Registry, what: str) -> Iterator[None]:
    """MLflow's (and its backends') failures as one RegistryError naming the store and what was
    being done; the platform's own errors pass through."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except PlatformError:
        raise
    except MlflowException as exc:
        raise RegistryError(f"MLflow store {registry.shown}: {what} failed: {exc.message}") from exc
    except (SQLAlchemyError, OSError) as exc:
        raise RegistryUnreachable(
            f"MLflow store {registry.shown}: {what} failed: {type(exc).__name__}: {exc}"
        ) from exc


@dataclass(frozen=True)
class Decision:
    """The promotion gate's verdict for one candidate."""

    promote: bool
    reason: str
    metric: str
    candidate: float
    champion: float | None


def decide(
    candidate: float, champion: float | None, *, metric: str, champion_version: str | None = None
) -> Decision:
    """Promote when there is no champion to beat (``champion`` None: none yet, or one that can no
    longer be evaluated) or when the candidate's ``metric`` is strictly higher than the
    champion's on the same payments; a tie keeps the champion."""
    if champion is None:
        return Decision(True, "no champion to beat", metric, candidate, None)
    against = f"champion version {champion_version}" if champion_version else "the champion"
    if candidate > champion:
        reason = f"{metric} {candidate:.4f} beats {against}'s {champion:.4f}"
        return Decision(True, reason, metric, candidate, champion)
    reason = f"{metric} {candidate:.4f} does not beat {against}'s {champion:.4f}"
    return Decision(False, reason, metric, candidate, champion)


@dataclass(frozen=True)
class Registered:
    run_id: str
    version: str
    model_uri: str


@dataclass(frozen=True)
class Registry:
    """One MLflow store (tracking and registry). ``artifact_location``: where experiments this
    code creates keep their artifacts (the home's store); None leaves it to the server."""

    tracking_uri: str
    artifact_location: str | None = None
    local_dir: Path | None = None  # the home's store directory, created on first use

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        root = settings.home_dir / "mlflow"
        if settings.mlflow_tracking_uri is not None:
            uri = settings.mlflow_tracking_uri.get_secret_value()
            scheme = urlsplit(uri).scheme
            if scheme in ("http", "https"):
                return cls(uri)  # the server keeps the artifacts
            # A database URI has no artifact store: MLflow would write to ./mlruns wherever the
            # process runs. A SQLite file keeps them beside it, another database in the home.
            if scheme == "sqlite" and uri.startswith("sqlite:///"):
                artifacts = Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts"
            else:
                artifacts = root / "artifacts"
            return cls(uri, artifact_location=artifacts.as_uri())
        return cls(
            f"sqlite:///{root / 'mlflow.db'}",
            artifact_location=(root / "artifacts").as_uri(),
            local_dir=root,
        )

    @property
    def shown(self) -> str:
        return _shown(self.tracking_uri)

    # -- reachability ---------------------------------------------------------------------------
    def check(self) -> None:
        """Raise RegistryUnreachable unless the store answers (a server) or can be opened (the
        home's SQLite file: its directory is created; a SQLite file not made yet: its directory
        is writable, and the first write makes it)."""
        scheme = urlsplit(self.tracking_uri).scheme
        if scheme in ("http", "https"):
            parts = urlsplit(self.tracking_uri)
            # urllib takes no user:password in a URL: the host alone, credentials as a header.
            host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
            url = urlunsplit(parts._replace(netloc=host)).rstrip("/") + "/health"
            request = urllib.request.Request(url)  # noqa: S310 - http(s) only
            if parts.username is not None:
                token = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                request.add_header("Authorization", f"Basic {b64encode(token.encode()).decode()}")
            try:
                with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):  # noqa: S310 - http(s) only
                    pass
            except urllib.error.HTTPError:
                pass  # it answered: a server without /health is still there
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise RegistryUnreachable(
                    f"MLflow tracking server {self.shown} is unreachable ({reason}); start it "
                    "or unset STRIPE_PLATFORM_MLFLOW_TRACKING_URI to use the home's store"
                ) from None
        if self.local_dir is not None:
            try:
                self.local_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RegistryUnreachable(
                    f"the home's MLflow store {self.local_dir} cannot be created ({exc.strerror})"
                ) from None
        missing = self.missing_file()
        if missing is not None:
            # Not opened: MLflow would create its tables now (seconds of migrations) for a store
            # that may only be asked for a champion; the first write creates it.
            if not os.access(missing.parent, os.W_OK | os.X_OK):
                raise RegistryUnreachable(
                    f"MLflow store {self.shown}: {missing} cannot be created (its directory is "
                    "missing or not writable)"
                )
            return
        with _translated(self, "opening the store"):
            self.client().search_experiments(max_results=1)

    def missing_file(self) -> Path | None:
        """The store's SQLite file when the store is one and the file is not there yet (nothing
        was ever logged: no model, no champion); None otherwise."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        path = Path(unquote(self.tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]))
        return None if path.exists() else path

    def client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """MLflow's fluent API (start_run, log_model) bound to this store for the block: it keeps
        its URIs in process globals, restored after."""
        import mlflow

        previous = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])

    # -- runs and versions ------------------------------------------------------------------------
    def create_missing_file(self) -> None:
        """Make a SQLite store not made yet, whole: MLflow's migrations (a hundred-odd schema
        changes) run on a temporary file without waiting for the disk after each one, which is
        then flushed once and renamed into place; a crash leaves no half-made store. Measured on
        2 busy cores: 3.4 s against 5.1 s in place."""
        path = self.missing_file()
        if path is None:
            return
        import sqlite3

        from mlflow import MlflowClient
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        # A new name each time: MLflow keeps a store per URI for the process's life.
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
        os.close(fd)
        tmp = Path(name)

        def unsynced(connection: Any, _record: Any) -> None:
            if isinstance(connection, sqlite3.Connection):
                files = {row[2] for row in connection.execute("PRAGMA database_list")}
                if str(tmp) in files:
                    connection.execute("PRAGMA synchronous=OFF")
                    connection.execute("PRAGMA journal_mode=MEMORY")

        uri = f"sqlite:///{tmp}"
        event.listen(Engine, "connect", unsynced)
        try:
            with _translated(self, "creating the store"):
                MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
            with tmp.open("rb+") as made:
                os.fsync(made.fileno())
            os.replace(tmp, path)
        finally:
            event.remove(Engine, "connect", unsynced)
            tmp.unlink(missing_ok=True)

    def experiment_id(self, name: str) -> str:
        """The experiment named ``name`` (one per model), created on first use."""
        self.create_missing_file()
        client = self.client()
        with _translated(self, f"finding experiment {name!r}"):
            found = client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            return client.create_experiment(name, artifact_location=self.artifact_location)

    def log_and_register(
        self,
        model_name: str,
        *,
        log_model: Callable[[], ModelInfo],
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        documents: Mapping[str, object],
        version_tags: Mapping[str, str],
        feature_version: str,
        feature_names: Sequence[str],
    ) -> Registered:
        """One run in the model's experiment: ``params``, ``metrics``, ``tags``, each of
        ``documents`` as a JSON artifact (``name.json``), the model (``log_model()`` calls an
        MLflow flavor's log_model inside the run), then a new registered version of
        ``model_name`` tagged with ``version_tags`` and the feature version and names. A failure
        before the version is registered leaves a run marked failed and no version."""
        import mlflow

        experiment = self.experiment_id(model_name)
        with self.active(), _translated(self, f"logging a run of {model_name!r}"):
            with mlflow.start_run(experiment_id=experiment) as run:
                mlflow.log_params(dict(params))
                mlflow.log_metrics(dict(metrics))
                mlflow.set_tags(
                    {
                        **tags,
                        TAG_FEATURE_VERSION: feature_version,
                        TAG_FEATURE_NAMES: json.dumps(list(feature_names)),
                    }
                )
                for name, document in documents.items():
                    mlflow.log_dict(document, f"{name}.json")
                info = log_model()
            version = mlflow.register_model(
                info.model_uri,
                model_name,
                tags={
                    **version_tags,
                    TAG_FEATURE_VERSION: feature_version,
                    TAG_FEATURE_NAMES: json.dumps(list(feature_names)),
                },
            )
        return Registered(run.info.run_id, str(version.version), info.model_uri)

    def set_version_tag(self, model_name: str, version: str, key: str, value: str) -> None:
        with _translated(self, f"tagging {model_name} version {version}"):
            self.client().set_model_version_tag(model_name, version, key, value)

    def champion(self, model_name: str) -> ModelVersion | None:
        """The version the ``champion`` alias points at, or None (no such model, or no alias)."""
        if self.missing_file() is not None:
            return None
        from mlflow.exceptions import MlflowException

        client = self.client()
        with _translated(self, f"reading {model_name!r}'s champion"):
            try:
                model = client.get_registered_model(model_name)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise
            if CHAMPION not in (model.aliases or {}):
                return None
            return client.get_model_version_by_alias(model_name, CHAMPION)

    def require_champion(self, model_name: str) -> ModelVersion:
        found = self.champion(model_name)
        if found is None:
            raise NoChampion(
                f"model {model_name!r} has no champion in MLflow store {self.shown} "
                f"(models:/{model_name}@{CHAMPION}): train one with "
                f"`stripe-platform {TRAIN_COMMANDS.get(model_name, 'ml train')}`"
            )
        return found

    def promote(self, model_name: str, version: str) -> None:
        """Move the ``champion`` alias to ``version``."""
        with _translated(self, f"moving {model_name}@{CHAMPION} to version {version}"):
            self.client().set_registered_model_alias(model_name, CHAMPION, version)

    def load(self, model_name: str, version: str) -> PyFuncModel:
        import mlflow.pyfunc

        with self.active(), _translated(self, f"loading {model_name} version {version}"):
            return mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")


@dataclass(frozen=True)
class LoadedModel:
    """A registered version and its model (MLflow pyfunc; ``raw`` is the flavor's own object)."""

    model_name: str
    version: str
    tags: dict[str, str]
    model: PyFuncModel

    @property
    def raw(self) -> Any:
        """The flavor's own object (a LightGBM booster); None for a pyfunc of Python code, which
        has none (MLflow raises NotImplementedError): such a model scores through ``model``."""
        try:
            return self.model.get_raw_model()
        except NotImplementedError:
            return None

    @property
    def feature_names(self) -> list[str]:
        return json.loads(self.tags[TAG_FEATURE_NAMES])


def recorded_features(version: ModelVersion) -> tuple[str, list[str] | None]:
    """(feature version, feature names) a registered version records ("unknown" / None when a
    tag is missing or unreadable)."""
    tags = version.tags or {}
    try:
        names = json.loads(tags[TAG_FEATURE_NAMES])
    except (KeyError, ValueError):
        names = None
    return tags.get(TAG_FEATURE_VERSION, "unknown"), names


def load_version(
    registry: Registry,
    version: ModelVersion,
    *,
    check: Callable[[str, Sequence[str] | None], None] | None = None,
) -> LoadedModel:
    """Check a version's recorded features (``check`` raises on a mismatch; the fraud features'
    :func:`~stripe_platform.ml.features.check_compatible` by default) before loading its model."""
    if check is None:
        from stripe_platform.ml.features import check_compatible as check
    recorded, names = recorded_features(version)
    check(recorded, names if names is not None else ["<no feature list recorded>"])
    model = registry.load(version.name, str(version.version))
    return LoadedModel(version.name, str(version.version), dict(version.tags or {}), model)


def load_champion(
    registry: Registry,
    model_name: str,
    *,
    check: Callable[[str, Sequence[str] | None], None] | None = None,
) -> LoadedModel:
    """``models:/<model_name>@champion``, refused (FeatureMismatch) when its recorded features
    differ from the code's; NoChampion when there is none."""
    return load_version(registry, registry.require_champion(model_name), check=check)
