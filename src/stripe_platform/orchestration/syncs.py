"""The one sync-task factory, shared by every DAG that moves data (``elt_lake_daily``,
``elt_warehouse_daily``).

``sync_task("postgres-to-s3")`` inside a DAG gives one task that runs that connection of
airbyte/connections.yaml with whoever runs syncs on the active profile
(``Settings.ingestion_backend``): Airbyte through the provider's deferrable operator
(:class:`~stripe_platform.orchestration.airbyte.CatalogAirbyteSyncOperator`) on ``prod``, the
embedded engine (``ingestion.engine.run_sync``) elsewhere. Either way the task publishes the
connection's Asset and warehouse loads share the warehouse pool.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from stripe_platform.config import Settings, load_settings
from stripe_platform.orchestration.defaults import WAREHOUSE_POOL

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _catalog() -> Any:
    """airbyte/ loaded once per process (a DAG file asks several times while it parses)."""
    from stripe_platform.ingestion.catalog import load_catalog

    return load_catalog()


def task_id_for(connection: str) -> str:
    return "sync_" + connection.replace("-", "_")


def connection_asset(connection: str) -> Any:
    """What a connection produces: its source in the lake, or its raw tables in the warehouse."""
    from stripe_platform.orchestration.assets import lake_asset, warehouse_raw_asset

    resolved = _catalog().resolve(connection)
    namespace = resolved.connection.namespace
    if resolved.to_lake:
        return lake_asset(namespace)
    return warehouse_raw_asset(namespace, resolved.source.name)


def writes_warehouse(connection: str) -> bool:
    return not _catalog().resolve(connection).to_lake


def run_embedded_sync(connection: str, settings: Settings | None = None) -> dict[str, Any]:
    """Run one connection with the embedded engine; the report (rows per stream) becomes XCom."""
    from stripe_platform.ingestion.catalog import load_catalog
    from stripe_platform.ingestion.engine import open_writer, run_sync

    settings = settings or load_settings()
    resolved = load_catalog().resolve(connection)
    writer = open_writer(settings, resolved)

    def progress(stream: str, rows: int) -> None:
        log.info("%s: %s rows written", stream, f"{rows:,}")

    try:
        report = run_sync(settings, resolved, writer, progress)
    finally:
        conn = getattr(writer, "conn", None)  # release the warehouse (DuckDB has one writer)
        if conn is not None and hasattr(conn, "close"):
            conn.close()
    log.info(
        "%s: %s, %s rows in %.1fs (sync %s)",
        report.connection,
        report.phase,
        f"{report.rows:,}",
        report.seconds,
        report.sync_id,
    )
    return report.as_dict()


def sync_task(
    connection: str,
    *,
    settings: Settings | None = None,
    task_id: str | None = None,
    outlets: list[Any] | None = None,
    poll_interval: float = 30.0,
    airbyte_conn_id: str = "airbyte_default",
    **task_kwargs: Any,
) -> Any:
    """A task (inside a DAG definition) that syncs ``connection``; returns what ``>>`` chains.

    ``outlets`` defaults to the connection's Asset; ``task_kwargs`` go to the operator (e.g.
    ``execution_timeout``, ``retries``). Decided at parse time from the settings, so the DAG
    shows which path it takes.
    """
    settings = settings or load_settings()
    task_id = task_id or task_id_for(connection)
    outlets = outlets if outlets is not None else [connection_asset(connection)]
    if writes_warehouse(connection):
        task_kwargs.setdefault("pool", WAREHOUSE_POOL)
    if settings.ingestion_backend == "airbyte":
        from stripe_platform.orchestration.airbyte import CatalogAirbyteSyncOperator

        return CatalogAirbyteSyncOperator(
            task_id=task_id,
            connection_name=connection,
            airbyte_conn_id=airbyte_conn_id,
            poll_interval=poll_interval,
            outlets=outlets,
            **task_kwargs,
        )
    from airflow.sdk import task

    return task(task_id=task_id, outlets=outlets, **task_kwargs)(run_embedded_sync)(connection)
