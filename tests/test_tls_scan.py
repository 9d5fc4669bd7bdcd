"""TLS everywhere (issue 20 §4): the running embedded stack's listening ports refuse plaintext and
complete a TLS handshake verified against the platform's CA; a plaintext server is caught; the
settings refuse plain-http endpoints off this machine.

Real servers: the session's PostgreSQL and FerretDB (conftest), the API (`stripe-platform api`,
uvicorn), Airflow's components as `stripe-platform airflow` runs them, and the session's Kafka
broker and Kafka Connect (tests/kafka_stack.py)."""

from __future__ import annotations

import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from kafka_stack import KafkaTestStack
from stripe_platform.config import Settings, SettingsError, load_settings
from stripe_platform.orchestration.airflow_runtime import (
    AIRFLOW,
    COMPONENTS,
    airflow_env,
    migrate_airflow_db,
)
from stripe_platform.runtime.tls import ensure_certificates, tls_files
from stripe_platform.security import tls_scan
from stripe_platform.streaming import debezium

START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(s: Settings) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STRIPE_PLATFORM_", "AIRFLOW")) and k != "MONGODB_URI"
    }
    return {**base, "STRIPE_PLATFORM_PROFILE": "embedded", "STRIPE_PLATFORM_HOME": str(s.home_dir)}


def wait_https(port: int, ca: Path, path: str, process: subprocess.Popen, log: Path) -> float:
    """Seconds until ``https://127.0.0.1:<port><path>`` answers (verified against ``ca``);
    start-up is slow on a busy machine (Airflow's api-server: 10 s idle, a minute loaded)."""
    context = ssl.create_default_context(cafile=str(ca))
    started = time.monotonic()
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                if tls.recv(12).startswith(b"HTTP/1.1"):
                    return time.monotonic() - started
        except OSError:
            pass
        assert time.monotonic() - started < START_TIMEOUT_S, log.read_text()[-3000:]
        time.sleep(0.3)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Running:
    settings: Settings
    api_port: int
    airflow_port: int


