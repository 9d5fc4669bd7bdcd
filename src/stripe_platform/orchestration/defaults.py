"""Production habits shared by every DAG: owner, retries with exponential backoff, execution
timeouts, the failure alert and the pools. No Airflow import: DAG files parse fast and this is
unit-tested without Airflow."""

from __future__ import annotations

import datetime as dt
from typing import Any

from stripe_platform.config import Settings

OWNER = "data-platform"
RETRIES = 2
RETRY_DELAY = dt.timedelta(minutes=1)
RETRY_BACKOFF = 2.0  # 1 min, 2 min, ... capped at MAX_RETRY_DELAY
MAX_RETRY_DELAY = dt.timedelta(minutes=30)
EXECUTION_TIMEOUT = dt.timedelta(hours=2)

# Pools: tasks writing the warehouse share WAREHOUSE_POOL. DuckDB (the embedded warehouse) takes
# one writer at a time, so the pool has one slot there; PostgreSQL and Snowflake take a few.
WAREHOUSE_POOL = "warehouse"
POOL_DESCRIPTIONS = {WAREHOUSE_POOL: "tasks that load or transform the warehouse"}


def pool_slots(settings: Settings) -> dict[str, int]:
    """Slots per pool for the configured backends."""
    return {WAREHOUSE_POOL: 1 if settings.warehouse_backend == "duckdb" else 4}


def pools_file(settings: Settings) -> dict[str, dict[str, Any]]:
    """The pools in `airflow pools import` format."""
    return {
        name: {"slots": slots, "description": POOL_DESCRIPTIONS[name], "include_deferred": False}
        for name, slots in pool_slots(settings).items()
    }


def default_args(**overrides: Any) -> dict[str, Any]:
    """``default_args`` for every DAG; ``overrides`` replace single entries (e.g. a shorter timeout)."""
    from stripe_platform.orchestration.alerts import on_failure_callback

    args: dict[str, Any] = {
        "owner": OWNER,
        "retries": RETRIES,
        "retry_delay": RETRY_DELAY,
        "retry_exponential_backoff": RETRY_BACKOFF,
        "max_retry_delay": MAX_RETRY_DELAY,
        "execution_timeout": EXECUTION_TIMEOUT,
        "on_failure_callback": on_failure_callback,
    }
    args.update(overrides)
    return args
