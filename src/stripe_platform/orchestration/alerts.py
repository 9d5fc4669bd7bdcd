"""The failure alert: every failed task (after its retries) is logged and, when
``STRIPE_PLATFORM_ALERT_WEBHOOK_URL`` is set, POSTed there as JSON (Slack-compatible ``text`` plus
the structured fields). An alert that cannot be delivered is logged; it never fails the callback.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from stripe_platform.config import Settings, load_settings

log = logging.getLogger("stripe_platform.alerts")
TIMEOUT_SECONDS = 10.0


def webhook_url(settings: Settings) -> str | None:
    """The configured webhook, or None (unset or empty, as docker compose passes an unset one)."""
    secret = settings.alert_webhook_url
    value = secret.get_secret_value().strip() if secret is not None else ""
    return value or None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def alert_payload(context: Mapping[str, Any]) -> dict[str, Any]:
    """What an alert says, from an Airflow callback context."""
    ti = context.get("ti") or context.get("task_instance")
    dag = context.get("dag")
    task = context.get("task")
    exception = context.get("exception")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag, "dag_id", None)
    task_id = getattr(ti, "task_id", None) or getattr(task, "task_id", None)
    run_id = context.get("run_id") or getattr(ti, "run_id", None)
    owner = getattr(task, "owner", None)
    error = f"{type(exception).__name__}: {exception}" if exception is not None else None
    payload = {
        "event": "task_failed",
        "dag_id": dag_id,
        "task_id": task_id,
        "run_id": run_id,
        "try_number": getattr(ti, "try_number", None),
        "map_index": getattr(ti, "map_index", None),
        "logical_date": _text(context.get("logical_date")),
        "owner": owner,
        "error": error,
        "log_url": _text(getattr(ti, "log_url", None)),
    }
    payload["text"] = f"[stripe-platform] {dag_id}.{task_id} failed (run {run_id}): {error}"
    return payload


def post_json(url: str, payload: Mapping[str, Any], timeout: float = TIMEOUT_SECONDS) -> int:
    """POST ``payload`` as JSON; returns the HTTP status (raises on network errors and 4xx/5xx)."""
    request = urllib.request.Request(  # noqa: S310 - the URL is the operator's own setting
        url,
        data=json.dumps(payload, default=str).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "stripe-platform-alerts"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return response.status


def send_alert(payload: Mapping[str, Any], settings: Settings | None = None) -> bool:
    """Log the alert and deliver it to the webhook if one is set; True when delivered."""
    log.error("ALERT %s", payload.get("text"), extra={"alert": dict(payload)})
    try:
        url = webhook_url(settings or load_settings())
    except Exception as exc:  # a settings problem must not hide the alert itself
        log.warning("alert webhook not read from settings: %s", exc)
        return False
    if url is None:
        return False
    try:
        status = post_json(url, payload)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("alert webhook delivery failed: %s", exc)
        return False
    log.info("alert delivered to webhook (HTTP %s)", status)
    return True


def on_failure_callback(context: Mapping[str, Any]) -> None:
    """``on_failure_callback`` of every task (see defaults.default_args)."""
    send_alert(alert_payload(context))
