"""Running a DAG once, for real, on the embedded Airflow: ``airflow dags test`` in a subprocess
(SQLite metadata under the platform home), with one progress line per task and the full log kept
in ``<home>/logs/``.

The subprocess is Airflow's own command line started through this module (``python -m
stripe_platform.orchestration.dag_runs dags test <dag>``), which only adds one thing: the garbage
collector's passes at interpreter exit are skipped (:func:`gc.freeze` as the last exit handler).
A run's heap holds every task's objects (dbt's manifest, the DAGs, Airflow's models); collecting
it at exit took 15-18 s per DAG on a loaded 2-core machine (py-spy: ``gc_collect_main`` after
"DagRun Finished"), for memory the operating system reclaims at once anyway. Exit handlers,
flushes and commits still run.
"""

from __future__ import annotations

import atexit
import gc
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stripe_platform.config import Settings
from stripe_platform.orchestration.airflow_runtime import (
    AirflowSetupError,
    airflow_env,
    migrate_airflow_db,
)

_START = re.compile(r"\[DAG TEST\] starting task_id=(\S+)")
_END = re.compile(r"\[DAG TEST\] end task task_id=(\S+)")
_FAILED = re.compile(r"task_id=(\S+).*(?:state=failed|Marking task as FAILED)")
_RUN_STATE = re.compile(r"DagRun Finished: .*state=(\w+)")


@dataclass
class TaskTiming:
    task_id: str
    seconds: float


@dataclass
class DagTestResult:
    dag_id: str
    state: str
    seconds: float
    log: Path
    tasks: list[TaskTiming] = field(default_factory=list)


def dags_test(
    settings: Settings,
    dag_id: str,
    *,
    on_task: Callable[[TaskTiming], None] = lambda t: None,
) -> DagTestResult:
    """``airflow dags test <dag_id>``: every task of one run, in order, in this machine's Airflow."""
    migrate_airflow_db(settings)
    log_dir = settings.home_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{dag_id}.log"
    env = airflow_env(settings)
    started = time.monotonic()
    state = "unknown"
    tasks: list[TaskTiming] = []
    task_started: dict[str, float] = {}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, "dags", "test", dag_id],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                out.write(line)
                if m := _START.search(line):
                    task_started[m.group(1)] = time.monotonic()
                elif m := _END.search(line):
                    timing = TaskTiming(
                        m.group(1), time.monotonic() - task_started.get(m.group(1), started)
                    )
                    tasks.append(timing)
                    on_task(timing)
                elif m := _RUN_STATE.search(line):
                    state = m.group(1)
            code = process.wait()
        except BaseException:
            process.terminate()  # Ctrl-C: stop the run; every task is idempotent on re-run
            process.wait()
            raise
    result = DagTestResult(dag_id, state, time.monotonic() - started, log, tasks)
    if code != 0 or state != "success":
        failed = sorted({m.group(1) for m in _FAILED.finditer(log.read_text())})
        raise AirflowSetupError(
            f"DAG {dag_id} finished {state!r} (exit {code})"
            + (f", failed: {', '.join(failed)}" if failed else "")
            + f"; full log: {log}"
        )
    return result


if __name__ == "__main__":
    atexit.register(gc.freeze)  # registered first, so it runs last: after Airflow's own handlers
    from airflow.__main__ import main

    main()
