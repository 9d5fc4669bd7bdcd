"""docker-compose.yml: Docker cannot run here, so the file is checked three ways: by `docker-compose
config` when that binary is installed (the Compose schema, interpolation, anchors), by reading its
wiring (every STRIPE_PLATFORM_* variable resolves through the one settings object to the intended
backend on the `compose` profile), and by running the parts that are code (the TLS generator)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from stripe_platform.config import ENV_PREFIX, Settings, load_settings
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.orchestration.alerts import webhook_url

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
PLATFORM_SERVICES = ("migrate", "mongo-apply", "airflow-init", "airflow-api-server")
AIRFLOW_SERVICES = (
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
)
_VAR = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::-(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ${VAR:-default} with an empty environment: the defaults a bare `up` gets."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m["default"] or "", value).replace("$$", "$")
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


def service_env(compose: dict[str, Any], name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (compose["services"][name].get("environment") or {}).items()}


def settings_in(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a container with ``env`` loads (nothing from this machine leaks in)."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX) or key == "MONGODB_URI":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO / "compose")  # no .env file there
    return load_settings()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_accepts_the_file():
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MINIO_"))},
    )
    assert done.returncode == 0, done.stderr
    services = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "--services"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert {"postgres", "mongo", "minio", *AIRFLOW_SERVICES} <= set(services)


@pytest.mark.parametrize("service", PLATFORM_SERVICES)
def test_platform_variables_resolve_to_the_compose_backends(compose, service, monkeypatch):
    env = service_env(compose, service)
    names = {k.removeprefix(ENV_PREFIX).lower() for k in env if k.startswith(ENV_PREFIX)}
    # No typo can silently fall back to a default: each variable is a field of the settings.
    assert names <= set(Settings.model_fields), names - set(Settings.model_fields)
    s = settings_in(env, monkeypatch)
    assert s.profile == "compose"
    assert s.home_dir == Path("/var/lib/stripe-platform")
    dsn = s.pg_dsn.get_secret_value()
    assert "host=postgres" in dsn and "dbname=stripe" in dsn
    assert "sslmode=verify-full" in dsn and "sslrootcert=/certs/ca.crt" in dsn
    assert s.mongodb_uri.get_secret_value() == (
        "mongodb://mongo:27017/?replicaSet=rs0&tls=true&tlsCAFile=/certs/ca.crt"
    )
    assert s.tls_ca_file == Path("/certs/ca.crt")
    assert s.ingestion_backend == "embedded"
    assert s.warehouse_backend == "postgres"
    assert "dbname=warehouse" in s.warehouse_dsn.get_secret_value()
    assert "sslmode=verify-full" in s.warehouse_dsn.get_secret_value()
    assert s.lake_root == "s3://stripe-platform-lake"
    assert s.s3_endpoint_url == "https://minio:9000"
    assert webhook_url(s) is None  # empty unless the user exports one
    # The lake credentials are MinIO's root user.
    minio = service_env(compose, "minio")
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )


def test_every_platform_container_shares_one_home_and_the_certificates(compose):
    """One dev keyring: data encrypted by the seed must be readable by Airflow's tasks."""
    for name, service in compose["services"].items():
        if service.get("image") != "stripe-platform:dev":
            continue
        volumes = service["volumes"]
        assert ".:/opt/stripe-platform:ro" in volumes, name
        assert any(v.startswith("certs:/certs") for v in volumes), name
        if name != "certs":
            assert "platform-home:/var/lib/stripe-platform" in volumes, name


