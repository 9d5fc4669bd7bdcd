"""What the real-time benchmarks (api_bench.py, stream_bench.py) share: a platform home of their
own with seeded data and a champion trained by the platform's own commands, the commands run in
it, and latency percentiles.

A bench home is a temporary directory: `stripe-platform seed --scale S` fills its embedded
PostgreSQL and document server, `stripe-platform ml train` registers and promotes the first model
in its MLflow store (<home>/mlflow); `stripe-platform down` and the directory's removal end it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The small seed's last 90 days hold too few frauds to evaluate on; the ML tests use 180 too.
TEST_DAYS = 180


def percentiles(values_ms: list[float] | np.ndarray) -> dict[str, float | int | None]:
    """p50/p95/p99/max and the count of latencies in milliseconds (linear interpolation)."""
    values = np.asarray(values_ms, dtype=float)
    if values.size == 0:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "n": int(values.size),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class BenchHome:
    """A throwaway platform home (embedded profile) and the commands run in it."""

    def __init__(self, prefix: str, *, scale: float, seed: int = 7) -> None:
        self.scale, self.seed = scale, seed
        self.path = Path(tempfile.mkdtemp(prefix=f"stripe-platform-{prefix}-"))
        self.path.chmod(0o755)  # the cluster runs as an unprivileged OS user under root
        self.logs = self.path / "bench-logs"
        self.logs.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_PLATFORM_")}
        env.pop("MONGODB_URI", None)  # the embedded document server
        env.update(
            STRIPE_PLATFORM_HOME=str(self.path),
            STRIPE_PLATFORM_PROFILE="embedded",
            # another checkout's API may hold the default port: ours gets a free one
            STRIPE_PLATFORM_API_PORT=str(free_port()),
            NO_COLOR="1",
            COLUMNS="200",
        )
        self.env = env
        self.prepared: dict[str, Any] = {}

    # -- commands -----------------------------------------------------------------------------
    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "stripe_platform.cli", *args]

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """A platform command to its end; its output kept in the home's logs; fails loudly."""
        started = time.perf_counter()
        done = subprocess.run(
            self.command(*args),
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        name = "-".join(a.strip("-") for a in args[:2])
        (self.logs / f"{name}.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
        if done.returncode != 0:
            raise SystemExit(
                f"`stripe-platform {' '.join(args)}` failed ({done.returncode}) after "
                f"{time.perf_counter() - started:.1f} s:\n{done.stderr[-3000:]}"
            )
        return done

    def start(self, *args: str, log: str) -> subprocess.Popen:
        """A long-lived platform command (the API, the stream scorer), its output in a log."""
        sink = (self.logs / log).open("w")
        return subprocess.Popen(
            self.command(*args),
            env=self.env,
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def settings(self, **update: Any):
        from stripe_platform.config import load_settings

        s = load_settings(home=self.path, profile="embedded")
        return s.model_copy(update=update) if update else s

    # -- life ---------------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Seed the home at the scale and train the champion; what it took, for the JSON."""
        started = time.perf_counter()
        self.run("seed", "--scale", str(self.scale), "--seed", str(self.seed))
        seeded = time.perf_counter() - started
        started = time.perf_counter()
        done = self.run("ml", "train", "--test-days", str(TEST_DAYS), "--json")
        trained = time.perf_counter() - started
        report = json.loads(done.stdout)
        if not report.get("promoted"):
            raise SystemExit(f"the bench home's first model was not promoted: {report}")
        self.prepared = {
            "scale": self.scale,
            "seed_s": seeded,
            "train_s": trained,
            "model": {
                "name": report["model_name"],
                "version": report["version"],
                "feature_version": report["feature_version"],
                "average_precision": report["metrics"]["average_precision"],
                "train_rows": report["split"]["train_rows"],
            },
        }
        return self.prepared

    def close(self, keep: bool = False) -> None:
        subprocess.run(
            self.command("down"), env=self.env, capture_output=True, check=False, timeout=120
        )
        if keep:
            print(f"kept the bench home {self.path}", flush=True)
        else:
            shutil.rmtree(self.path, ignore_errors=True)


def stop(proc: subprocess.Popen | None, timeout: float = 30) -> int | None:
    """SIGTERM (the services stop cleanly on it), then SIGKILL if it does not end in time."""
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
