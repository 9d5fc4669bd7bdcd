"""The fraud stream's supervisor (streaming/supervisor.py) and the DAG that runs it every five
minutes (cdc_fraud_stream). The service is the real `stripe-platform stream fraud` (python -m
stripe_platform.cli stream fraud) on a seeded platform with a trained champion, the session's
PostgreSQL and FerretDB: started detached, found healthy, killed with SIGKILL and restarted,
frozen (SIGSTOP) until its heartbeat is stale and restarted, judged lagging against the
thresholds, stopped. Waits end on an observed event (a state or a count in the status file, a
process gone), never on a fixed delay."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_platform import seeded_platform, train_champion
from stripe_platform.config import load_settings
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.oltp import db
from stripe_platform.orchestration import defaults
from stripe_platform.streaming import supervisor
from stripe_platform.streaming.embedded import DEFAULT_SLOT
from stripe_platform.streaming.scorer import read_status, status_path

# One Airflow home per session: test_dags points Airflow at it when first imported.
from test_dags import _AIRFLOW_SETTINGS, DAGS_DIR, Webhook, clear_platform_env

pytestmark = pytest.mark.timeout(900)

WAIT_S = 240.0  # the longest a stream may take to come up on shared, busy cores


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Poll ``check`` until it returns something truthy (the event observed); fail after
    ``timeout`` s, naming the event."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def pid_gone(pid: int) -> bool:
    supervisor._reap(pid)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def status_of(s, pid: int) -> dict | None:
    status = read_status(s)
    return status if status and status.get("pid") == pid else None


def running(s, pid: int) -> dict | None:
    status = status_of(s, pid)
    return status if status and status["state"] == "running" else None


def touch_payments(s, n: int) -> list[int]:
    """Change ``n`` payments (a new UpdatedAt): each change is one the stream scores."""
    with db.connect(s, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("SELECT ID FROM Transaction ORDER BY ID LIMIT %s", (n,))]
        conn.execute(
            "UPDATE Transaction SET UpdatedAt = clock_timestamp() WHERE ID = ANY(%s)", (ids,)
        )
    return ids


def scored_events(s) -> int:
    with db.connect(s) as conn:
        return conn.execute("SELECT count(*) FROM FraudScoreEvent").fetchone()[0]


# -- without a service ------------------------------------------------------------------------------
@pytest.fixture
def bare(settings, tmp_path):
    """Settings with a home of their own (nothing ever ran there)."""
    return settings.model_copy(update={"home": tmp_path / "home"})


def test_without_a_service_health_says_why_and_a_reused_pid_is_not_taken_for_it(bare):
    found = supervisor.health(bare)
    assert (found.alive, found.healthy, found.pid) == (False, False, None)
    assert found.down == ("not running (not started)",) and found.lagging == ()
    assert found.summary() == "the fraud stream is unhealthy: not running (not started)"

    # A pid file naming a live process that is not the service (this test's own): not alive.
    supervisor.stream_dir(bare).mkdir(parents=True)
    started = dt.datetime.now(dt.UTC).isoformat()
    supervisor.pid_path(bare).write_text(json.dumps({"pid": os.getpid(), "started_at": started}))
    found = supervisor.health(bare)
    assert not found.alive and found.down == (
        f"not running: process {os.getpid()} is gone (log {supervisor.log_path(bare)})",
    )
    assert supervisor.stop(bare) is None  # nothing of ours to stop: the test process lives on


def test_the_child_gets_exactly_the_settings_it_was_started_with(bare, monkeypatch):
    """Settings made in code (not from the environment) reach the detached process intact."""
    s = bare.model_copy(update={"pg_database": "elsewhere", "stream_lag_alert_bytes": 123})
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", "not_this_one")
    env = supervisor.settings_env(s)
    assert env["STRIPE_PLATFORM_PG_DATABASE"] == "elsewhere"
    assert env["STRIPE_PLATFORM_PG_FSYNC"] == "false"  # the session cluster's
    assert env["PATH"] == os.environ["PATH"]  # the rest of the environment passes through
    for key, value in env.items():
        if key.startswith("STRIPE_PLATFORM_") or key == "MONGODB_URI":
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key, raising=False)
    assert load_settings().model_dump() == s.model_dump()


# -- the real service -------------------------------------------------------------------------------
@pytest.fixture
def platform(settings, database, docdb, tmp_path, monkeypatch, seed_templates) -> Iterator[Any]:
    """A seeded platform with a champion; the stream is stopped and its slot dropped after."""
    p = seeded_platform(settings, database, docdb, tmp_path, monkeypatch, templates=seed_templates)
    train_champion(p.settings)
    # Files of an earlier test's stream under the session home say nothing about this one.
    supervisor.stop(p.settings)
    status_path(p.settings).unlink(missing_ok=True)
    yield p
    supervisor.stop(p.settings)
    with db.connect(p.settings, autocommit=True) as conn:
        cdc.drop_slot(conn, DEFAULT_SLOT)


def test_start_health_kill_restart_freeze_restart_lag_stop(platform):
    s = platform.settings

    # Started detached; a second start is refused while it runs.
    pid = supervisor.start(s)
    with pytest.raises(supervisor.StreamError, match=f"already runs \\(pid {pid}\\)"):
        supervisor.start(s)
    wait_for("the stream running", lambda: running(s, pid))
    found = supervisor.health(s)
    assert (found.alive, found.pid, found.state, found.healthy) == (True, pid, "running", True)
    assert found.reasons == () and 0 <= found.heartbeat_age_s < supervisor.STALE_AFTER_S
    assert found.slot_lag_bytes is not None  # the embedded source reports its slot's lag
    assert supervisor.ensure_running(s).as_dict() == {
        "action": "none",
        "pid": pid,
        "reasons": (),
        "previous_pid": None,
    }

    # It scores what is committed: the service is the real one.
    touch_payments(s, 3)
    wait_for("3 scores", lambda: scored_events(s) >= 3)

    # kill -9: seen as gone, restarted by ensure_running, which waits for it to run.
    os.kill(pid, signal.SIGKILL)
    wait_for("the killed process gone", lambda: pid_gone(pid))
    found = supervisor.health(s)
    assert not found.alive and not found.healthy
    assert found.down == (f"not running: process {pid} is gone (log {supervisor.log_path(s)})",)
    ensured = supervisor.ensure_running(s, wait=WAIT_S)
    assert ensured.action == "restarted" and ensured.previous_pid is None
    assert ensured.reasons == found.down and ensured.pid != pid
    second = ensured.pid
    assert supervisor.health(s).state == "running" and supervisor.health(s).healthy

    # The restarted stream scores new changes; the ones scored before are not scored twice.
    before = scored_events(s)
    touch_payments(s, 5)
    wait_for("5 more scores", lambda: scored_events(s) >= before + 5)
    wait_for("the status counting them", lambda: (status_of(s, second) or {}).get("scored"))

    # Lagging: the commit-to-score p95 over a threshold no real delay is under.
    strict = s.model_copy(update={"stream_lag_alert_seconds": 1e-6})
    found = supervisor.health(strict)
    assert found.alive and found.down == () and not found.healthy
    (reason,) = found.lagging
    assert reason.startswith("commit-to-score p95 ")
    assert reason.endswith(
        " above the alert threshold 1e-06 s (STRIPE_PLATFORM_STREAM_LAG_ALERT_SECONDS)"
    )
    assert supervisor.ensure_running(strict).action == "none"  # a restart does not cure a backlog

    # Frozen (SIGSTOP): its heartbeat stops. The slot lag it last reported is judged too.
    os.kill(second, signal.SIGSTOP)
    try:
        frozen = read_status(s)
        assert frozen["pid"] == second
        frozen["slot_lag_bytes"] = s.stream_lag_alert_bytes + 1
        frozen["heartbeat_at"] = dt.datetime.now(dt.UTC).isoformat()
        status_path(s).write_text(json.dumps(frozen))
        found = supervisor.health(s)
        assert found.lagging == (
            f"slot lag 64.0 MiB ({s.stream_lag_alert_bytes + 1} bytes) above the alert threshold "
            "64.0 MiB (STRIPE_PLATFORM_STREAM_LAG_ALERT_BYTES)",
        )
        later = dt.datetime.fromisoformat(frozen["heartbeat_at"]) + dt.timedelta(
            seconds=supervisor.STALE_AFTER_S + 5
        )
        found = supervisor.health(s, now=later)
        assert found.alive and found.down == (
            f"heartbeat {supervisor.STALE_AFTER_S + 5:.0f} s old in state running "
            f"(stale after {supervisor.STALE_AFTER_S:.0f} s, pid {second})",
        )
        ensured = supervisor.ensure_running(s, now=later, wait=WAIT_S)
    finally:
        if not pid_gone(second):
            os.kill(second, signal.SIGCONT)
    assert (ensured.action, ensured.previous_pid, ensured.reasons) == (
        "restarted",
        second,
        found.down,
    )
    assert pid_gone(second)  # the hung one was stopped, not left beside the new one
    third = ensured.pid
    assert supervisor.health(s).healthy

    # Stopped: SIGTERM, a clean exit that says so in its status.
    assert supervisor.stop(s) == third
    assert pid_gone(third)
    assert read_status(s)["state"] == "stopped"
    assert supervisor.health(s).down == ("not running (not started)",)
    assert supervisor.stop(s) is None


def cli(s, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", "stream", *args],
        env={**supervisor.settings_env(s), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_stream_start_without_a_champion_fails_with_the_services_own_words(
    settings, database, docdb, tmp_path, monkeypatch, seed_templates
):
    """`stream start` waits for the service to run: one that exits at start (no champion yet)
    fails the command with the end of its log, in one message, no traceback of the command's."""
    s = seeded_platform(
        settings, database, docdb, tmp_path, monkeypatch, templates=seed_templates
    ).settings
    supervisor.stop(s)
    try:
        done = cli(s, "start", "--wait", str(WAIT_S))
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.startswith("error: the fraud stream (pid ")
        assert f"exited at start; the end of its log {supervisor.log_path(s)}:" in done.stderr
        assert "champion" in done.stderr  # the service's own reason, from its log
        assert supervisor.health(s).down[0].startswith("not running: process ")
        done = cli(s, "stop")
        assert (done.returncode, done.stdout) == (0, "no fraud stream running\n")
    finally:
        supervisor.stop(s)
        with db.connect(s, autocommit=True) as conn:
            cdc.drop_slot(conn, DEFAULT_SLOT)


