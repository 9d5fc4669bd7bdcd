"""The jobs of the ``ml_fraud_training`` and ``ml_fraud_scoring`` DAGs, callable without Airflow,
and the Kubernetes manifests of the training Job (deploy/k8s/).

Training, weekly (``ml_fraud_training``)::

    drift_check -> retrain_needed -> train -> gate -> promote

- :func:`drift_check`: the latest week against the champion's training payments
  (:func:`stripe_platform.ml.drift.check_platform_drift`, report and verdict under the home).
- :func:`retrain_needed`: retrain on a drift verdict, when there is no champion yet (or it can no
  longer be compared), or when the run asks for it (``force``); otherwise the run stops there.
- :func:`train_candidate`: **the training entry point**, the same on every profile: train on the
  platform's data, evaluate the candidate beside the champion and the rules on the same held-back
  period, log and register it (``stripe_platform.ml.train.train_fraud(promote=False)``: the
  promote task moves the alias). On
  ``embedded`` it runs in the Airflow worker's process; on ``prod`` a KubernetesPodOperator runs it
  in the training image (deploy/training.Dockerfile) with the Job's pod template
  (deploy/k8s/training-job.yaml): ``python -m stripe_platform.orchestration.ml train --result
  /airflow/xcom/return.json``, whose JSON the next task reads.
- :func:`gate`: the promotion gate (``train_fraud``'s decision, :func:`stripe_platform.ml.registry.
  decide`): the candidate must beat the champion on the held-back period; a worse one stops the
  run, nothing promoted.
- :func:`promote`: moves ``models:/fraud@champion`` to the candidate, unless the champion changed
  since the candidate was compared with it (then nothing moves and the task fails: retrain).

Scoring, hourly (``ml_fraud_scoring``): :func:`score_batch`
(:func:`stripe_platform.ml.score.score_platform`).

Manifests: :func:`render_manifests` fills the ``${name}`` placeholders of deploy/k8s/*.yaml with
deploy/k8s/values.yaml (and overrides); :func:`training_pod` is the Job's pod template as the Pod
the KubernetesPodOperator launches. Nothing here imports Airflow.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stripe_platform.errors import PlatformError
from stripe_platform.paths import REPO_ROOT

if TYPE_CHECKING:
    from stripe_platform.config import Settings

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
DOCKERFILE = REPO_ROOT / "deploy" / "training.Dockerfile"
VALUES_FILE = K8S_DIR / "values.yaml"
MANIFESTS = ("namespace.yaml", "serviceaccount.yaml", "airflow-rbac.yaml", "training-job.yaml")
JOB_MANIFEST = "training-job.yaml"
XCOM_RESULT = "/airflow/xcom/return.json"  # where the KubernetesPodOperator reads a pod's result
_PLACEHOLDER = re.compile(r"\$\{([a-z_][a-z0-9_]*)\}")


class ManifestError(PlatformError, ValueError):
    """A manifest or a value that cannot be rendered; the message names it."""


class PromotionRefused(PlatformError, RuntimeError):
    """The champion changed after the candidate was compared with it."""


# -- manifests ------------------------------------------------------------------------------------------
def load_values(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """deploy/k8s/values.yaml with ``overrides`` on top (only names it defines)."""
    values = yaml.safe_load(VALUES_FILE.read_text()) or {}
    unknown = sorted(set(overrides or {}) - set(values))
    if unknown:
        raise ManifestError(
            f"unknown manifest value(s) {unknown}; known: {', '.join(sorted(values))}"
        )
    values.update(overrides or {})
    return values


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``name=value`` pairs (``--set``); a value is read as YAML (``4``, ``null``, ``8Gi``)."""
    found: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ManifestError(f"--set {pair!r}: expected name=value")
        found[name.strip()] = yaml.safe_load(value) if value.strip() else ""
    return found


_DROP = object()


def _fill(node: Any, values: Mapping[str, Any], where: str) -> Any:
    """``node`` with its placeholders filled: a string that is one placeholder takes the value
    itself (a number stays a number; null drops the field), others are text substitution."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            filled = _fill(value, values, f"{where}.{key}")
            if filled is not _DROP:
                out[key] = filled
        return out
    if isinstance(node, list):
        items = (_fill(item, values, f"{where}[{i}]") for i, item in enumerate(node))
        return [item for item in items if item is not _DROP]
    if not isinstance(node, str):
        return node
    names = _PLACEHOLDER.findall(node)
    missing = [n for n in names if n not in values]
    if missing:
        raise ManifestError(f"{where}: no value for {missing} in {VALUES_FILE.name}")
    whole = _PLACEHOLDER.fullmatch(node)
    if whole:
        value = values[whole.group(1)]
        return _DROP if value is None else value
    if any(values[n] is None for n in names):
        raise ManifestError(f"{where}: {names} inside text cannot be null")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)


def render_manifests(overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object of deploy/k8s (in MANIFESTS order) with the values filled."""
    values = load_values(overrides)
    rendered = []
    for name in MANIFESTS:
        for i, document in enumerate(yaml.safe_load_all((K8S_DIR / name).read_text())):
            if document is None:
                continue
            rendered.append(_fill(document, values, f"{name}#{i}"))
    # An emptied mapping (annotations whose only value was null) is dropped, not sent empty.
    for obj in rendered:
        metadata = obj.get("metadata", {})
        if metadata.get("annotations") == {}:
            del metadata["annotations"]
    return rendered


def render_yaml(overrides: Mapping[str, Any] | None = None) -> str:
    return yaml.safe_dump_all(render_manifests(overrides), sort_keys=False)


