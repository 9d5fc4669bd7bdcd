"""The jobs of the ``cdc_fraud_stream`` DAG, the fraud stream's supervisor, callable without
Airflow. Every five minutes::

    ensure_running -> check_stream

- :func:`ensure_stream`: start the stream when none runs, restart it when it died, hangs (stale
  heartbeat) or failed (``streaming.supervisor.ensure_running``), and wait for the new process's
  first heartbeat: one that exits at start fails the task with the end of its log. A restart is
  also announced through the alert sink (``orchestration.alerts.send_alert``): something killed it.
- :func:`check_stream`: the stream's health; lagging (slot lag above
  ``stream_lag_alert_bytes``, commit-to-score p95 above ``stream_lag_alert_seconds``) or down
  fails the task with the reasons, so the DAGs' failure alert (``alerts.on_failure_callback``)
  carries them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stripe_platform.config import Settings

# The task's execution_timeout (cdc_fraud_stream) leaves room for this wait.
START_WAIT_S = 180.0


def ensure_stream(settings: Settings, *, wait: float = START_WAIT_S) -> dict[str, Any]:
    from stripe_platform.orchestration.alerts import send_alert
    from stripe_platform.streaming import supervisor

    ensured = supervisor.ensure_running(settings, wait=wait)
    if ensured.action == "restarted":
        reasons = "; ".join(ensured.reasons)
        send_alert(
            {
                "event": "stream_restarted",
                "service": "fraud-stream",
                "pid": ensured.pid,
                "previous_pid": ensured.previous_pid,
                "reasons": list(ensured.reasons),
                "text": f"[stripe-platform] the fraud stream was restarted (pid {ensured.pid}): "
                f"{reasons}",
            },
            settings,
        )
    return ensured.as_dict()


def check_stream(settings: Settings) -> dict[str, Any]:
    from stripe_platform.streaming import supervisor

    found = supervisor.health(settings)
    if not found.healthy:
        raise supervisor.StreamUnhealthy(found.summary())
    return found.as_dict()
