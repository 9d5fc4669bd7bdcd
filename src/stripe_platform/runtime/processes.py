"""What every server the platform runs beside PostgreSQL shares: stopping a process it started
(SIGTERM, then SIGKILL past a timeout) and the tail of its log for an error message."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def terminate(
    pid: int,
    alive: Callable[[], bool],
    timeout: float,
    *,
    reap: Callable[[], None] = lambda: None,
) -> None:
    """SIGTERM ``pid`` and wait up to ``timeout`` seconds until ``alive()`` is false; then SIGKILL
    and wait. ``reap`` collects the exit status of a child (else it stays a zombie). A stopped
    (SIGSTOP) process handles SIGTERM only once continued: it is sent SIGCONT too."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        reap()
        time.sleep(0.1)
    if alive():
        # What a server holds is on disk (or re-read from its source): killing it loses nothing.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while alive():
            reap()
            time.sleep(0.05)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` of a log file, for an error message ("(no log)" when there is none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
