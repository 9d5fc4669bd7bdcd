"""Airbyte syncs on the ``prod`` profile: apache-airflow-providers-airbyte's operator, told the
connection by its name in airbyte/connections.yaml.

Airbyte assigns connection ids when ``stripe-platform airbyte apply`` creates the connections, so
the DAGs never hard-code one: the operator resolves the name through the same API (and the same
Airflow connection, ``airbyte_default``) just before it starts the job. It then defers to the
provider's trigger, so a running sync holds no worker slot; ``poll_interval`` replaces the
provider's fixed 60 s so frequent micro-batches are not slowed by polling.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from airbyte_api.models import JobStatusEnum
from airflow.providers.airbyte.hooks.airbyte import AirbyteHook
from airflow.providers.airbyte.operators.airbyte import AirbyteTriggerSyncOperator
from airflow.providers.airbyte.triggers.airbyte import AirbyteSyncTrigger

AIRBYTE_CONN_ID = "airbyte_default"
_RUNNING = (JobStatusEnum.RUNNING, JobStatusEnum.PENDING, JobStatusEnum.INCOMPLETE)


def airflow_connection_json(
    server_url: str, client_id: str | None = None, client_secret: str | None = None
) -> str:
    """``AIRFLOW_CONN_AIRBYTE_DEFAULT`` for the provider's hook. The token URL is absolute: the SDK
    resolves a relative one against the host only, which loses OSS's ``/api/public/v1``."""
    server_url = server_url.rstrip("/")
    conn: dict[str, Any] = {
        "conn_type": "airbyte",
        "host": server_url,
        "schema": f"{server_url}/applications/token",
    }
    if client_id and client_secret:
        conn |= {"login": client_id, "password": client_secret}
    return json.dumps(conn)


def airflow_connection_from_env(env: Mapping[str, str] = os.environ) -> str | None:
    """The Airflow connection built from the variables airbyte/workspace.yaml names, if set."""
    from stripe_platform.ingestion.catalog import load_catalog

    ws = load_catalog().workspace
    url = env.get(ws.server_url_env)
    if not url:
        return None
    return airflow_connection_json(url, env.get(ws.client_id_env), env.get(ws.client_secret_env))


class CatalogAirbyteSyncOperator(AirbyteTriggerSyncOperator):
    """Trigger a sync of the Airbyte connection named ``connection_name`` and wait, deferred."""

    template_fields: Sequence[str] = (
        *AirbyteTriggerSyncOperator.template_fields,
        "connection_name",
    )

    def __init__(
        self,
        *,
        connection_name: str,
        workspace_id: str | None = None,
        poll_interval: float = 30.0,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(connection_id="", deferrable=deferrable, **kwargs)
        self.connection_name = connection_name
        self.workspace_id = workspace_id
        self.poll_interval = poll_interval

    def resolve_connection_id(self, hook: AirbyteHook) -> str:
        from stripe_platform.ingestion.airbyte import connection_id

        workspace_id = self.workspace_id
        if workspace_id is None:
            from stripe_platform.ingestion.catalog import load_catalog

            workspace_id = os.environ.get(load_catalog().workspace.workspace_id_env) or None
        # The one name-to-id lookup of the Airbyte path (also used by `stripe-platform sync`).
        return connection_id(hook.airbyte_api, self.connection_name, workspace_id)

    def execute(self, context: Any) -> Any:
        hook = AirbyteHook(airbyte_conn_id=self.airbyte_conn_id, api_version=self.api_version)
        self.connection_id = self.resolve_connection_id(hook)
        self.log.info("Airbyte connection %r is %s", self.connection_name, self.connection_id)
        if self.asynchronous or not self.deferrable:
            return super().execute(context)
        job = hook.submit_sync_connection(connection_id=self.connection_id)
        self.job_id = job.job_id
        self.log.info("Airbyte job %s submitted", self.job_id)
        status = job.status
        if status == JobStatusEnum.SUCCEEDED:
            return self.job_id
        if status not in _RUNNING:
            raise RuntimeError(f"Airbyte job {self.job_id} of {self.connection_name!r}: {status}")
        now = time.time()
        deadline = timeout = None
        if self.execution_timeout is not None:
            deadline = now + self.execution_timeout.total_seconds()
            # Two polls of slack so the trigger reports the timeout (and cancels the job) first.
            timeout = self.execution_timeout + dt.timedelta(seconds=2 * self.poll_interval)
        self.defer(
            timeout=timeout,
            trigger=AirbyteSyncTrigger(
                conn_id=self.airbyte_conn_id,
                job_id=self.job_id,
                end_time=now + self.timeout,
                execution_deadline=deadline,
                poll_interval=self.poll_interval,
            ),
            method_name="execute_complete",
        )
        return None  # not reached: defer raises