@pytest.fixture(scope="module")
def running(settings: Settings) -> Iterator[Running]:
    """The API (`stripe-platform api`) and Airflow's api-server beside the session's PostgreSQL
    and FerretDB. Airflow's api-server alone: with the scheduler, dag-processor and triggerer
    (`stripe-platform airflow`) it answers after ~2 minutes on a busy machine, and they listen on
    nothing (their log servers are off: orchestration/airflow_runtime.COMPONENTS)."""
    ca = tls_files(settings.home_dir / "tls").ca_cert
    env = env_for(settings)
    api_port, airflow_port = free_port(), free_port()
    api_log = settings.home_dir / "tls-scan-api.log"
    airflow_log = settings.home_dir / "tls-scan-airflow.log"
    processes = []
    try:
        with api_log.open("w") as out:
            api = subprocess.Popen(
                [sys.executable, "-m", "stripe_platform.cli", "api", "--port", str(api_port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        processes.append(api)
        airflow_settings = load_settings(home=settings.home_dir, profile="embedded")
        af_env = airflow_env(airflow_settings, base=env, port=airflow_port)
        migrate_airflow_db(airflow_settings, env=af_env)
        with airflow_log.open("w") as out:
            airflow = subprocess.Popen(
                [*AIRFLOW, "api-server"], env=af_env, stdout=out, stderr=subprocess.STDOUT
            )
        processes.append(airflow)
        wait_https(airflow_port, ca, "/api/v2/version", airflow, airflow_log)
        wait_https(api_port, ca, "/healthz", api, api_log)
        # The API records itself once the lead wires `stripe-platform api` to; until then, here.
        tls_scan.record_server(settings, "api", "http", pid=api.pid)
        tls_scan.record_server(settings, "airflow", "http", pid=airflow.pid)
        yield Running(settings, api_port, airflow_port)
    finally:
        tls_scan.forget_server(settings, "api")
        tls_scan.forget_server(settings, "airflow")
        for process in processes:
            stop(process)


def test_every_listening_port_of_the_running_stack_refuses_plaintext_and_verifies(
    running: Running, kafka_stack: KafkaTestStack
):
    s = running.settings
    results = tls_scan.scan(s)
    by_name: dict[str, set[int]] = {}
    for r in results:
        by_name.setdefault(r.name, set()).add(r.port)
    # Every server is there, with the ports its runtime says it serves on.
    kafka_state = kafka_stack.stack._state()
    from stripe_platform.docstore.client import embedded_server
    from stripe_platform.oltp.db import embedded_cluster

    assert by_name["postgres"] == {embedded_cluster(s).port}
    assert by_name["documents"] == {embedded_server(s).port}
    assert by_name["api"] == {running.api_port}
    assert by_name["airflow"] == {running.airflow_port}
    assert by_name["kafka"] == {kafka_state["broker_port"], kafka_state["controller_port"]}
    assert by_name["kafka-connect"] == {kafka_state["rest_port"]}
    report = "\n".join(tls_scan.render(results))
    for r in results:
        assert r.plaintext_refused, report
        assert r.tls_ok, report
        assert r.detail.count("verified") == 1, report
    expected_answers = {
        "postgres": "asked for authentication",
        "documents": "answered hello",
        "kafka": "answered ApiVersions",
        "api": "HTTP/1.1",
        "airflow": "HTTP/1.1",
        "kafka-connect": "HTTP/1.1",
    }
    for r in results:
        assert expected_answers[r.name] in r.detail.split("TLS:")[1], r.detail
    postgres = next(r for r in results if r.name == "postgres")
    assert "28000" in postgres.detail and "no encryption" in postgres.detail  # hostnossl reject
    assert report.splitlines()[-1] == f"{len(results)} port(s) scanned: every one TLS-only"


@pytest.fixture
def plain_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_plaintext_server_registered_into_the_scan_is_reported(settings, plain_server, tmp_path):
    # Recorded like any platform server: this (test) process, whose listening sockets are found.
    tls_scan.record_server(settings, "plain", "http")
    try:
        results = tls_scan.scan(settings)
    finally:
        tls_scan.forget_server(settings, "plain")
    (plain,) = [r for r in results if r.port == plain_server]
    assert plain.name == "plain"
    assert not plain.plaintext_refused and not plain.tls_ok and not plain.ok
    assert "plaintext: HTTP/1.0 200 OK" in plain.detail
    assert "no TLS handshake" in plain.detail
    assert f"plain:{plain_server}" in tls_scan.render(results)[-1]
    assert "NOT TLS-only" in tls_scan.render(results)[-1]
    # The record is gone: the next scan does not see it.
    assert all(r.name != "plain" for r in tls_scan.scan(settings))


def test_a_tls_server_with_a_certificate_of_another_ca_fails_verification(settings, tmp_path):
    other = ensure_certificates(tmp_path / "other", ca_common_name="not the platform's CA")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(other.server_cert, other.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        result = tls_scan.scan_listener(
            tls_scan.Listener("impostor", port, "http"),
            tls_files(settings.home_dir / "tls").ca_cert,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.plaintext_refused
    assert not result.tls_ok and "certificate not verified" in result.detail


def test_a_server_record_with_an_unknown_protocol_or_a_dead_pid(settings):
    with pytest.raises(tls_scan.TlsScanError, match="unknown protocol 'ftp'"):
        tls_scan.record_server(settings, "x", "ftp")  # type: ignore[arg-type]
    with pytest.raises(tls_scan.TlsScanError, match="cannot name a record file"):
        tls_scan.record_server(settings, "../x", "http")
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = tls_scan.record_server(settings, "gone", "http", pid=dead.pid)
    assert all(listener.name != "gone" for listener in tls_scan.listeners(settings))
    assert not record.exists()  # a stale record is dropped


# -- the configuration of the servers and clients -----------------------------------------------------
def test_airflow_components_start_no_plaintext_log_server():
    # `airflow standalone` would start one per scheduler and triggerer: plain HTTP, every interface.
    assert COMPONENTS["scheduler"][-1] == COMPONENTS["triggerer"][-1] == "--skip-serve-logs"
    assert set(COMPONENTS) == {"api-server", "scheduler", "dag-processor", "triggerer"}


def test_airflow_serves_https_with_the_runtime_certificate(tmp_path):
    s = load_settings(home=tmp_path, profile="embedded")
    env = airflow_env(s, base={}, port=8099)
    tls = tls_files(tmp_path / "tls")
    assert env["AIRFLOW__API__SSL_CERT"] == str(tls.server_cert)
    assert env["AIRFLOW__API__SSL_KEY"] == str(tls.server_key)
    assert env["AIRFLOW__API__SSL_CA_FILE"] == str(tls.ca_cert)  # what tasks verify it with
    assert env["AIRFLOW__API__BASE_URL"] == "https://127.0.0.1:8099"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "https://127.0.0.1:8099/execution/"
    assert tls.exist()


@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer", "require"])
def test_debezium_refuses_a_connection_string_without_verified_tls(settings, sslmode):
    conninfo = f"host=127.0.0.1 dbname=stripe user=stripe_cdc sslmode={sslmode}"
    with pytest.raises(ValueError, match=f"sslmode={sslmode}; use sslmode=verify-full"):
        debezium.connector_config(settings, conninfo)
    config = debezium.connector_config(
        settings, "host=127.0.0.1 dbname=stripe user=u sslmode=verify-full sslrootcert=/ca.crt"
    )
    assert (config["database.sslmode"], config["database.sslrootcert"]) == (
        "verify-full",
        "/ca.crt",
    )


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"s3_endpoint_url": "http://minio:9000"}, "S3_ENDPOINT_URL"),
        ({"s3_endpoint_url": "ftp://s3.example.com"}, "S3_ENDPOINT_URL"),
        ({"kms_endpoint_url": "http://kms.eu-west-1.example.com"}, "KMS_ENDPOINT_URL"),
        ({"alert_webhook_url": "http://hooks.example.com/T0KEN-42"}, "ALERT_WEBHOOK_URL"),
        ({"mlflow_tracking_uri": "http://mlflow.internal:5000"}, "MLFLOW_TRACKING_URI"),
        ({"s3_endpoint_url": "http://127.0.0.1.example.com:9000"}, "S3_ENDPOINT_URL"),
    ],
)
def test_plain_http_endpoints_off_this_machine_are_refused(overrides, variable):
    with pytest.raises(SettingsError) as refused:
        load_settings(**overrides)
    message = str(refused.value)
    assert f"STRIPE_PLATFORM_{variable} must be an https:// URL" in message
    assert "127.0.0.1, ::1 or localhost" in message
    assert "T0KEN" not in message  # a webhook's token is never echoed


def test_plain_http_snowflake_only_for_a_local_stand_in():
    with pytest.raises(SettingsError, match="SNOWFLAKE_PROTOCOL=http is accepted only for a local"):
        load_settings(snowflake_protocol="http", snowflake_host="acme.snowflakecomputing.com")
    with pytest.raises(SettingsError, match="SNOWFLAKE_HOST must then be"):
        load_settings(snowflake_protocol="http")  # Snowflake itself, in clear
    assert load_settings(snowflake_protocol="http", snowflake_host="127.0.0.1").snowflake_host
    assert load_settings(snowflake_protocol="https", snowflake_host="acme.example.com")


@pytest.mark.parametrize(
    "overrides",
    [
        {"s3_endpoint_url": "https://minio:9000"},
        {"s3_endpoint_url": "http://127.0.0.1:5000"},
        {"kms_endpoint_url": "http://localhost:4566"},
        {"kms_endpoint_url": "http://[::1]:4566"},
        {"alert_webhook_url": "https://hooks.example.com/T0KEN"},
        {"alert_webhook_url": " "},
        {"mlflow_tracking_uri": "sqlite:///tmp/mlflow.db"},
        {"mlflow_tracking_uri": "http://127.0.0.1:5000"},
    ],
)
def test_https_and_loopback_stand_ins_are_accepted(overrides):
    load_settings(**overrides)


def test_secret_settings_are_checked_like_the_others():
    with pytest.raises(SettingsError, match="ALERT_WEBHOOK_URL must be an https"):
        load_settings(alert_webhook_url=SecretStr("http://10.0.0.1/hook"))
