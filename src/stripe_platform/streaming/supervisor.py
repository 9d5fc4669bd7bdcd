"""The fraud stream as a supervised service: start it detached, stop it, judge its health, restart
it when it died or hangs. The ``cdc_fraud_stream`` DAG calls :func:`ensure_running` every five
minutes and fails (so the Airflow alert fires) when :func:`health` finds it lagging.

The service is ``python -m stripe_platform.cli stream fraud`` run by the interpreter of this
process (never a ``stripe-platform`` found on PATH: it could be another install), in a session of
its own so it outlives the shell or Airflow task that started it. Its files live beside the status
file the scorer rewrites about once a second (``streaming.scorer.status_path``):
``<home>/stream/fraud/stream.pid`` (which process is the service) and ``stream.log`` (its output).

Health reads the status file: the process is alive (the pid file's process, checked by its command
line so a reused pid is never taken for it), its heartbeat is fresh, its state is not ``failed``,
the slot's lag is under ``stream_lag_alert_bytes`` and the commit-to-score p95 under
``stream_lag_alert_seconds``. Dead or hung (stale heartbeat) means restart; lagging means alert:
a restart would not make a backlog smaller.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from stripe_platform.config import ENV_PREFIX, Settings
from stripe_platform.errors import PlatformError
from stripe_platform.runtime import processes
from stripe_platform.runtime.processes import terminate
from stripe_platform.streaming import StreamError

COMMAND = ("-m", "stripe_platform.cli", "stream", "fraud")
# The status file is rewritten about once a second: a minute without it means the loop is stuck
# (a hung query, a deadlock), not merely busy.
STALE_AFTER_S = 60.0
# Importing, loading the champion and warming the feature state come before the first status
# write: a new process is given this long before its silence counts against it.
START_GRACE_S = 300.0
STOP_TIMEOUT_S = 30.0


class StreamUnhealthy(PlatformError, RuntimeError):
    """The stream is lagging or down; the message lists the reasons (what the alert says)."""


def stream_dir(settings: Settings) -> Path:
    from stripe_platform.streaming.scorer import status_path

    return status_path(settings).parent


def pid_path(settings: Settings) -> Path:
    return stream_dir(settings) / "stream.pid"


def log_path(settings: Settings) -> Path:
    return stream_dir(settings) / "stream.log"


def command() -> list[str]:
    return [sys.executable, *COMMAND]


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that gives a child process exactly ``settings``: the platform's variables
    of ``base`` (default: this process's) replaced by every field that has a value."""
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith(ENV_PREFIX) and k != "MONGODB_URI"
    }
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    return env


# -- the process ----------------------------------------------------------------------------------
def _reap(pid: int) -> None:
    """Collect the exit status of a service this process started (else it stays a zombie)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _is_service(pid: int) -> bool:
    """``pid`` is a live stream service (a zombie has no command line; a reused pid another)."""
    _reap(pid)
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return tuple(a.decode(errors="replace") for a in args[1 : 1 + len(COMMAND)]) == COMMAND


@dataclass(frozen=True)
class PidFile:
    pid: int
    started_at: dt.datetime


def read_pid(settings: Settings) -> PidFile | None:
    try:
        data = json.loads(pid_path(settings).read_text())
        return PidFile(int(data["pid"]), dt.datetime.fromisoformat(data["started_at"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def running_pid(settings: Settings) -> int | None:
    """The service's pid when it runs, else None."""
    found = read_pid(settings)
    return found.pid if found is not None and _is_service(found.pid) else None


@contextlib.contextmanager
def _exclusive(settings: Settings) -> Iterator[None]:
    """One supervisor action at a time per home (the DAG and a `stream start` by hand)."""
    directory = stream_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "supervisor.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start(settings: Settings) -> int:
    """Start the service detached; its pid. Refused while one runs for this home."""
    with _exclusive(settings):
        return _start(settings)


