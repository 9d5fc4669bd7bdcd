"""The platform's API: POST /v1/fraud/score with the champion and the online features, readiness
through champion switches and registry failures, 422s that name the field, the OpenAPI schema
fuzzed by schemathesis, and `stripe-platform api` as a real uvicorn over TLS.

Real components: the session's PostgreSQL (a seeded database per test), a real MLflow store
(SQLite in tmp_path) whose champion the platform's own training made, the API's follower on a
temporary replication slot, a real bearer token of the access policy's fraud_service role (the
scope fraud.score: tests/test_api_auth.py covers the refusals). Expected scores come from the batch feature engine (DuckDB) and the
booster, not from the API's online path."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow.pyfunc
import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from typer.testing import CliRunner

from conftest import TEMPLATE_DB
from ml_platform import ROUNDS, Platform, ml_settings, seeded_platform, train_champion
from stripe_platform.api.app import create_app
from stripe_platform.api.models import EXAMPLE_REQUEST
from stripe_platform.cli import app as cli_app
from stripe_platform.config import get_settings
from stripe_platform.docstore import client as docstore
from stripe_platform.ml.contract import CANONICAL_SCHEMA, load_platform_transactions
from stripe_platform.ml.features import FEATURE_NAMES, FEATURE_VERSION, batch_features
from stripe_platform.ml.registry import Registry, load_champion
from stripe_platform.ml.score import Scorer
from stripe_platform.oltp import db
from stripe_platform.runtime.tls import tls_files
from stripe_platform.security import sessions

# The seeded platform's payments end on this day (ml_platform.seeded_platform): the in-process
# apps warm their online features up to it, as if it were now.
SEED_END = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
READY_TIMEOUT = 60.0  # an upper bound on warm-up and first load, never a wait by itself
# The access policy of these tests: the scorer machine client of the fraud_service role.
POLICY = """\
version: 1
roles:
  fraud_service:
    description: the machine client of POST /v1/fraud/score
    api: [fraud.score]
users:
  fraud-scorer:
    roles: [fraud_service]
    stores: [api]
