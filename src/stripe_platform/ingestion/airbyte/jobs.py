"""Airbyte syncs through the public API v1: ``POST /jobs`` then ``GET /jobs/{id}`` until the job
ends, as Airflow's Airbyte provider does, so what ``sync`` runs on prod is what the DAGs trigger."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
from airbyte_api import AirbyteAPI, api, errors, models

from stripe_platform.errors import PlatformError
from stripe_platform.ingestion.airbyte.client import PAGE, list_all

__all__ = ["SyncError", "connection_id", "trigger_sync"]

log = logging.getLogger(__name__)


class SyncError(PlatformError, RuntimeError):
    """A sync could not start, failed, was cancelled or timed out."""

    def __init__(
        self, message: str, *, connection: str, job_id: int | None = None, status: str | None = None
    ) -> None:
        super().__init__(message)
        self.connection = connection
        self.job_id = job_id
        self.status = status


_RUNNING = {
    models.JobStatusEnum.PENDING,
    models.JobStatusEnum.QUEUED,
    models.JobStatusEnum.RUNNING,
    models.JobStatusEnum.INCOMPLETE,  # an attempt failed and Airbyte is retrying
}


def connection_id(client: AirbyteAPI, name: str, workspace_id: str | None) -> str:
    """The id of the live connection named ``name`` (in ``workspace_id``, else any workspace the
    credentials see): the one name-to-id lookup of the Airbyte path, used by ``sync`` and by
    Airflow's operator. :class:`SyncError` unless exactly one matches."""
    ids = [workspace_id] if workspace_id else None
    connections = list_all(
        lambda offset: (
            client.connections.list_connections(
                request=api.ListConnectionsRequest(workspace_ids=ids, limit=PAGE, offset=offset)
            ).connections_response
        )
    )
    matches = [
        c
        for c in connections
        if c.name == name and c.status != models.ConnectionStatusEnum.DEPRECATED
    ]
    if len(matches) != 1:
        found = "no connection" if not matches else f"{len(matches)} connections"
        raise SyncError(f"Airbyte has {found} named {name!r}", connection=name)
    return matches[0].connection_id


def trigger_sync(
    client: AirbyteAPI,
    connection_name: str,
    *,
    poll_interval: float = 10.0,
    timeout: float = 3600.0,
    on_progress: Callable[[models.JobResponse], None] | None = None,
    workspace_id: str | None = None,
) -> models.JobResponse:
    """Start a sync of the named connection and wait for it to succeed.

    Raises :class:`SyncError` naming the connection and job when the job fails, is cancelled or
    outlives ``timeout`` (the job is then cancelled, as Airflow's provider does). ``on_progress``
    sees the job after every poll.
    """
    target = connection_id(client, connection_name, workspace_id)
    try:
        job = client.jobs.create_job(
            request=models.JobCreateRequest(connection_id=target, job_type=models.JobTypeEnum.SYNC)
        ).job_response
    except errors.AirbyteAPIError as exc:
        reason = "a sync is already running" if exc.status_code == 409 else str(exc)
        raise SyncError(
            f"could not start a sync of Airbyte connection {connection_name!r}: {reason}",
            connection=connection_name,
        ) from exc
    assert job is not None
    deadline = time.monotonic() + timeout
    while True:
        if on_progress is not None:
            on_progress(job)
        status = models.JobStatusEnum(job.status)
        if status == models.JobStatusEnum.SUCCEEDED:
            return job
        what = f"Airbyte sync of connection {connection_name!r} (job {job.job_id})"
        if status not in _RUNNING:
            verb = "was cancelled" if status == models.JobStatusEnum.CANCELLED else status.value
            raise SyncError(
                f"{what} {verb}", connection=connection_name, job_id=job.job_id, status=status.value
            )
        if time.monotonic() >= deadline:
            _cancel(client, job.job_id)
            raise SyncError(
                f"{what} did not finish within {timeout:g}s (last status: {status.value}); cancelled it",
                connection=connection_name,
                job_id=job.job_id,
                status="timeout",
            )
        time.sleep(poll_interval)
        job = _poll(client, job)


def _poll(client: AirbyteAPI, job: models.JobResponse) -> models.JobResponse:
    """The job's latest state; a transient server or network error keeps the last one known."""
    try:
        latest = client.jobs.get_job(request=api.GetJobRequest(job_id=job.job_id)).job_response
    except errors.AirbyteAPIError as exc:
        if exc.status_code < 500:
            raise
        log.warning("polling job %s: %s; retrying", job.job_id, exc)
        return job
    except httpx.TransportError as exc:
        log.warning("polling job %s: %s; retrying", job.job_id, exc)
        return job
    assert latest is not None
    return latest


def _cancel(client: AirbyteAPI, job_id: int) -> None:
    try:
        client.jobs.cancel_job(request=api.CancelJobRequest(job_id=job_id))
    except (errors.AirbyteAPIError, httpx.HTTPError) as exc:
        log.warning("could not cancel job %s: %s", job_id, exc)