def _start(settings: Settings) -> int:
    pid = running_pid(settings)
    if pid is not None:
        raise StreamError(
            f"the fraud stream already runs (pid {pid}); `stripe-platform stream stop` first"
        )
    directory = stream_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    log = log_path(settings)
    with log.open("ab") as out:
        os.chmod(log, 0o600)
        started = dt.datetime.now(dt.UTC)
        out.write(f"--- {started.isoformat()} starting: {' '.join(COMMAND[1:])}\n".encode())
        out.flush()
        process = subprocess.Popen(
            command(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own directory: an Airflow task's working directory is removed when it ends.
            cwd=directory,
            env=settings_env(settings),
            start_new_session=True,  # outlives the shell or task that started it
        )
    # Just after exec the new command line can still read empty: once it shows, this process is
    # recognisably the service (a second start is refused from here on).
    while not _is_service(process.pid) and process.poll() is None:
        time.sleep(0.001)
    tmp = pid_path(settings).with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": process.pid, "started_at": started.isoformat()}))
    tmp.replace(pid_path(settings))
    return process.pid


def stop(settings: Settings, timeout: float = STOP_TIMEOUT_S) -> int | None:
    """Stop the service: SIGTERM (it finishes its batch and checkpoints), SIGKILL after
    ``timeout`` seconds. The pid stopped, or None when none ran."""
    with _exclusive(settings):
        return _stop(settings, timeout)


def _stop(settings: Settings, timeout: float = STOP_TIMEOUT_S) -> int | None:
    pid = running_pid(settings)
    if pid is not None:
        terminate(pid, lambda: _is_service(pid), timeout)
    pid_path(settings).unlink(missing_ok=True)
    return pid


def log_tail(settings: Settings, lines: int = 20) -> str:
    return processes.log_tail(log_path(settings), lines)


# -- health ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamHealth:
    alive: bool
    """The service's process runs."""
    responsive: bool
    """Alive with a fresh heartbeat (or still within its start grace) and not failed."""
    pid: int | None
    state: str | None
    heartbeat_age_s: float | None
    slot_lag_bytes: int | None
    consumer_lag_messages: int | None
    commit_to_score_p95_ms: float | None
    down: tuple[str, ...] = ()
    """Why it is not running as it should (a restart is the remedy)."""
    lagging: tuple[str, ...] = ()
    """Why it is behind (an alert: a restart would not shrink the backlog)."""
    status: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def healthy(self) -> bool:
        return not self.down and not self.lagging

    @property
    def reasons(self) -> tuple[str, ...]:
        return self.down + self.lagging

    def summary(self) -> str:
        if self.healthy:
            return f"the fraud stream is healthy (pid {self.pid}, state {self.state})"
        return "the fraud stream is unhealthy: " + "; ".join(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        found = asdict(self)
        found.pop("status")
        return {**found, "healthy": self.healthy, "summary": self.summary()}


def _mib(n: float) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def _timestamp(value: Any) -> dt.datetime | None:
    try:
        at = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)


def health(
    settings: Settings,
    *,
    now: dt.datetime | None = None,
    stale_after: float = STALE_AFTER_S,
    start_grace: float = START_GRACE_S,
) -> StreamHealth:
    """How the service is doing, from its process and its status file, with the reasons."""
    from stripe_platform.streaming.scorer import read_status

    now = now or dt.datetime.now(dt.UTC)
    found = read_pid(settings)
    pid = found.pid if found is not None and _is_service(found.pid) else None
    try:
        status = read_status(settings)
    except StreamError:  # written atomically: unreadable means gone wrong, as good as none
        status = None
    # A status written by an earlier process says nothing about this one.
    mine = status if status and pid is not None and status.get("pid") == pid else None
    down: list[str] = []
    lagging: list[str] = []
    if pid is None:
        down.append(
            "not running (not started)"
            if found is None
            else f"not running: process {found.pid} is gone (log {log_path(settings)})"
        )
    state = (mine or {}).get("state")
    heartbeat = _timestamp((mine or {}).get("heartbeat_at"))
    age = None if heartbeat is None else max(0.0, (now - heartbeat).total_seconds())
    if pid is not None:
        if heartbeat is None:
            since = (now - found.started_at).total_seconds()  # type: ignore[union-attr]
            if since > start_grace:
                down.append(f"no heartbeat {since:.0f} s after its start (pid {pid})")
        else:
            # Loading the champion and warming the window state write no heartbeat meanwhile.
            allowed = start_grace if state in ("starting", "warming") else stale_after
            if age is not None and age > allowed:
                down.append(
                    f"heartbeat {age:.0f} s old in state {state} (stale after {allowed:.0f} s, "
                    f"pid {pid})"
                )
        if state in ("failed", "stopped"):
            error = (mine or {}).get("error")
            down.append(f"state {state}" + (f": {error}" if error else ""))
    lag_bytes = (mine or {}).get("slot_lag_bytes")
    if isinstance(lag_bytes, int) and lag_bytes > settings.stream_lag_alert_bytes:
        lagging.append(
            f"slot lag {_mib(lag_bytes)} ({lag_bytes} bytes) above the alert threshold "
            f"{_mib(settings.stream_lag_alert_bytes)} ({ENV_PREFIX}STREAM_LAG_ALERT_BYTES)"
        )
    delays = (mine or {}).get("commit_to_score_ms") or {}
    p95 = delays.get("p95")
    if isinstance(p95, int | float) and p95 > settings.stream_lag_alert_seconds * 1000:
        lagging.append(
            f"commit-to-score p95 {p95 / 1000:.3f} s over the last {delays.get('count')} "
            f"payments above the alert threshold {settings.stream_lag_alert_seconds:g} s "
            f"({ENV_PREFIX}STREAM_LAG_ALERT_SECONDS)"
        )
    return StreamHealth(
        alive=pid is not None,
        responsive=pid is not None and not down,
        pid=pid,
        state=state,
        heartbeat_age_s=age,
        slot_lag_bytes=lag_bytes,
        consumer_lag_messages=(mine or {}).get("consumer_lag_messages"),
        commit_to_score_p95_ms=p95,
        down=tuple(down),
        lagging=tuple(lagging),
        status=mine,
    )


@dataclass(frozen=True)
class Ensured:
    action: str
    """``none`` (it was fine), ``started`` (none ran) or ``restarted`` (dead or hung)."""
    pid: int
    reasons: tuple[str, ...] = ()
    """Why it was (re)started."""
    previous_pid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def wait_running(settings: Settings, pid: int, timeout: float) -> StreamHealth:
    """Wait until the service ``pid`` reports the state ``running`` (or ``timeout`` seconds: a
    long warm-up is no failure); fail with the end of its log if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        now = health(settings)
        if now.pid != pid:
            raise StreamError(
                f"the fraud stream (pid {pid}) exited at start; the end of its log "
                f"{log_path(settings)}:\n{log_tail(settings)}"
            )
        if now.state == "running" or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def ensure_running(
    settings: Settings,
    *,
    wait: float | None = None,
    now: dt.datetime | None = None,
    stale_after: float = STALE_AFTER_S,
) -> Ensured:
    """Start the service when none runs, restart it when it is dead, hung (stale heartbeat) or
    failed. With ``wait`` (seconds), return once a new process runs (see :func:`wait_running`)."""
    with _exclusive(settings):
        before = health(settings, now=now, stale_after=stale_after)
        if not before.down:
            return Ensured("none", before.pid)  # type: ignore[arg-type]
        ran_before = read_pid(settings) is not None  # dead or alive, it had been started
        previous = before.pid
        if previous is not None:
            _stop(settings)
        pid = _start(settings)
    if wait is not None:
        wait_running(settings, pid, wait)
    return Ensured("restarted" if ran_before else "started", pid, before.down, previous)
