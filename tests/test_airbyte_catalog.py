"""The airbyte/ catalog: what it declares, and the errors a broken copy of it produces."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from pathlib import Path

import pytest

from stripe_platform.ingestion.catalog import (
    AIRBYTE_DIR,
    LAKE_FILE_NAME_PATTERN,
    LAKE_PATH_FORMAT,
    CatalogError,
    MissingEnvError,
    PostgresSource,
    S3Destination,
    SyncMode,
    UnknownConnectionError,
    document_fields,
    lake_key,
    load_catalog,
    oltp_column_labels,
    oltp_columns,
    require_env,
)


def airbyte_copy(tmp_path: Path) -> Path:
    target = tmp_path / "airbyte"
    shutil.copytree(AIRBYTE_DIR, target)
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def load_error(root: Path) -> str:
    with pytest.raises(CatalogError) as excinfo:
        load_catalog(root)
    return str(excinfo.value)


# --- what the repository's catalog declares ---------------------------------------------------


def test_the_repository_catalog_loads() -> None:
    catalog = load_catalog()
    assert [s.name for s in catalog.sources] == ["postgres", "mongodb"]
    assert [d.name for d in catalog.destinations] == ["snowflake", "s3"]
    assert {(c.source, c.destination) for c in catalog.connections} == {
        ("postgres", "snowflake"),
        ("mongodb", "snowflake"),
        ("postgres", "s3"),
        ("mongodb", "s3"),
    }
    postgres = catalog.source("postgres")
    assert isinstance(postgres, PostgresSource)
    assert (postgres.cdc.plugin, postgres.cdc.replication_slot, postgres.cdc.publication) == (
        "pgoutput",
        "stripe_platform",
        "stripe_platform",
    )
    snowflake = catalog.destination("snowflake")
    assert snowflake.kind == "snowflake" and snowflake.schema_ == "RAW"


def test_every_table_and_collection_is_a_stream() -> None:
    """A new table or collection must be added to the catalog (or deliberately left out here)."""
    catalog = load_catalog()
    assert {s.name for s in catalog.streams["postgres"].streams} == set(oltp_columns())
    assert {s.name for s in catalog.streams["mongodb"].streams} == set(document_fields())


def test_sync_modes_keys_and_cursors() -> None:
    catalog = load_catalog()
    pg = catalog.streams["postgres"]
    for name in ("currency", "paymentmethod", "transactionstatus", "industry", "merchantsize"):
        assert pg.stream(name).sync_mode is SyncMode.FULL_REFRESH_OVERWRITE
    for name in ("customer", "merchant", "transaction", "transactionstatechanges"):
        stream = pg.stream(name)
        assert stream.sync_mode is SyncMode.INCREMENTAL_APPEND_DEDUPED
        assert stream.primary_key and stream.cursor_field == "updatedat"
    assert pg.stream("transaction").primary_key == ("id", "datetime")  # partition key included
    cursors = {s.name: (s.primary_key, s.cursor_field) for s in catalog.streams["mongodb"].streams}
    assert cursors == {
        "Customer": (("_id",), "lastUpdated"),
        "CustomerReview": (("_id",), "timestamp"),
        "UserInteractionData": (("_id",), "session_start"),
        "Transaction": (("_id",), "timestamp"),
        "Log": (("_id",), "session_start"),
        "Merchant": (("_id",), "lastUpdated"),
    }
    assert SyncMode.INCREMENTAL_APPEND_DEDUPED.destination_sync_mode == "append_dedup"
    assert SyncMode.FULL_REFRESH_OVERWRITE.destination_sync_mode == "overwrite"


def test_secret_and_card_columns_never_leave_the_oltp() -> None:
    catalog = load_catalog()
    for (table, column), label in oltp_column_labels().items():
        stream = catalog.streams["postgres"].stream(table)
        selected = catalog.selected_fields("postgres", stream)
        if label in ("SECRET", "PCI"):
            assert column in stream.exclude_columns, (table, column)
            assert selected is not None and column not in selected
    customer = catalog.streams["postgres"].stream("customer")
    selected = catalog.selected_fields("postgres", customer)
    assert selected is not None and "password" not in selected
    assert {"id", "updatedat", "_ab_cdc_lsn"} <= set(selected)  # Airbyte needs the CDC cursor


def test_connections_take_every_stream_of_their_source_unless_they_list_some() -> None:
    catalog = load_catalog()
    for connection in catalog.connections:
        streams = catalog.resolve(connection.name).streams
        assert streams == catalog.streams[connection.source].streams
    (first, *_) = catalog.connections
    picky = first.model_copy(update={"name": "picky", "streams": ("merchant", "customer")})
    some = dataclasses.replace(catalog, connections=(*catalog.connections, picky))
    assert [s.name for s in some.resolve("picky").streams] == ["customer", "merchant"]


def test_a_connection_resolves_once_to_everything_its_sync_needs() -> None:
    catalog = load_catalog()
    lake = catalog.resolve("postgres-to-s3")
    assert lake.name == "postgres-to-s3"
    assert (lake.source.name, lake.destination.name) == ("postgres", "s3")
    assert lake.to_lake and not catalog.resolve("postgres-to-snowflake").to_lake
    assert lake.state_key == "connection:postgres-to-s3"
    assert lake.publication == "stripe_platform"
    incremental = {s.name for s in lake.incremental}
    assert "transaction" in incremental and "currency" not in incremental
    # One slot per connection and source database, cut to PostgreSQL's 63 characters with a hash
    # of the whole, so databases that differ past the cut still get slots of their own.
    assert lake.slot("stripe") == "stripe_platform_stripe_postgres_to_s3"
    assert lake.slot("Stripe-Dev") == "stripe_platform_stripe_dev_postgres_to_s3"
    cut = lake.slot("d" * 40)
    assert len(cut) == 63 and cut.startswith("stripe_platform_" + "d" * 38 + "_")
    assert cut != lake.slot("d" * 41)
    with pytest.raises(CatalogError, match="source mongodb is not PostgreSQL"):
        catalog.resolve("mongodb-to-s3").slot("stripe")
    with pytest.raises(UnknownConnectionError, match="unknown connection 'nope'; known: postgres-"):
        catalog.resolve("nope")


def test_lake_layout() -> None:
    assert LAKE_PATH_FORMAT == "${NAMESPACE}/${STREAM_NAME}/extracted_date=${YEAR}-${MONTH}-${DAY}/"
    assert LAKE_FILE_NAME_PATTERN == "{sync_id}-{part_number}{format_extension}"
    key = lake_key("postgres", "customer", dt.date(2024, 3, 9), 4242, 0)
    assert key == "raw/postgres/customer/extracted_date=2024-03-09/4242-0.parquet"
    catalog = load_catalog()
    s3_connections = [
        c
        for c in catalog.connections
        if isinstance(catalog.destination(c.destination), S3Destination)
    ]
    assert {c.namespace for c in s3_connections} == {"postgres", "mongodb"}  # the <source> segment
    assert all(c.prefix == "" for c in s3_connections)  # stream names stay the <stream> segment


def test_publication_sql_covers_the_catalog() -> None:
    sql = load_catalog().publication_sql()
    assert sql.startswith("CREATE PUBLICATION stripe_platform FOR TABLE public.currency,")
    assert "public.transaction," in sql and "publish_via_partition_root = true" in sql
    assert "pg_create_logical_replication_slot('stripe_platform', 'pgoutput')" in sql


def test_require_env_names_the_missing_variable() -> None:
    assert require_env({"X_PASSWORD": "s3cret"}, "X_PASSWORD", "test") == "s3cret"
    for env in ({}, {"X_PASSWORD": ""}):
        with pytest.raises(
            MissingEnvError, match=r"X_PASSWORD is not set \(needed by sources\.yaml"
        ):
            require_env(env, "X_PASSWORD", "sources.yaml postgres.password_env")


# --- what exists at the sources -----------------------------------------------------------------


def test_oltp_parser_follows_later_migrations(tmp_path: Path) -> None:
    (tmp_path / "0001_base.sql").write_text(
        "-- CREATE TABLE Ghost (ID int);\n"
        "CREATE TABLE Thing (\n"
        "    ID bigint PRIMARY KEY,\n"
        "    Code text CHECK (Code ~ '^[A-Z](,)$'), -- a comma, in a comment\n"
        "    Old text,\n"
        "    UNIQUE (Code)\n"
        ");\n"
        "CREATE TABLE thing_2024 PARTITION OF Thing DEFAULT;\n"
        "CREATE TABLE audit.trail (ID int);\n"
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN\n"
        "    CREATE TABLE Inner (ID int);\n"
        "END $$;\n"
    )
    (tmp_path / "0002_more.sql").write_text(
        "ALTER TABLE Thing ADD COLUMN UpdatedAt timestamptz;\n"
        "ALTER TABLE Thing DROP COLUMN Old;\n"
        "ALTER TABLE Thing ADD CONSTRAINT thing_code CHECK (Code <> '');\n"
        "COMMENT ON COLUMN Thing.Code IS 'PII: a code';\n"
    )
    assert oltp_columns(tmp_path) == {"thing": ("id", "code", "updatedat")}
    assert oltp_column_labels(tmp_path) == {("thing", "code"): "PII"}


# --- errors that name the file and the field ------------------------------------------------------


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(root / "sources.yaml", "    port: 5432\n", "    port: [5432\n")
    message = load_error(root)
    assert "sources.yaml: invalid YAML" in message


def test_a_literal_secret_is_rejected(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(
        root / "sources.yaml",
        "    password_env: STRIPE_PLATFORM_PG_PASSWORD\n",
        "    password: hunter2\n",
    )
    message = load_error(root)
    assert "sources.yaml: invalid" in message
    assert "sources[0].postgres.password: Extra inputs are not permitted" in message
    assert "sources[0].postgres.password_env: Field required" in message


def test_a_bad_sync_mode_names_the_stream(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(
        root / "catalog.yaml",
        "sync_mode: full_refresh_overwrite, primary_key: [id]}",
        "sync_mode: overwrite, primary_key: [id]}",
    )
    message = load_error(root)
    assert "catalog.yaml: invalid" in message
    assert "postgres.streams[0].sync_mode: Input should be 'incremental_append_deduped'" in message


def test_incremental_streams_need_a_cursor_and_dedup_needs_a_key(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(root / "catalog.yaml", ", cursor_field: lastUpdated}", "}")
    edit(
        root / "catalog.yaml",
        "{name: CustomerReview, sync_mode: incremental_append_deduped, primary_key: [_id],",
        "{name: CustomerReview, sync_mode: incremental_append_deduped,",
    )
    message = load_error(root)
    assert (
        "mongodb.streams[0]: Value error, incremental_append_deduped needs a cursor_field"
        in message
    )
    assert (
        "mongodb.streams[1]: Value error, incremental_append_deduped needs a primary_key" in message
    )


def test_a_stream_without_a_table_or_collection(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(root / "catalog.yaml", "{name: industry,", "{name: industries,")
    edit(root / "catalog.yaml", "{name: Log,", "{name: Logs,")
    message = load_error(root)
    assert "catalog.yaml: postgres.streams[4].name: 'industries' has no sql/oltp table" in message
    assert "catalog.yaml: mongodb.streams[4].name: 'Logs' has no mongo/collections spec" in message


def test_key_and_cursor_columns_must_exist(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(
        root / "catalog.yaml",
        "primary_key: [id, datetime], cursor_field: updatedat}",
        "primary_key: [id, created], cursor_field: updated_at}",
    )
    edit(
        root / "catalog.yaml",
        "cursor_field: session_start}\n    - {name: Transaction",
        "cursor_field: sessionStart}\n    - {name: Transaction",
    )
    message = load_error(root)
    assert "postgres.streams[12].primary_key: transaction has no field 'created'" in message
    assert "postgres.streams[12].cursor_field: transaction has no field 'updated_at'" in message
    assert (
        "mongodb.streams[2].cursor_field: UserInteractionData has no field 'sessionStart'"
        in message
    )


def test_unknown_streams_and_resources_in_a_connection(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(
        root / "connections.yaml",
        "    prefix: postgres_\n",
        "    prefix: postgres_\n    streams: [customer, customers]\n",
    )
    edit(root / "connections.yaml", "    destination: s3\n", "    destination: gcs\n")
    message = load_error(root)
    assert (
        "connections.yaml: connections[0].streams[1]: 'customers' is not a catalog stream of 'postgres'"
        in message
    )
    assert "connections.yaml: connections[2].destination: no destination named 'gcs'" in message
    assert "streams[0]" not in message


def test_a_cron_airbyte_would_refuse(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(
        root / "connections.yaml",
        "schedule: manual  # elt_warehouse_daily\n",
        'schedule: {cron: "* */5 * * * ?"}\n',
    )
    message = load_error(root)
    assert "connections.yaml: invalid" in message
    assert (
        "connections[0].schedule.CronSchedule.cron: Value error, seconds and minutes must be numbers"
        in message
    )


def test_credentials_in_a_mongodb_uri_are_refused(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(root / "sources.yaml", "mongodb://docstore", "mongodb://airbyte:hunter2@docstore")
    assert "no credentials in the URI: use username and password_env" in load_error(root)


def test_duplicates_are_refused(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(root / "catalog.yaml", "{name: paymentmethod,", "{name: currency,")
    edit(root / "connections.yaml", "name: mongodb-to-s3", "name: postgres-to-s3")
    with pytest.raises(
        CatalogError,
        match=r"catalog.yaml: invalid\n  postgres.streams: Value error, 'currency' appears twice",
    ):
        load_catalog(root)
    edit(
        root / "catalog.yaml",
        "{name: currency, sync_mode: full_refresh_overwrite, primary_key: [id]}\n    - {name: currency,",
        "{name: currency, sync_mode: full_refresh_overwrite, primary_key: [id]}\n    - {name: paymentmethod,",
    )
    assert "connections.yaml: name 'postgres-to-s3' appears twice" in load_error(root)


def test_a_source_without_streams(tmp_path: Path) -> None:
    root = airbyte_copy(tmp_path)
    edit(root / "catalog.yaml", "\nmongodb:\n", "\nmongo:\n")
    message = load_error(root)
    assert "catalog.yaml: mongo: no source of that name in sources.yaml" in message
    assert "catalog.yaml: no streams for source 'mongodb'" in message