# -- the DAG ------------------------------------------------------------------------------------------
def bag(name: str = "cdc_fraud_stream.py"):
    from airflow.dag_processing.dagbag import DagBag

    found = DagBag(dag_folder=str(DAGS_DIR / name))
    assert found.import_errors == {}, found.import_errors
    return found.dags["cdc_fraud_stream"]


def test_the_dag_supervises_every_five_minutes_ensure_then_check():
    dag = bag()
    assert dag.schedule == dt.timedelta(minutes=5)
    assert {t.task_id for t in dag.tasks} == {"ensure_running", "check_stream"}
    assert dag.get_task("check_stream").upstream_task_ids == {"ensure_running"}
    assert dag.max_active_runs == 1 and not dag.catchup and "streaming" in dag.tags
    for t in dag.tasks:
        assert t.owner == defaults.OWNER and t.retries >= 1, t.task_id
        # Its wait for a (re)started stream fits in the task's time.
        assert t.execution_timeout > dt.timedelta(seconds=180), t.task_id
        assert t.on_failure_callback, t.task_id


@pytest.fixture
def airflow_metadata() -> None:
    from stripe_platform.orchestration.airflow_runtime import migrate_airflow_db

    migrate_airflow_db(_AIRFLOW_SETTINGS)


def test_the_dag_starts_the_stream_then_alerts_when_it_lags(
    airflow_metadata, platform, monkeypatch
):
    from airflow.utils.state import DagRunState

    s = platform.settings
    clear_platform_env(monkeypatch)
    for key, value in {
        "STRIPE_PLATFORM_PROFILE": "embedded",
        "STRIPE_PLATFORM_HOME": str(s.home_dir),
        "STRIPE_PLATFORM_PG_DATABASE": s.pg_database,
        "STRIPE_PLATFORM_MONGODB_DATABASE": s.mongodb_database,
        "STRIPE_PLATFORM_MLFLOW_TRACKING_URI": s.mlflow_tracking_uri.get_secret_value(),
    }.items():
        monkeypatch.setenv(key, value)
    dag = bag()
    for t in dag.tasks:
        t.retries = 0  # the alert follows the last try; no need to wait out the retry

    # No stream yet: the run starts one and waits for it to run; its check passes.
    first = dag.test()
    assert first.state == DagRunState.SUCCESS
    ensured = first.get_task_instance("ensure_running").xcom_pull(task_ids="ensure_running")
    assert ensured["action"] == "started"
    pid = ensured["pid"]
    checked = first.get_task_instance("check_stream").xcom_pull(task_ids="check_stream")
    assert (checked["healthy"], checked["pid"], checked["state"]) == (True, pid, "running")

    # A commit-to-score threshold no real delay is under: the next run leaves the stream be and
    # fails its check, and the failure alert reaches the webhook with the reason.
    touch_payments(s, 3)
    wait_for("3 scores in the status", lambda: (status_of(s, pid) or {}).get("scored", 0) >= 3)
    with Webhook() as hook:
        monkeypatch.setenv("STRIPE_PLATFORM_STREAM_LAG_ALERT_SECONDS", "0.000001")
        monkeypatch.setenv("STRIPE_PLATFORM_ALERT_WEBHOOK_URL", hook.url)
        second = dag.test()
    assert second.state == DagRunState.FAILED
    states = {ti.task_id: str(ti.state) for ti in second.get_task_instances()}
    assert states == {"ensure_running": "success", "check_stream": "failed"}
    ensured = second.get_task_instance("ensure_running").xcom_pull(task_ids="ensure_running")
    assert (ensured["action"], ensured["pid"]) == ("none", pid)
    (alert,) = hook.bodies
    assert (alert["event"], alert["dag_id"], alert["task_id"]) == (
        "task_failed",
        "cdc_fraud_stream",
        "check_stream",
    )
    assert alert["error"].startswith(
        "StreamUnhealthy: the fraud stream is unhealthy: commit-to-score p95 "
    )
    assert "above the alert threshold 1e-06 s" in alert["error"]
    assert supervisor.health(s).pid == pid  # still the same stream