def training_job(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    (job,) = [m for m in render_manifests(overrides) if m["kind"] == "Job"]
    return job


def training_pod(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Job's pod template as a Pod (what the KubernetesPodOperator's pod_template_dict takes):
    the same image, command, resources, identity and security as a Job run by hand."""
    job = training_job(overrides)
    template = job["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": job["metadata"]["namespace"],
            "labels": dict(template["metadata"].get("labels", {})),
        },
        "spec": template["spec"],
    }


# -- the training DAG's jobs ----------------------------------------------------------------------------
def drift_check(settings: Settings) -> dict[str, Any]:
    """The drift verdict as a dict; without a champion (or one that cannot be compared) a verdict
    that says so (``drifted`` None, ``reason``), which retraining treats as "train one"."""
    from stripe_platform.ml.drift import DriftError, check_platform_drift
    from stripe_platform.ml.registry import NoChampion

    try:
        verdict = check_platform_drift(settings)
    except NoChampion as exc:
        return {"drifted": None, "champion": False, "reason": str(exc)}
    except DriftError as exc:
        return {"drifted": None, "champion": True, "reason": str(exc)}
    return {**verdict.as_dict(), "champion": True, "reason": verdict.summary()}


def retrain_needed(verdict: Mapping[str, Any], *, force: bool = False) -> tuple[bool, str]:
    """(retrain?, why). A drift verdict, no champion or one that cannot be compared, or force."""
    if force:
        return True, "retraining forced by the run's parameters"
    if verdict.get("drifted") is None:
        return True, f"no drift verdict ({verdict.get('reason')}): train a champion"
    if verdict["drifted"]:
        features = ", ".join(verdict.get("drifted_features", []))
        return True, f"drift: {verdict.get('reason')} ({features})"
    return False, f"no retraining: {verdict.get('reason')}"


def train_candidate(settings: Settings) -> dict[str, Any]:
    """The training entry point: train on the platform's data, evaluate the candidate beside the
    champion and the rules on the same held-back period, log and register it, and decide the
    gate (``passed_gate``, ``gate_reason``); the alias is moved by :func:`promote`."""
    from stripe_platform.ml.train import train_fraud

    return train_fraud(settings, promote=False).as_dict()


def gate(candidate: Mapping[str, Any]) -> tuple[bool, str]:
    """The promotion gate's verdict on the candidate (decided in training, on average precision
    over held-back payments neither model trained on)."""
    return bool(candidate["passed_gate"]), str(candidate["gate_reason"])


def promote(settings: Settings, candidate: Mapping[str, Any]) -> dict[str, Any]:
    """Move the champion alias to the candidate, if the champion is still the one it beat."""
    from stripe_platform.ml.registry import Registry

    registry = Registry.from_settings(settings)
    registry.check()
    name, version = candidate["model_name"], str(candidate["version"])
    current = registry.champion(name)
    compared = candidate.get("champion_version")
    now = None if current is None else str(current.version)
    if now != (None if compared is None else str(compared)):
        raise PromotionRefused(
            f"{name}: the champion is version {now}, the candidate {version} was compared with "
            f"version {compared}: nothing promoted; train again"
        )
    registry.promote(name, version)
    return {"model_name": name, "champion": version, "previous": now}


# Every container of the training pod (the XCom sidecar too) meets the namespace's "restricted"
# Pod Security Standard (deploy/k8s/namespace.yaml).
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _train_in_process() -> dict[str, Any]:
    from stripe_platform.config import load_settings

    return train_candidate(load_settings())


def training_task(
    settings: Settings | None = None, *, task_id: str = "train", **kwargs: Any
) -> Any:
    """The train task inside a DAG definition; returns its result (an XComArg: the candidate's
    report). On ``prod`` a KubernetesPodOperator runs the training entry point in the training
    image with the Job's pod template (decided at parse time, like the syncs); elsewhere the same
    entry point runs in the worker's process."""
    from stripe_platform.config import load_settings

    settings = settings or load_settings()
    if settings.profile == "prod":
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        pod = training_pod()
        operator = KubernetesPodOperator(
            task_id=task_id,
            name="fraud-training",
            namespace=pod["metadata"]["namespace"],
            pod_template_dict=pod,
            base_container_name=pod["spec"]["containers"][0]["name"],
            arguments=["train", "--result", XCOM_RESULT],
            do_xcom_push=True,
            get_logs=True,
            on_finish_action="delete_succeeded_pod",
            # The node group may scale up from zero: minutes before the pod starts.
            startup_timeout_seconds=900,
            deferrable=True,
            xcom_sidecar_container_security_context=RESTRICTED_CONTAINER,
            **kwargs,
        )
        return operator.output
    from airflow.sdk import task

    return task(task_id=task_id, **kwargs)(_train_in_process)()


# -- the scoring DAG's job --------------------------------------------------------------------------------
def score_batch(settings: Settings) -> dict[str, Any]:
    from stripe_platform.ml.score import score_platform

    return score_platform(settings).as_dict()


# -- the entry point a training pod runs --------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stripe_platform.orchestration.ml train [--result FILE]``: train a candidate with
    the environment's settings; print its report as JSON, and write it to FILE when given."""
    parser = argparse.ArgumentParser(
        prog="python -m stripe_platform.orchestration.ml", description=main.__doc__
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train, register and evaluate a candidate")
    train.add_argument("--result", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)

    from stripe_platform.config import load_settings

    try:
        report = train_candidate(load_settings())
    except PlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report, default=str)
    if args.result is not None:
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
