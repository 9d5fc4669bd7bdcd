"""The warehouse: the one place that opens the configured backend's raw-layer writer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stripe_platform.config import Settings

if TYPE_CHECKING:  # the writers and pyarrow load only when one is opened
    from stripe_platform.rawlayer import RawWriter


def open_raw_writer(settings: Settings) -> RawWriter:
    """DuckDBRaw (embedded default), PostgresRaw or SnowflakeRaw, per STRIPE_PLATFORM_WAREHOUSE."""
    backend = settings.warehouse_backend
    if backend == "duckdb":
        from stripe_platform.warehouse.duckdb import DuckDBRaw, connect_duckdb

        return DuckDBRaw(connect_duckdb(settings.warehouse_file))
    if backend == "postgres":
        import psycopg

        from stripe_platform.warehouse.postgres import PostgresRaw

        assert settings.warehouse_dsn is not None  # checked by Settings
        return PostgresRaw(
            psycopg.connect(settings.warehouse_dsn.get_secret_value(), autocommit=True)
        )
    import snowflake.connector

    from stripe_platform.warehouse.snowflake import SnowflakeRaw

    conn = snowflake.connector.connect(**snowflake_params(settings))
    return SnowflakeRaw(conn, database=settings.snowflake_database)


def snowflake_params(settings: Settings) -> dict[str, Any]:
    """snowflake-connector-python arguments for the configured account (or local stand-in)."""
    params: dict[str, Any] = {
        "account": settings.snowflake_account,
        "user": settings.snowflake_user,
        "database": settings.snowflake_database,
        "warehouse": settings.snowflake_warehouse,
        "role": settings.snowflake_role,
        "schema": settings.snowflake_schema,
        "login_timeout": 30,
        "network_timeout": 120,
    }
    if settings.snowflake_password is not None:
        params["password"] = settings.snowflake_password.get_secret_value()
    if settings.snowflake_host:
        params.update(
            host=settings.snowflake_host,
            port=settings.snowflake_port,
            protocol=settings.snowflake_protocol,
        )
    return {k: v for k, v in params.items() if v is not None}


def open_marts_connection(settings: Settings, schema: str) -> Any:
    """A DB-API connection to the warehouse whose unqualified names resolve in ``schema`` (the
    marts), so the brief's queries run as written. DuckDB opens read-only: several readers at once."""
    backend = settings.warehouse_backend
    if backend == "duckdb":
        import duckdb

        conn = duckdb.connect(str(settings.warehouse_file), read_only=True)
        conn.execute(f"SET schema = '{schema}'")
        return conn
    if backend == "postgres":
        import psycopg

        assert settings.warehouse_dsn is not None  # checked by Settings
        return psycopg.connect(
            settings.warehouse_dsn.get_secret_value(),
            autocommit=True,
            options=f"-c search_path={schema}",
        )
    import snowflake.connector

    return snowflake.connector.connect(**{**snowflake_params(settings), "schema": schema.upper()})