def test_postgres_is_the_embedded_clusters_configuration(compose):
    pg = compose["services"]["postgres"]
    assert pg["image"].startswith("postgres:15")
    settings = dict(
        arg.split("=", 1) for arg in pg["command"][1:] if arg != "-c"
    )  # -c name=value pairs
    assert settings["wal_level"] == "logical"
    assert settings["ssl"] == "on"
    assert settings["ssl_key_file"] == "/certs/server.key"
    assert settings["log_connections"] == settings["log_disconnections"] == "on"
    assert settings["log_statement"] == "all"
    assert settings["log_parameter_max_length"] == "0"  # bind values can carry card data
    assert settings["hba_file"] == "/etc/postgresql/pg_hba.conf"
    hba = [
        line.split()
        for line in (REPO / "compose/postgres/pg_hba.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["hostnossl", "all", "all", "all", "reject"] in hba
    assert all(rule[0] in ("local", "hostssl", "hostnossl") for rule in hba)
    assert "./compose/postgres/initdb:/docker-entrypoint-initdb.d:ro" in pg["volumes"]
    initdb = (REPO / "compose/postgres/initdb/10-databases.sh").read_text()
    assert "CREATE DATABASE warehouse" in initdb and "CREATE DATABASE airflow" in initdb
    assert os.access(REPO / "compose/postgres/initdb/10-databases.sh", os.X_OK)
    assert all(p.startswith("127.0.0.1:") for p in pg["ports"])
    # pgcrypto comes from the migrations, which a one-shot runs before anything uses the schema.
    assert compose["services"]["migrate"]["command"] == ["stripe-platform", "db", "migrate"]
    assert compose["services"]["migrate"]["depends_on"]["postgres"]["condition"] == (
        "service_healthy"
    )
    assert (
        "CREATE EXTENSION IF NOT EXISTS pgcrypto"
        in (REPO / "sql/oltp/0001_foundations.sql").read_text()
    )


def test_mongodb_is_a_replica_set_initiated_then_given_the_specs(compose):
    services = compose["services"]
    assert services["mongo"]["command"][:3] == ["mongod", "--replSet", "rs0"]
    init = services["mongo-init"]
    assert init["depends_on"]["mongo"]["condition"] == "service_healthy"
    script = (REPO / "compose/mongo/init-replica-set.js").read_text()
    assert 'rs.initiate({ _id: "rs0", members: [{ _id: 0, host: "mongo:27017" }] })' in script
    assert "/compose/init-replica-set.js" in init["command"]
    apply = services["mongo-apply"]
    assert apply["command"] == ["stripe-platform", "mongo", "apply"]
    assert apply["depends_on"]["mongo-init"]["condition"] == "service_completed_successfully"


def test_minio_holds_the_bucket_the_s3_destination_names(compose):
    bucket = next(d for d in load_catalog().destinations if d.kind == "s3").bucket
    command = " ".join(compose["services"]["minio-buckets"]["command"])
    assert f"mc mb --ignore-existing local/{bucket}" in command
    assert service_env(compose, "migrate")["STRIPE_PLATFORM_LAKE_URI"] == f"s3://{bucket}"


def test_airflow_components_share_metadata_secrets_and_the_repos_dags(compose):
    services = compose["services"]
    commands = {name: services[name]["command"] for name in AIRFLOW_SERVICES}
    assert commands == {
        "airflow-api-server": ["airflow", "api-server"],
        "airflow-scheduler": ["airflow", "scheduler", "--skip-serve-logs"],
        "airflow-dag-processor": ["airflow", "dag-processor"],
        "airflow-triggerer": ["airflow", "triggerer", "--skip-serve-logs"],
    }
    envs = [service_env(compose, name) for name in (*AIRFLOW_SERVICES, "airflow-init")]
    shared = (
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__CORE__DAGS_FOLDER",
    )
    for key in shared:
        assert len({env[key] for env in envs}) == 1, key
    env = envs[0]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith(
        "postgresql+psycopg2://airflow:airflow-dev@postgres:5432/airflow?sslmode=verify-full"
    )
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/stripe-platform/dags"
    assert (REPO / "dags").is_dir()
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    from cryptography.fernet import Fernet

    Fernet(env["AIRFLOW__CORE__FERNET_KEY"])  # a valid key, or Airflow refuses connections
    for name in AIRFLOW_SERVICES:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == (
            "service_completed_successfully"
        )
        assert "airflow-logs:/opt/airflow/logs" in services[name]["volumes"]
    assert services["airflow-init"]["command"] == [
        "python",
        "-m",
        "stripe_platform.orchestration.airflow_runtime",
        "init",
    ]
    assert services["airflow-api-server"]["ports"] == ["127.0.0.1:8080:8080"]
    passwords = REPO / env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].removeprefix(
        "/opt/stripe-platform/"
    )
    assert yaml.safe_load(passwords.read_text()) == {"admin": "admin"}


def test_the_image_installs_exactly_the_lock(compose):
    dockerfile = (REPO / "compose/platform.Dockerfile").read_text()
    assert "FROM python:3.11-" in dockerfile
    assert "uv sync --frozen --no-dev" in dockerfile
    assert "UV_PROJECT_ENVIRONMENT=/opt/venv" in dockerfile  # not shadowed by the repo mount


def test_every_server_listens_with_tls_only_and_every_client_verifies(compose):
    services = compose["services"]
    mongo = services["mongo"]["command"]
    assert mongo[mongo.index("--tlsMode") + 1] == "requireTLS"
    assert mongo[mongo.index("--tlsCertificateKeyFile") + 1] == "/certs/mongo.pem"
    for name in ("mongo", "mongo-init"):
        command = services[name]["command"] if name == "mongo-init" else None
        checked = command or services[name]["healthcheck"]["test"]
        assert "--tls" in checked and "/certs/ca.crt" in checked, name
    minio = services["minio"]["command"]
    assert minio[minio.index("--certs-dir") + 1] == "/certs/minio"
    assert "mc alias set local https://minio:9000" in " ".join(services["minio-buckets"]["command"])
    kafka = service_env(compose, "kafka")
    protocols = dict(
        pair.split(":") for pair in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(protocols.values()) == {"SSL"}, protocols
    listeners = {item.split(":")[0] for item in kafka["KAFKA_LISTENERS"].split(",")}
    assert listeners == set(protocols)  # no listener outside the map (PLAINTEXT by name)
    assert kafka["KAFKA_SSL_KEYSTORE_TYPE"] == "PEM"
    assert kafka["KAFKA_SSL_KEYSTORE_LOCATION"] == "/certs/kafka.pem"
    assert (
        "--command-config /certs/kafka-client.properties"
        in services["kafka"]["healthcheck"]["test"][1]
    )
    connect = service_env(compose, "connect")
    assert connect["CONNECT_LISTENERS"].startswith("https://")
    for client in ("", "PRODUCER_", "CONSUMER_", "ADMIN_"):
        assert connect[f"CONNECT_{client}SECURITY_PROTOCOL"] == "SSL"
        assert connect[f"CONNECT_{client}SSL_TRUSTSTORE_LOCATION"] == "/certs/ca.crt"
    assert connect["CONNECT_LISTENERS_HTTPS_SSL_KEYSTORE_LOCATION"] == "/certs/connect.p12"
    assert "https://connect:8083" in services["kafka-connector"]["command"]
    airflow = service_env(compose, "airflow-api-server")
    assert airflow["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("https://")
    assert (airflow["AIRFLOW__API__SSL_CERT"], airflow["AIRFLOW__API__SSL_KEY"]) == (
        "/certs/server.crt",
        "/certs/server.key",
    )
    assert "https://localhost:8080" in services["airflow-api-server"]["healthcheck"]["test"][-1]
    # No plain http:// left anywhere a client connects (healthchecks included), and no Airflow
    # side server in clear (log servers skipped, the scheduler's health server off).
    assert "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK" not in airflow
    text = COMPOSE.read_text()
    assert re.findall(r"http://[a-z0-9.-]+[:/]", text) == []
    env = service_env(compose, "migrate")
    assert env["STRIPE_PLATFORM_S3_ENDPOINT_URL"].startswith("https://")
    assert env["AWS_CA_BUNDLE"] == env["STRIPE_PLATFORM_TLS_CA_FILE"] == "/certs/ca.crt"
    for name in ("postgres", "mongo", "minio", "kafka"):
        assert services[name]["depends_on"]["certs"]["condition"] == (
            "service_completed_successfully"
        )


def load_make_certs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_certs", REPO / "compose/make_certs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_certificates_verify_for_the_compose_host_names(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    module = load_make_certs()
    assert module.make_certs(tmp_path, "pw-1", owner_uid=None) is True
    assert module.make_certs(tmp_path, "pw-1", owner_uid=None) is False  # kept: clients trust it
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Every service a client reaches by name, and the published ports' localhost.
    assert set(names.get_values_for_type(x509.DNSName)) == {
        "postgres",
        "mongo",
        "minio",
        "kafka",
        "connect",
        "airflow-api-server",
        "localhost",
    }
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    for key_file in ("server.key", "mongo.pem", "kafka.pem", "connect.p12", "minio/private.key"):
        assert (tmp_path / key_file).stat().st_mode & 0o777 == 0o600, key_file
    for pem in ("mongo.pem", "kafka.pem"):
        text = (tmp_path / pem).read_bytes()
        assert (
            b"PRIVATE KEY" in text
            and x509.load_pem_x509_certificate(text[text.index(b"-----BEGIN CERTIFICATE") :])
            == cert
        )
    key, p12_cert, _ = pkcs12.load_key_and_certificates(
        (tmp_path / "connect.p12").read_bytes(), b"pw-1"
    )
    assert p12_cert == cert and key is not None
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates((tmp_path / "connect.p12").read_bytes(), b"wrong")
    assert (tmp_path / "minio/public.crt").read_bytes() == (tmp_path / "server.crt").read_bytes()
    assert (
        serialization.load_pem_private_key(
            (tmp_path / "minio/private.key").read_bytes(), None
        ).public_key()
        == cert.public_key()
    )
    assert "security.protocol=SSL" in (tmp_path / "kafka-client.properties").read_text()


def test_a_certificate_set_missing_a_service_name_is_remade(tmp_path):
    from stripe_platform.runtime.tls import ensure_certificates

    ensure_certificates(tmp_path, names=("postgres", "localhost"))  # an older compose's set
    old_ca = (tmp_path / "ca.crt").read_bytes()
    assert load_make_certs().make_certs(tmp_path, "pw", owner_uid=None) is True
    assert (tmp_path / "ca.crt").read_bytes() != old_ca
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kafka" in names.get_values_for_type(x509.DNSName)
