"""The Airbyte control plane: the airbyte/ catalog applied to an Airbyte workspace, and syncs run
there, through Airbyte's public API v1 with the ``airbyte-api`` SDK (the calls Airflow's Airbyte
provider makes, so what the platform configures is what its DAGs trigger).

- ``client``: :func:`connect` (OAuth client credentials), :func:`connect_from_env`;
- ``workspace``: :func:`plan` (what would change, matched by name, never deleting) and
  :func:`apply`;
- ``jobs``: :func:`trigger_sync` (start a job and wait for it), :func:`connection_id`.

Importing this package imports the SDK: the command line and the DAGs import it only when they
talk to Airbyte.
"""

from stripe_platform.ingestion.airbyte.client import connect, connect_from_env
from stripe_platform.ingestion.airbyte.jobs import SyncError, connection_id, trigger_sync
from stripe_platform.ingestion.airbyte.workspace import (
    Change,
    FieldDiff,
    Plan,
    PlanError,
    apply,
    plan,
)

__all__ = [
    "Change",
    "FieldDiff",
    "Plan",
    "PlanError",
    "SyncError",
    "apply",
    "connect",
    "connect_from_env",
    "connection_id",
    "plan",
    "trigger_sync",
]
