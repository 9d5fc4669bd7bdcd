"""The dbt project rendered as Airflow tasks with astronomer-cosmos: one task per model, seed and
snapshot, then one task running all the tests, on the active profile's warehouse, in the warehouse
pool.

Cosmos's watcher execution mode: one producer task runs ``dbt build`` once (dbt in-process) and
publishes every node's status as it finishes; each node's task is a sensor reporting that status
(lineage, per-node state, per-node retries: a retried node task runs ``dbt`` for its node alone).
One dbt invocation instead of one per node: dbt's start-up (project load, adapter, connection),
about a second per node, is paid once (docs/orchestration.md has the measurements).

Rendering reads dbt's manifest (``dbt_project/target/manifest.json``, see
``transform.dbt.ensure_manifest``) instead of running ``dbt ls`` while the DAG file is parsed: dbt's
imports alone take seconds, and a DAG file must parse in well under one.
"""

from __future__ import annotations

import os
from typing import Any

from stripe_platform.config import Settings, load_settings
from stripe_platform.orchestration.defaults import WAREHOUSE_POOL
from stripe_platform.transform.dbt import (
    DBT_PROJECT_DIR,
    PROFILE,
    dbt_env,
    ensure_manifest,
    write_profiles,
)

# The marts the brief's queries read: published as Assets when a build finishes.
MARTS = (
    "DIM_Date",
    "DIM_Customer",
    "DIM_Merchant",
    "DIM_Location",
    "DIM_PaymentMethod",
    "DIM_Currency",
    "DIM_Device",
    "FACT_Revenue",
    "FACT_FraudAnalysis",
    "FACT_CustomerSegmentation",
    "FACT_CustomerReview",
    "FACT_Session",
)


def dbt_task_group(
    *,
    group_id: str = "transform",
    select: list[str] | None = None,
    settings: Settings | None = None,
    **kwargs: Any,
) -> Any:
    """A cosmos DbtTaskGroup of the project (or the ``select``ed part of it)."""
    from cosmos import DbtTaskGroup, ExecutionConfig, ProfileConfig, ProjectConfig, RenderConfig
    from cosmos.constants import (
        ExecutionMode,
        InvocationMode,
        LoadMode,
        TestBehavior,
    )

    settings = settings or load_settings()
    # Fresh in milliseconds; only a changed project (or a new checkout) pays for a `dbt parse`.
    manifest = ensure_manifest(settings)
    # The profile's secrets reach dbt through this process's environment, never through the
    # serialized DAG (task arguments are stored in Airflow's metadata database).
    os.environ.update(dbt_env(settings))
    profiles = write_profiles(settings) / "profiles.yml"
    return DbtTaskGroup(
        group_id=group_id,
        project_config=ProjectConfig(
            dbt_project_path=DBT_PROJECT_DIR, manifest_path=manifest, install_dbt_deps=False
        ),
        profile_config=ProfileConfig(
            profile_name=PROFILE,
            target_name=settings.warehouse_backend,
            profiles_yml_filepath=profiles,
        ),
        execution_config=ExecutionConfig(
            execution_mode=ExecutionMode.WATCHER,
            invocation_mode=InvocationMode.DBT_RUNNER,
            # A producer's retry only skips itself (cosmos never runs a second `dbt build`): a
            # failed build fails at once and the node tasks retry their own nodes.
            setup_operator_args={"retries": 0},
        ),
        render_config=RenderConfig(
            load_method=LoadMode.DBT_MANIFEST,
            # One task runs every test once all nodes are built: many tests join several models
            # (relationships, reconciliations), and one dbt invocation costs seconds of start-up.
            # The marts are published only if it passes.
            test_behavior=TestBehavior.AFTER_ALL,
            select=select or [],
            emit_datasets=False,  # the platform publishes its own mart Assets (mart_assets)
        ),
        operator_args={
            "pool": WAREHOUSE_POOL,
            # Node tasks poke in reschedule mode rather than deferring: `airflow dags test` runs
            # one task at a time, and a node task taken before the producer must give way to it.
            "deferrable": False,
            "mode": "reschedule",
        },
        **kwargs,
    )


def mart_assets(names: tuple[str, ...] = MARTS) -> list[Any]:
    from stripe_platform.orchestration.assets import mart_asset

    return [mart_asset(name) for name in names]


def publish_marts_task(names: tuple[str, ...] = MARTS, task_id: str = "publish_marts") -> Any:
    """A task (inside a DAG definition) marking the marts updated once the build before it
    succeeded: DAGs scheduled on their Assets start."""
    from airflow.sdk import task

    @task(task_id=task_id, outlets=mart_assets(names))
    def publish() -> list[str]:
        return list(names)

    return publish()