"""
SCORER = "fraud-scorer"


@pytest.fixture(scope="module")
def access_policy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("api-access") / "policy.yaml"
    path.write_text(POLICY)
    return path


def scorer_headers(s) -> dict[str, str]:
    """A bearer token of the scorer, issued in ``s``'s database (a day long)."""
    _, secret = sessions.issue_token(
        s,
        user=SCORER,
        roles=["fraud_service"],
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
        created_by="tests/test_api.py",
    )
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def seeded(settings, tmp_path_factory, access_policy) -> Iterator[Platform]:
    """One seeded database and a trained champion (version 1) for the module: seeding and
    training are most of these tests' time. Tests change a copy of its MLflow store."""
    name = f"test_api_{os.getpid()}"
    settings = settings.model_copy(update={"access_policy": access_policy})
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    docdb = docstore.connect(settings.model_copy(update={"mongodb_database": name}))
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            tmp = tmp_path_factory.mktemp("api-platform")
            p = seeded_platform(settings, name, docdb, tmp, monkeypatch)
            assert train_champion(p.settings).version == "1"
            # Version 2, registered but not promoted: fewer rounds, another model (training is
            # deterministic). Tests promote it in their copy of the store.
            second = train_champion(p.settings, promote=False, num_boost_round=ROUNDS // 2)
            assert second.version == "2"
        yield p
    finally:
        docdb.client.drop_database(docdb.name)
        docdb.client.close()
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def platform(seeded, tmp_path, monkeypatch) -> Platform:
    """The seeded platform with a copy of its MLflow store of its own (version 1 the champion,
    version 2 registered)."""
    store = Path(seeded.settings.mlflow_tracking_uri.get_secret_value().removeprefix("sqlite:///"))
    shutil.copyfile(store, tmp_path / "mlflow.db")
    s = ml_settings(seeded.settings, tmp_path, monkeypatch)
    return Platform(s, seeded.data, seeded.docdb)


@contextlib.contextmanager
def serving(app) -> Iterator[TestClient]:
    """The app running in process (its lifespan: the refresher and the follower threads), once
    its first champion check and warm-up have ended; its requests carry the scorer's token."""
    headers = scorer_headers(app.state.services.settings)
    with TestClient(app, headers=headers) as client:
        assert app.state.services.wait_started(READY_TIMEOUT)
        yield client


def last_payment(s) -> dict:
    """The history up to SEED_END and a request for a new payment by its last payment's customer,
    merchant, device and IP at SEED_END."""
    history = load_platform_transactions(s, end=SEED_END, require_labels=False)
    last = history.table.slice(history.num_rows - 1).to_pylist()[0]
    request = {
        "transaction_id": "api-1",
        "timestamp": SEED_END.isoformat(),
        "customer_id": last["customer_id"],
        "merchant_id": int(last["merchant_id"]),  # the platform's integer ids are accepted
        "amount": 250,
        "currency": "USD",
        "device_id": last["device_id"],
        "ip": last["ip"],
        "country": "us",
        "billing_country": "GB",
    }
    return {"history": history, "request": request}


def batch_expected(history, request: dict, rate: float) -> np.ndarray:
    """The request's features as training computes them: DuckDB's batch engine over the history
    with the payment appended."""
    row = {
        "transaction_id": request["transaction_id"],
        "timestamp": SEED_END,
        "customer_id": str(request["customer_id"]),
        "merchant_id": str(request["merchant_id"]),
        "amount": request["amount"] * rate,
        "label": None,
        "label_time": None,
        "device_id": request["device_id"],
        "ip": request["ip"],
        "country": request["country"].upper(),
        "billing_country": request["billing_country"],
    }
    table = pa.concat_tables(
        [history.table, pa.Table.from_pylist([row], schema=history.table.schema)]
    )
    assert table.schema.equals(CANONICAL_SCHEMA, check_metadata=False)
    return batch_features(table)[list(FEATURE_NAMES)].to_numpy()[-1]


def test_score_matches_the_batch_features_and_the_booster(platform):
    s = platform.settings
    case = last_payment(s)
    request = case["request"]
    expected = batch_expected(case["history"], request, rate=0.86)  # USD, the seed's rate
    loaded = load_champion(Registry.from_settings(s), s.ml_model_name)
    booster = loaded.raw
    expected_score = float(booster.predict(expected.reshape(1, -1))[0])
    shap = booster.predict(expected.reshape(1, -1), pred_contrib=True)[0][:-1]
    threshold = Scorer.from_loaded(loaded).threshold

    with serving(create_app(s, features_now=SEED_END)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["model"]["version"] == "1"
        assert ready.json()["components"]["features"]["ready"]

        response = client.post("/v1/fraud/score", json=request)
        assert response.status_code == 200, response.text
        body = response.json()
    assert body["transaction_id"] == "api-1"
    assert body["model"] == {
        "name": "fraud",
        "version": "1",
        "feature_version": loaded.tags["feature_version"],
        "threshold": threshold,
    }
    got = np.array([np.nan if v is None else v for v in body["features"].values()])
    assert list(body["features"]) == list(FEATURE_NAMES)
    np.testing.assert_array_equal(got, expected)
    # The history is real: the customer, merchant, device and IP had payments before.
    assert body["features"]["customer_count_30d"] >= 1
    assert body["features"]["merchant_count_7d"] >= 1
    assert body["features"]["country_mismatch"] == 1.0  # US against GB
    assert body["score"] == pytest.approx(expected_score, abs=1e-12)
    assert body["is_fraud"] == (body["score"] >= threshold)
    top = np.argsort(-np.abs(shap), kind="stable")[:5]
    assert [c["feature"] for c in body["contributions"]] == [FEATURE_NAMES[i] for i in top]
    for c, i in zip(body["contributions"], top, strict=True):
        assert c["contribution"] == pytest.approx(shap[i], abs=1e-9)
        assert c["value"] == (None if np.isnan(expected[i]) else expected[i])


def test_malformed_requests_get_422_naming_the_field_and_no_champion_is_not_ready(
    settings, database, tmp_path, monkeypatch, access_policy
):
    # A migrated database without payments, an MLflow store without any model.
    s = ml_settings(
        settings, tmp_path, monkeypatch, pg_database=database, access_policy=access_policy
    )
    with serving(create_app(s)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        model = ready.json()["components"]["model"]
        assert not model["ready"] and "has no champion" in model["error"]
        assert ready.json()["components"]["features"]["ready"]  # warm, with nothing to read

        # The OpenAPI document describes the score with its example.
        openapi = client.get("/openapi.json").json()
        operation = openapi["paths"]["/v1/fraud/score"]["post"]
        assert set(operation["responses"]) == {"200", "400", "401", "403", "422", "503"}
        # Its security: a bearer token or the SSO session (api/auth.py).
        assert operation["security"] == [{"bearerToken": []}, {"ssoSession": []}]
        schemes = openapi["components"]["securitySchemes"]
        assert schemes["bearerToken"] == {
            "type": "http", "scheme": "bearer", "description": schemes["bearerToken"]["description"]
        }  # fmt: skip
        assert schemes["ssoSession"]["in"] == "cookie"
        assert schemes["ssoSession"]["name"] == "sp_session"
        # Without the token: 401 before the body is even read.
        anonymous = TestClient(client.app).post("/v1/fraud/score", json=EXAMPLE_REQUEST)
        assert anonymous.status_code == 401
        assert anonymous.json()["detail"]["reason"] == "no_credentials"
        request_schema = openapi["components"]["schemas"]["ScoreRequest"]
        assert request_schema["examples"] == [EXAMPLE_REQUEST]
        assert request_schema["properties"]["currency"]["enum"] == [
            "AUD", "BRL", "CAD", "CHF", "EUR", "GBP", "JPY", "USD"
        ]  # fmt: skip

        refused = client.post("/v1/fraud/score", json=EXAMPLE_REQUEST)
        assert refused.status_code == 503
        assert "no model to score with" in refused.json()["detail"]

        def fields(body: object) -> set[str]:
            """The fields a 422 names (its errors' locations in the body)."""
            response = client.post("/v1/fraud/score", json=body)
            assert response.status_code == 422, response.text
            detail = response.json()["detail"]
            assert all(e["loc"][0] == "body" for e in detail)
            return {e["loc"][1] for e in detail}

        def message(body: object) -> str:
            return client.post("/v1/fraud/score", json=body).json()["detail"][0]["msg"]

        example = EXAMPLE_REQUEST
        assert fields({k: v for k, v in example.items() if k != "customer_id"}) == {"customer_id"}
        assert fields({**example, "currency": "XYZ"}) == {"currency"}
        assert "unknown currency 'XYZ': one of AUD, BRL" in message({**example, "currency": "XYZ"})
        assert fields({**example, "amount": "12.50"}) == {"amount"}  # a number, not text
        assert fields({**example, "amount": -1}) == {"amount"}
        assert fields({**example, "ammount": 1}) == {"ammount"}  # unknown fields are refused
        assert fields({**example, "timestamp": 1_700_000_000}) == {"timestamp"}
        assert fields({**example, "timestamp": "yesterday"}) == {"timestamp"}
        assert fields({**example, "ip": "300.1.1.1"}) == {"ip"}
        assert message({**example, "ip": "300.1.1.1"}) == (
            "Value error, is not an IPv4 or IPv6 address"
        )
        assert fields({**example, "merchant_id": "  "}) == {"merchant_id"}
        assert fields({**example, "merchant_id": True}) == {"merchant_id"}
        assert fields({**example, "country": "USA", "device_id": ""}) == {"country", "device_id"}
        bad_json = client.post(
            "/v1/fraud/score", content=b"{", headers={"content-type": "application/json"}
        )
        assert bad_json.status_code == 422


def test_champion_switch_and_registry_failures_keep_the_last_good_model(platform):
    s = platform.settings
    registry = Registry.from_settings(s)
    with serving(create_app(s, features_now=SEED_END)) as client:
        holder = client.app.state.services.model
        request = last_payment(s)["request"]

        def served() -> tuple[str, dict]:
            score = client.post("/v1/fraud/score", json=request)
            assert score.status_code == 200, score.text
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["model"]["version"] == score.json()["model"]["version"]
            return score.json()["model"]["version"], ready.json()["components"]["model"]

        version, model = served()
        assert version == "1" and model["error"] is None
        first_score = client.post("/v1/fraud/score", json=request).json()["score"]

        # A new champion: the next check (the refresher's, done here at once) serves it.
        registry.promote(s.ml_model_name, "2")
        holder.refresh()
        version, model = served()
        assert version == "2" and model["error"] is None
        assert "serving fraud version 2" in model["detail"]
        assert client.post("/v1/fraud/score", json=request).json()["score"] != first_score

        # The alias moves to a version trained on other features: refused, version 2 serves.
        registry.set_version_tag(s.ml_model_name, "1", "feature_version", "fv0-elsewhere")
        registry.promote(s.ml_model_name, "1")
        holder.refresh()
        version, model = served()
        assert version == "2"
        assert "trained with features fv0-elsewhere" in model["error"]
        assert "the last good champion" in model["detail"]

        # MLflow unreachable (nothing listens on the port): version 2 still serves.
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        holder.registry = Registry(f"http://127.0.0.1:{port}")
        holder.refresh()
        version, model = served()
        assert version == "2" and "is unreachable" in model["error"]


class AmountModel(mlflow.pyfunc.PythonModel):
    """Not LightGBM: a pyfunc whose probability is the amount over 1,000 EUR, capped at 1."""

    def predict(self, context, model_input, params=None):
        return np.minimum(model_input["amount"].to_numpy() / 1000.0, 1.0)


def test_a_champion_that_is_not_lightgbm_scores_without_contributions(platform):
    s = platform.settings
    registry = Registry.from_settings(s)
    registered = registry.log_and_register(
        s.ml_model_name,
        log_model=lambda: mlflow.pyfunc.log_model(
            name="model", python_model=AmountModel(), pip_requirements=["mlflow"]
        ),
        params={},
        metrics={},
        tags={},
        documents={},
        version_tags={"decision_threshold": "0.2"},
        feature_version=FEATURE_VERSION,
        feature_names=FEATURE_NAMES,
    )
    registry.promote(s.ml_model_name, registered.version)
    with serving(create_app(s, features_now=SEED_END)) as client:
        request = last_payment(s)["request"]  # 250 USD: 215 EUR
        body = client.post("/v1/fraud/score", json=request).json()
    assert body["model"]["version"] == registered.version == "3"
    assert body["score"] == pytest.approx(0.215, abs=1e-12)
    assert body["is_fraud"] is True  # at the version's own threshold, 0.2
    assert body["contributions"] is None
    assert body["features"]["amount"] == pytest.approx(215.0)


def test_schemathesis_finds_no_server_error_in_the_openapi_schema(platform):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    app = create_app(platform.settings, features_now=SEED_END)
    with serving(app) as client:  # the services run while schemathesis calls the app
        assert client.get("/readyz").status_code == 200  # else every score would be a 503
        token = {"Authorization": client.headers["Authorization"]}
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        # The scoring API's operations (the access routes, SSO and MFA, have their own tests).
        scoring = {("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/v1/fraud/score")}
        operations = [
            o
            for o in (result.ok() for result in schema.get_all_operations())
            if (o.method.upper(), o.path) in scoring
        ]
        assert {(o.method.upper(), o.path) for o in operations} == scoring
        # Valid requests (positive) for each operation and requests the schema forbids
        # (negative) for the POST, bounded; every check schemathesis has (server errors, status
        # codes and bodies as documented, valid data accepted, invalid data rejected).
        runs = [(o, GenerationMode.POSITIVE, 5) for o in operations if o.method.upper() == "GET"]
        score = next(o for o in operations if o.method.upper() == "POST")
        runs += [(score, GenerationMode.POSITIVE, 120), (score, GenerationMode.NEGATIVE, 80)]
        for operation, mode, examples in runs:

            @given(case=operation.as_strategy(mode))
            @settings(
                max_examples=examples,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def fuzz(case) -> None:
                case.call_and_validate(headers=token)

            fuzz()


# -- `stripe-platform api`: a real uvicorn over TLS ---------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def platform_env(s, port: int) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STRIPE_PLATFORM_") and k != "MONGODB_URI"
    }
    return {
        **base,
        "STRIPE_PLATFORM_PROFILE": "embedded",
        "STRIPE_PLATFORM_HOME": str(s.home_dir),
        "STRIPE_PLATFORM_PG_DATABASE": s.pg_database,
        "STRIPE_PLATFORM_MONGODB_DATABASE": s.mongodb_database,
        "STRIPE_PLATFORM_MLFLOW_TRACKING_URI": s.mlflow_tracking_uri.get_secret_value(),
        "STRIPE_PLATFORM_API_PORT": str(port),
        "STRIPE_PLATFORM_ACCESS_POLICY": str(s.access_policy),
    }


def insert_payment_now(s, like_customer: str) -> int:
    """A new payment of the customer committed now (a copy of their last one, dated a minute ago)."""
    with db.connect(s, autocommit=True) as conn:
        (new_id,) = conn.execute(
            """INSERT INTO Transaction (ID, TransactionStatusID, MerchantID, Amount, CurrencyID,
                   PaymentMethodID, PaymentInstrumentID, DeviceID, CustomerID, BillingAddressID,
                   TransactionLocationID, IPAddress, DateTime)
               SELECT (SELECT max(ID) + 1 FROM Transaction), TransactionStatusID, MerchantID,
                   Amount, CurrencyID, PaymentMethodID, PaymentInstrumentID, DeviceID, CustomerID,
                   BillingAddressID, TransactionLocationID, IPAddress,
                   CURRENT_TIMESTAMP - interval '1 minute'
               FROM Transaction WHERE CustomerID = %s ORDER BY DateTime DESC LIMIT 1
               RETURNING ID""",
            (int(like_customer),),
        ).fetchone()
    return new_id


def test_the_cli_serves_over_tls_follows_changes_and_the_champion(platform, monkeypatch):
    s = platform.settings
    port = free_port()
    ca = tls_files(s.home_dir / "tls").ca_cert
    log = Path(s.home_dir) / f"api-{port}.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "stripe_platform.cli", "api", "--port", str(port)],
            env=platform_env(s, port),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        client = httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            verify=ssl.create_default_context(cafile=str(ca)),
            timeout=10,
            headers=scorer_headers(s),
        )

        def until(what: str, ok) -> httpx.Response:
            """Ask until ``ok(response)`` (the server's own state changing), within a bound."""
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                assert server.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
                try:
                    response = client.get("/readyz")
                    if ok(response):
                        return response
                except httpx.TransportError:
                    pass  # not listening yet
                assert time.monotonic() < deadline, f"{what}: {log.read_text()[-3000:]}"
                time.sleep(0.1)

        ready = until("ready", lambda r: r.status_code == 200)
        assert ready.json()["model"]["version"] == "1"

        # A second server on the same port: one clear line, exit 1.
        for key, value in platform_env(s, port).items():
            if key.startswith("STRIPE_PLATFORM_"):
                monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        try:
            busy = CliRunner().invoke(cli_app, ["api", "--port", str(port)])
        finally:
            get_settings.cache_clear()
        assert busy.exit_code == 1
        assert f"port {port} on 127.0.0.1 is in use" in busy.output
        assert "Traceback" not in busy.output

        # Plain HTTP is refused: the server speaks TLS only.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)

        # A new champion is picked up by the refresher, no restart.
        Registry.from_settings(s).promote(s.ml_model_name, "2")
        until("version 2", lambda r: r.json()["model"]["version"] == "2")

        # The follower applies a payment committed now: the customer's next payment sees it.
        case = last_payment(s)["request"]
        now = dt.datetime.now(dt.UTC)
        request = {**case, "timestamp": now.isoformat()}

        def customer_count_1h() -> float:
            response = client.post("/v1/fraud/score", json=request)
            assert response.status_code == 200, response.text
            assert response.json()["model"]["version"] == "2"
            return response.json()["features"]["customer_count_1h"]

        assert customer_count_1h() == 0  # the seed's payments are all a year old
        inserted = insert_payment_now(s, case["customer_id"])
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while customer_count_1h() != 1:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
        finally:  # the module's other tests read the seed as it was
            with db.connect(s, autocommit=True) as conn:
                conn.execute("DELETE FROM Transaction WHERE ID = %s", (inserted,))
        client.close()
    finally:
        server.terminate()
        server.wait(30)
    # uvicorn stops gracefully on SIGTERM, then ends by the signal as its default would.
    assert server.returncode == -signal.SIGTERM, log.read_text()[-3000:]
    assert "Application shutdown complete" in log.read_text()
    with db.connect(s, autocommit=True) as conn:  # its temporary slot went with its session
        slots = conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s",
            (f"stripe_fraud_api_{server.pid}_%",),
        ).fetchall()
    assert slots == []
