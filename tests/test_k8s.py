"""The training Job's Kubernetes manifests (deploy/k8s) and image (deploy/training.Dockerfile).
No cluster runs here: the manifests are rendered and checked against Kubernetes' own JSON schemas
(kubernetes-validate, strict: an unknown field fails) for the EKS versions in service, the pod the
KubernetesPodOperator builds from the Job's template is checked the same way, and the image's
entry point is run without the packages the image leaves out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import tomllib

import kubernetes_validate
import pytest
import yaml

from stripe_platform.orchestration import ml
from stripe_platform.paths import REPO_ROOT

# Airflow reads its configuration when first imported: a throwaway home, as in test_dags.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="stripe-platform-airflow-"))

# EKS's supported Kubernetes versions when this was written, and the newest schemas installed.
K8S_VERSIONS = ("1.31", "1.33", kubernetes_validate.latest_version())


def validate(obj: dict, version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_render_and_pass_the_kubernetes_schemas(version):
    rendered = ml.render_manifests()
    kinds = [(m["apiVersion"], m["kind"]) for m in rendered]
    assert kinds == [
        ("v1", "Namespace"),
        ("v1", "ServiceAccount"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        ("batch/v1", "Job"),
    ]
    for obj in rendered:
        validate(obj, version)
    text = ml.render_yaml()
    assert "${" not in text  # every placeholder filled
    assert list(yaml.safe_load_all(text)) == rendered


def test_the_job_runs_the_training_entry_point_with_its_resources_and_identity():
    job = ml.training_job()
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "stripe_platform.orchestration.ml"]
    assert container["args"] == ["train"]
    assert container["image"] == "stripe-platform-training:latest"
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }
    assert container["envFrom"] == [{"secretRef": {"name": "stripe-platform-env"}}]
    assert pod["serviceAccountName"] == "fraud-training"
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"eks.amazonaws.com/nodegroup": "ml-training"}
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["activeDeadlineSeconds"] == 3600
    # The namespace enforces the restricted Pod Security Standard: the pod must meet it.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # The service account and the Role binding name the objects the Job and Airflow use.
    by_kind = {m["kind"]: m for m in ml.render_manifests()}
    assert by_kind["ServiceAccount"]["metadata"]["name"] == pod["serviceAccountName"]
    assert "annotations" not in by_kind["ServiceAccount"]["metadata"]  # no IAM role given
    binding = by_kind["RoleBinding"]
    assert binding["roleRef"]["name"] == by_kind["Role"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "airflow-worker", "namespace": "airflow"}
    ]
    namespaces = {m["metadata"].get("namespace") for m in ml.render_manifests()} - {None}
    assert namespaces == {"stripe-ml"}


def test_values_override_and_typed_placeholders():
    overrides = ml.parse_overrides(
        [
            "image=registry.example/stripe-platform-training:abc123",
            "cpu_limit=8",
            "backoff_limit=3",
            "aws_role_arn=arn:aws:iam::123456789012:role/fraud-training",
        ]
    )
    assert overrides["cpu_limit"] == 8 and overrides["backoff_limit"] == 3  # YAML-typed
    rendered = {m["kind"]: m for m in ml.render_manifests(overrides)}
    job = rendered["Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/stripe-platform-training:abc123"
    assert container["resources"]["limits"]["cpu"] == 8
    assert job["spec"]["backoffLimit"] == 3
    assert rendered["ServiceAccount"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/fraud-training"
    }
    for obj in rendered.values():
        validate(obj, "1.33")


def test_bad_values_are_refused_with_their_name():
    with pytest.raises(ml.ManifestError, match=r"unknown manifest value\(s\) \['imag'\]"):
        ml.render_manifests({"imag": "x"})
    with pytest.raises(ml.ManifestError, match="expected name=value"):
        ml.parse_overrides(["image"])
    # A value of the wrong type renders, and the schema check is what catches it.
    job = ml.training_job({"backoff_limit": "many"})
    with pytest.raises(kubernetes_validate.ValidationError, match="'many' is not of type"):
        validate(job, "1.33")


def test_the_schema_check_catches_a_misspelt_field():
    job = ml.training_job()
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # "resources"
    with pytest.raises(kubernetes_validate.ValidationError, match="'resource' was unexpected"):
        validate(job, "1.33")


def test_the_operator_builds_the_jobs_pod_with_the_xcom_sidecar(tmp_path):
    """The pod Airflow launches on prod: the KubernetesPodOperator built exactly as the DAG builds
    it, its request rendered offline (a kubeconfig that names no reachable cluster)."""
    from kubernetes.client import ApiClient

    from stripe_platform.config import load_settings

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        textwrap.dedent(
            """\
            apiVersion: v1
            kind: Config
            clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
            users: [{name: none, user: {token: none}}]
            contexts: [{name: none, context: {cluster: none, user: none}}]
            current-context: none
            """
        )
    )
    prod = load_settings(
        profile="prod",
        home=tmp_path,
        pg_dsn="host=oltp.invalid",
        mongodb_uri="mongodb://docstore.invalid",
        pii_key="k" * 32,
        snowflake_account="a",
        snowflake_user="u",
    )
    from airflow.sdk import DAG

    with DAG("k8s_render", schedule=None):
        result = ml.training_task(prod, config_file=str(kubeconfig), in_cluster=False)
    operator = result.operator
    assert type(operator).__name__ == "KubernetesPodOperator"
    assert operator.deferrable and operator.do_xcom_push
    pod = ApiClient().sanitize_for_serialization(operator.build_pod_request_obj())
    validate(pod, "1.33")
    train, sidecar = pod["spec"]["containers"]
    job_container = ml.training_job()["spec"]["template"]["spec"]["containers"][0]
    for key in ("image", "command", "resources", "envFrom", "env", "securityContext"):
        assert train[key] == job_container[key], key
    assert train["args"] == ["train", "--result", "/airflow/xcom/return.json"]
    assert {"mountPath": "/airflow/xcom", "name": "xcom"} in train["volumeMounts"]
    assert pod["spec"]["serviceAccountName"] == "fraud-training"
    assert pod["metadata"]["namespace"] == "stripe-ml"
    # The sidecar meets the restricted standard too (it would be refused otherwise).
    assert sidecar["name"] == "airflow-xcom-sidecar"
    assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}


# -- the image --------------------------------------------------------------------------------------
DOCKERFILE = REPO_ROOT / "deploy" / "training.Dockerfile"


def test_the_dockerfile_copies_what_exists_and_installs_locked_groups():
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY (.+) \S+$", text, flags=re.MULTILINE)
    sources = [s for line in copies for s in line.split()]
    assert {"pyproject.toml", "uv.lock", "src", "mongo", "dbt_project/seeds"} <= set(sources)
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
    groups = re.findall(r"--group (\S+)", text)
    assert groups and set(groups) == {"ml"}
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["dependency-groups"]
    assert "ml" in declared
    assert "--frozen" in text and "--no-default-groups" in text
    assert re.search(r"^USER 10001", text, flags=re.MULTILINE)  # the Job's runAsUser
    assert 'CMD ["python", "-m", "stripe_platform.orchestration.ml"' in text


# What the image leaves out: the Airflow and dbt groups, and the dev tools.
_BLOCKER = textwrap.dedent(
    """\
    import importlib.abc, sys
    LEFT_OUT = ("airflow", "dbt", "cosmos", "fakesnow", "moto", "pytest")
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in LEFT_OUT:
                raise ImportError(f"{name} is not in the training image")
    sys.meta_path.insert(0, Blocker())
    """
)


def test_the_entry_point_runs_without_airflow_or_dbt():
    script = _BLOCKER + textwrap.dedent(
        """\
        import runpy
        sys.argv = ["ml", "--help"]
        try:
            runpy.run_module("stripe_platform.orchestration.ml", run_name="__main__")
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        import stripe_platform.ml.drift, stripe_platform.ml.score, stripe_platform.ml.registry
        import stripe_platform.ml.train
        import stripe_platform.ml.features, stripe_platform.ml.contract
        import mlflow, lightgbm, evidently
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train" in done.stdout and done.stdout.strip().endswith("ok")
