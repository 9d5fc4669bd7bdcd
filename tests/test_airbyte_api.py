"""Applying the catalog to Airbyte and running syncs, against a local fake of the public API v1."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from airbyte_api import AirbyteAPI  # a main dependency: a broken install must fail, not skip

from stripe_platform.ingestion import airbyte as ab  # `airbyte` is the fake's fixture
from stripe_platform.ingestion.airbyte import PlanError, SyncError
from stripe_platform.ingestion.catalog import (
    AIRBYTE_DIR,
    Catalog,
    MissingEnvError,
    load_catalog,
)

if TYPE_CHECKING:
    from airbyte_fake import FakeAirbyte

pytest_plugins = ["airbyte_fake"]  # the `airbyte` fixture: a running fake, fresh per test

SECRETS = {
    "STRIPE_PLATFORM_PG_PASSWORD": "pg-password-1",
    "STRIPE_PLATFORM_MONGODB_PASSWORD": "mongo-password-1",
    "STRIPE_PLATFORM_SNOWFLAKE_PRIVATE_KEY": "-----BEGIN PRIVATE KEY-----\nMIIfake\n-----END PRIVATE KEY-----",
    "STRIPE_PLATFORM_S3_ACCESS_KEY_ID": "AKIAFAKEFAKE",
    "STRIPE_PLATFORM_S3_SECRET_ACCESS_KEY": "s3-secret-1",
}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture
def env(airbyte: FakeAirbyte) -> dict[str, str]:
    return {
        "STRIPE_PLATFORM_AIRBYTE_URL": airbyte.url,
        "STRIPE_PLATFORM_AIRBYTE_WORKSPACE_ID": airbyte.workspace_id,
        "STRIPE_PLATFORM_AIRBYTE_CLIENT_ID": airbyte.client_id,
        "STRIPE_PLATFORM_AIRBYTE_CLIENT_SECRET": airbyte.client_secret,
        **SECRETS,
    }


@pytest.fixture
def client(catalog: Catalog, env: dict[str, str]) -> AirbyteAPI:
    return ab.connect_from_env(catalog, env)


def writes(fake: FakeAirbyte) -> list[tuple[str, str]]:
    return [
        r
        for r in fake.requests
        if r[0] in ("POST", "PATCH", "DELETE") and r[1] != "/applications/token"
    ]


def by_name(items: dict[str, dict]) -> dict[str, dict]:
    return {item["name"]: item for item in items.values()}


def streams_of(fake: FakeAirbyte, connection: str) -> dict[str, dict]:
    stored = by_name(fake.connections)[connection]
    return {s["name"]: s for s in stored["configurations"]["streams"]}


# --- plan and apply -------------------------------------------------------------------------


def test_plan_on_an_empty_workspace_creates_everything(
    airbyte: FakeAirbyte, client: AirbyteAPI, catalog: Catalog, env: dict[str, str]
) -> None:
    plan = ab.plan(client, catalog, env)
    assert [(c.kind, c.name, c.action) for c in plan.changes] == [
        ("source", "postgres", "create"),
        ("source", "mongodb", "create"),
        ("destination", "snowflake", "create"),
        ("destination", "s3", "create"),
        ("connection", "postgres-to-snowflake", "create"),
        ("connection", "mongodb-to-snowflake", "create"),
        ("connection", "postgres-to-s3", "create"),
        ("connection", "mongodb-to-s3", "create"),
    ]
    text = plan.render()
    assert "+ connection postgres-to-snowflake" in text
    assert "stream customer: incremental_deduped_history" in text
    assert "stream customer: incremental_append" in text  # into the lake
    assert text.endswith("Plan: 8 to create, 0 to update, 0 unchanged.")
    assert not any(secret in text for secret in SECRETS.values())
    assert writes(airbyte) == []  # planning changes nothing
    assert ("POST", "/applications/token") in airbyte.requests  # OAuth client credentials


def test_apply_is_idempotent(
    airbyte: FakeAirbyte, client: AirbyteAPI, catalog: Catalog, env: dict[str, str]
) -> None:
    ids = ab.apply(client, ab.plan(client, catalog, env))
    assert set(ids["connection"]) == {c.name for c in catalog.connections}
    assert (len(airbyte.sources), len(airbyte.destinations), len(airbyte.connections)) == (2, 2, 4)
    done = len(writes(airbyte))

    again = ab.plan(client, catalog, env)
    assert {c.action for c in again.changes} == {"unchanged"}
    assert again.render().endswith("Plan: 0 to create, 0 to update, 8 unchanged.")
    assert ab.apply(client, again) == ids
    assert len(writes(airbyte)) == done
    assert (len(airbyte.sources), len(airbyte.destinations), len(airbyte.connections)) == (2, 2, 4)


def test_what_airbyte_receives(
    airbyte: FakeAirbyte, client: AirbyteAPI, catalog: Catalog, env: dict[str, str]
) -> None:
    ab.apply(client, ab.plan(client, catalog, env))
    postgres = by_name(airbyte.sources)["postgres"]["configuration"]
    assert postgres["password"] == "pg-password-1"  # resolved from the environment
    assert postgres["schemas"] == ["public"] and postgres["ssl_mode"]["mode"] == "require"
    cdc = postgres["replication_method"]
    assert (cdc["method"], cdc["plugin"], cdc["replication_slot"], cdc["publication"]) == (
        "CDC",
        "pgoutput",
        "stripe_platform",
        "stripe_platform",
    )
    assert cdc["lsn_commit_behaviour"] == "After loading Data in the destination"
    mongodb = by_name(airbyte.sources)["mongodb"]["configuration"]
    assert mongodb["sourceType"] == "mongodb-v2" and mongodb["database_config"]["databases"] == [
        "stripe"
    ]

    s3 = by_name(airbyte.destinations)["s3"]["configuration"]
    assert (s3["s3_bucket_path"], s3["s3_path_format"], s3["file_name_pattern"]) == (
        "raw",
        "${NAMESPACE}/${STREAM_NAME}/extracted_date=${YEAR}-${MONTH}-${DAY}/",
        "{sync_id}-{part_number}{format_extension}",
    )
    assert s3["format"]["format_type"] == "Parquet"
    snowflake = by_name(airbyte.destinations)["snowflake"]["configuration"]
    assert snowflake["schema"] == "RAW" and snowflake["credentials"]["private_key"].startswith(
        "-----BEGIN"
    )

    to_snowflake = streams_of(airbyte, "postgres-to-snowflake")
    assert to_snowflake["transaction"]["syncMode"] == "incremental_deduped_history"
    assert to_snowflake["transaction"]["primaryKey"] == [["id"], ["datetime"]]
    assert to_snowflake["currency"]["syncMode"] == "full_refresh_overwrite"
    assert all("cursorField" not in s for s in to_snowflake.values())  # CDC: source-defined
    selected = [f["fieldPath"][0] for f in to_snowflake["customer"]["selectedFields"]]
    assert "password" not in selected and "_ab_cdc_lsn" in selected
    stored = by_name(airbyte.connections)["postgres-to-snowflake"]
    assert (stored["namespaceFormat"], stored["prefix"]) == ("RAW", "postgres_")
    assert stored["schedule"] == {"scheduleType": "manual"}  # Airflow triggers it
    to_lake = streams_of(airbyte, "mongodb-to-s3")
    assert {s["syncMode"] for s in to_lake.values()} == {"incremental_append"}
    assert by_name(airbyte.connections)["mongodb-to-s3"]["namespaceFormat"] == "mongodb"


def test_a_sync_mode_change_updates_only_the_connections_it_reaches(
    tmp_path: Path, airbyte: FakeAirbyte, client: AirbyteAPI, catalog: Catalog, env: dict[str, str]
) -> None:
    ab.apply(client, ab.plan(client, catalog, env))
    root = tmp_path / "airbyte"
    shutil.copytree(AIRBYTE_DIR, root)
    text = (root / "catalog.yaml").read_text()
    old = "{name: transactionstatechanges, sync_mode: incremental_append_deduped,"
    assert old in text
    (root / "catalog.yaml").write_text(
        text.replace(old, "{name: transactionstatechanges, sync_mode: incremental_append,")
    )
    changed = load_catalog(root)

    plan = ab.plan(client, changed, env)
    # The lake already received it as append (S3 cannot dedupe): only Snowflake's connection moves.
    assert [(c.kind, c.name) for c in plan.pending] == [("connection", "postgres-to-snowflake")]
    (diff,) = plan.pending[0].diff
    assert diff.render() == (
        "streams.transactionstatechanges.syncMode: 'incremental_deduped_history' -> 'incremental_append'"
    )
    assert "~ connection postgres-to-snowflake" in plan.render()
    assert plan.render().endswith("Plan: 0 to create, 1 to update, 7 unchanged.")

    before = len(writes(airbyte))
    ab.apply(client, plan)
    assert writes(airbyte)[before:] == [
        ("PATCH", f"/connections/{plan.pending[0].resource_id}"),
    ]
    assert streams_of(airbyte, "postgres-to-snowflake")["transactionstatechanges"]["syncMode"] == (
        "incremental_append"
    )
    assert {c.action for c in ab.plan(client, changed, env).changes} == {"unchanged"}


def test_changes_made_in_airbyte_show_up_as_drift(
    airbyte: FakeAirbyte, client: AirbyteAPI, catalog: Catalog, env: dict[str, str]
) -> None:
    ab.apply(client, ab.plan(client, catalog, env))
    connection = by_name(airbyte.connections)["mongodb-to-s3"]
    connection["schedule"] = {"scheduleType": "cron", "cronExpression": "0 0 5 * * ?"}
    connection["configurations"]["streams"].append(
        {"name": "Extra", "syncMode": "full_refresh_overwrite"}
    )
    by_name(airbyte.sources)["postgres"]["configuration"]["port"] = 6432

    plan = ab.plan(client, catalog, env)
    assert [(c.name, c.action) for c in plan.pending] == [
        ("postgres", "update"),
        ("mongodb-to-s3", "update"),
    ]
    text = plan.render()
    assert "configuration.port: 6432 -> 5432" in text
    assert "schedule.scheduleType: 'cron' -> 'manual'" in text  # someone scheduled it in Airbyte
    assert "streams.Extra: (configured) -> (not in the catalog)" in text
    ab.apply(client, plan)
    assert {c.action for c in ab.plan(client, catalog, env).changes} == {"unchanged"}
    assert by_name(airbyte.sources)["postgres"]["configuration"]["password"] == "pg-password-1"


# --- secrets --------------------------------------------------------------------------------


def test_a_missing_secret_names_its_variable_before_anything_changes(
    airbyte: FakeAirbyte, client: AirbyteAPI, catalog: Catalog, env: dict[str, str]
) -> None:
    del env["STRIPE_PLATFORM_PG_PASSWORD"]
    with pytest.raises(MissingEnvError) as excinfo:
        ab.plan(client, catalog, env)
    assert str(excinfo.value) == (
        "environment variable STRIPE_PLATFORM_PG_PASSWORD is not set "
        "(needed by airbyte/sources.yaml postgres.password_env)"
    )
    assert writes(airbyte) == []
    with pytest.raises(MissingEnvError, match="STRIPE_PLATFORM_AIRBYTE_CLIENT_SECRET"):
        ab.connect_from_env(catalog, {**env, "STRIPE_PLATFORM_AIRBYTE_CLIENT_SECRET": ""})


def test_secrets_are_masked_by_airbyte_and_refreshed_on_demand(
    airbyte: FakeAirbyte, client: AirbyteAPI, catalog: Catalog, env: dict[str, str]
) -> None:
    ab.apply(client, ab.plan(client, catalog, env))
    listed = client.sources.list_sources(request={"workspace_ids": [airbyte.workspace_id]})
    assert listed.sources_response is not None
    configurations = {s.name: s.configuration for s in listed.sources_response.data}
    assert configurations["postgres"].password == "**********"
    assert configurations["mongodb"].database_config.password == "**********"

    rotated = {**env, "STRIPE_PLATFORM_PG_PASSWORD": "pg-password-2"}
    assert {c.action for c in ab.plan(client, catalog, rotated).changes} == {"unchanged"}
    plan = ab.plan(client, catalog, rotated, refresh_secrets=True)
    assert [(c.kind, c.name) for c in plan.pending] == [
        ("source", "postgres"),
        ("source", "mongodb"),
        ("destination", "snowflake"),
        ("destination", "s3"),
    ]
    assert "(secrets): (masked by Airbyte) -> (sent again)" in plan.render()
    assert "pg-password-2" not in plan.render()
    ab.apply(client, plan)
    assert by_name(airbyte.sources)["postgres"]["configuration"]["password"] == "pg-password-2"


def test_two_resources_with_one_name_stop_the_plan(
    airbyte: FakeAirbyte, client: AirbyteAPI, catalog: Catalog, env: dict[str, str]
) -> None:
    ab.apply(client, ab.plan(client, catalog, env))
    (source_id, source) = next(iter(airbyte.sources.items()))
    airbyte.sources["copy"] = {**source, "sourceId": "copy"}
    with pytest.raises(PlanError, match="two sources named 'postgres'; delete one in Airbyte"):
        ab.plan(client, catalog, env)
    assert source_id in airbyte.sources


# --- the fake is as strict as Airbyte where it matters ------------------------------------------


def test_the_fake_validates_requests_with_the_sdk_models(
    airbyte: FakeAirbyte, env: dict[str, str]
) -> None:
    http = httpx.Client(base_url=airbyte.url)
    assert http.get("/sources").status_code == 401
    token = http.post(
        "/applications/token",
        data={
            "grant_type": "client_credentials",
            "client_id": airbyte.client_id,
            "client_secret": airbyte.client_secret,
        },
    ).json()["access_token"]
    http.headers["Authorization"] = f"Bearer {token}"
    body = {
        "name": "pg",
        "workspaceId": airbyte.workspace_id,
        "configuration": {
            "sourceType": "postgres",
            "port": 5432,
            "database": "stripe",
            "username": "u",
        },
    }
    refused = http.post("/sources", json=body)
    assert refused.status_code == 422 and "SourceCreateRequest" in refused.json()["message"]
    body["configuration"]["host"] = "db"
    source = http.post("/sources", json=body).json()
    destination = http.post(
        "/destinations",
        json={
            "name": "lake",
            "workspaceId": airbyte.workspace_id,
            "configuration": {
                "destinationType": "s3",
                "s3_bucket_name": "b",
                "s3_bucket_path": "raw",
                "format": {"format_type": "Parquet"},
            },
        },
    ).json()
    connection = {
        "name": "c",
        "sourceId": source["sourceId"],
        "destinationId": destination["destinationId"],
    }
    dedup = {
        "configurations": {"streams": [{"name": "t", "syncMode": "incremental_deduped_history"}]}
    }
    assert (
        http.post("/connections", json={**connection, **dedup}).status_code == 400
    )  # S3 cannot dedupe
    every_second = {"schedule": {"scheduleType": "cron", "cronExpression": "* * * * * ?"}}
    assert http.post("/connections", json={**connection, **every_second}).status_code == 400
    assert http.post("/connections", json={**connection, "status": "sleeping"}).status_code == 422
    assert http.post("/connections", json=connection).status_code == 200


def test_the_fake_refuses_a_cursor_on_a_cdc_stream(
    airbyte: FakeAirbyte, client: AirbyteAPI, catalog: Catalog, env: dict[str, str]
) -> None:
    ab.apply(client, ab.plan(client, catalog, env))
    stored = by_name(airbyte.connections)["postgres-to-snowflake"]
    token = next(iter(airbyte._tokens))
    streams = [
        {
            "name": "customer",
            "syncMode": "incremental_deduped_history",
            "cursorField": ["updatedat"],
        }
    ]
    response = httpx.patch(
        f"{airbyte.url}/connections/{stored['connectionId']}",
        json={"configurations": {"streams": streams}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 400
    assert "is already defined by source for stream: customer" in response.json()["message"]


# --- syncs ----------------------------------------------------------------------------------


@pytest.fixture
def applied(airbyte: FakeAirbyte, client: AirbyteAPI) -> AirbyteAPI:
    for name in (
        "postgres-to-snowflake",
        "mongodb-to-snowflake",
        "postgres-to-s3",
        "mongodb-to-s3",
    ):
        airbyte.add_connection(name)
    return client


def test_trigger_sync_waits_for_success(airbyte: FakeAirbyte, applied: AirbyteAPI) -> None:
    seen: list[str] = []
    job = ab.trigger_sync(
        applied,
        "postgres-to-snowflake",
        poll_interval=0.01,
        timeout=10,
        on_progress=lambda j: seen.append(j.status.value),
        workspace_id=airbyte.workspace_id,
    )
    assert seen == ["pending", "running", "succeeded"]
    assert (job.status.value, job.rows_synced) == ("succeeded", 1234)
    assert (
        job.connection_id == by_name(airbyte.connections)["postgres-to-snowflake"]["connectionId"]
    )
    assert ("POST", "/jobs") in airbyte.requests and (
        "GET",
        f"/jobs/{job.job_id}",
    ) in airbyte.requests


@pytest.mark.parametrize(
    ("outcome", "words"), [("failed", "failed"), ("cancelled", "was cancelled")]
)
def test_trigger_sync_reports_a_failed_or_cancelled_job(
    airbyte: FakeAirbyte, applied: AirbyteAPI, outcome: str, words: str
) -> None:
    airbyte.job_outcome = outcome  # type: ignore[assignment]
    with pytest.raises(SyncError) as excinfo:
        ab.trigger_sync(applied, "mongodb-to-s3", poll_interval=0.01, timeout=10)
    assert str(excinfo.value) == f"Airbyte sync of connection 'mongodb-to-s3' (job 1001) {words}"
    assert (excinfo.value.connection, excinfo.value.job_id, excinfo.value.status) == (
        "mongodb-to-s3",
        1001,
        outcome,
    )


def test_trigger_sync_times_out_and_cancels_the_job(
    airbyte: FakeAirbyte, applied: AirbyteAPI
) -> None:
    airbyte.job_outcome = "hang"
    with pytest.raises(
        SyncError,
        match=r"'postgres-to-s3' \(job 1001\) did not finish within 0.2s \(last status: running\); cancelled it",
    ):
        ab.trigger_sync(applied, "postgres-to-s3", poll_interval=0.02, timeout=0.2)
    assert airbyte.jobs[1001]["status"] == "cancelled"
    assert ("DELETE", "/jobs/1001") in airbyte.requests


def test_trigger_sync_refuses_unknown_and_busy_connections(
    airbyte: FakeAirbyte, applied: AirbyteAPI
) -> None:
    with pytest.raises(SyncError, match="Airbyte has no connection named 'postgres-to-bigquery'"):
        ab.trigger_sync(applied, "postgres-to-bigquery", poll_interval=0.01)
    airbyte.job_outcome = "hang"
    with pytest.raises(SyncError, match="did not finish"):
        ab.trigger_sync(applied, "mongodb-to-snowflake", poll_interval=0.01, timeout=0.05)
    airbyte.jobs[1001]["status"] = "running"  # as if someone restarted it in the UI
    with pytest.raises(
        SyncError,
        match="could not start a sync of Airbyte connection 'mongodb-to-snowflake': a sync is already running",
    ):
        ab.trigger_sync(applied, "mongodb-to-snowflake", poll_interval=0.01)
