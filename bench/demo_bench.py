"""Benchmark: `make demo` end to end, and its stage split, first run and incremental re-run.

    uv run python bench/demo_bench.py --scale 0.05 [--runs 3] [--warmup 1] [--output FILE]

Each run starts from a fresh, empty STRIPE_PLATFORM_HOME (a temporary directory, removed after):
`stripe-platform demo --scale S` (the first run: runtime up, the brief's statements, seed, Airflow
runs the ELT DAGs, the brief's queries), then the same command again (the incremental re-run: an
hour of activity appended, incremental syncs and builds). Wall time is that of the whole process,
as a user waits for it (Python and imports included; `make`'s bootstrap is not). The stage split
is parsed from the `done:` line the demo prints (whole seconds). --warmup runs (one by default)
come first and are left out of the figures (kept in the JSON as `warmup`): they warm the machine
(the operating system's file cache of the virtualenv, dbt's and Airflow's first parses), while
every measured run still starts from a fresh, empty home as a first `make demo` does. The
embedded PostgreSQL cluster of each temporary home is stopped at the end of its run.

Prints a markdown table and writes JSON (default bench/results/demo-<UTC time>.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DONE = re.compile(r"done:\s*(.*)$")
STAGE = re.compile(r"\s*(.+?)\s+(\d+(?:\.\d+)?)s\s*$")


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def parse_done(output: str) -> dict[str, float]:
    """`done: runtime 1s, brief statements 3s, ...` -> {"runtime": 1.0, ...} (last such line)."""
    stages: dict[str, float] = {}
    for line in output.splitlines():
        found = DONE.search(line)
        if found:
            stages = {}
            for part in found.group(1).split(","):
                item = STAGE.match(part)
                if item:
                    stages[item.group(1).strip()] = float(item.group(2))
    return stages


def demo_once(env: dict[str, str], scale: float, log: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", "demo", "--scale", str(scale)],
        env={**env, "COLUMNS": "200", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        sys.exit(f"demo --scale {scale} failed (log {log}):\n{done.stderr[-3000:]}")
    return {"wall_s": wall, "stages_s": parse_done(done.stdout)}


def one_run(scale: float, number: int, logs: Path, kind: str = "run") -> dict:
    home = Path(tempfile.mkdtemp(prefix="stripe-platform-demo-bench-"))
    home.chmod(0o755)  # the cluster runs as an unprivileged OS user under root
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_PLATFORM_")}
    env["STRIPE_PLATFORM_HOME"] = str(home)
    env.pop("MONGODB_URI", None)  # the embedded profile: the document stand-in
    try:
        first = demo_once(env, scale, logs / f"demo-{kind}-{number}-first.log")
        print(
            f"{kind} {number + 1}: first demo {first['wall_s']:.1f}s {first['stages_s']}",
            flush=True,
        )
        again = demo_once(env, scale, logs / f"demo-{kind}-{number}-incremental.log")
        print(f"{kind} {number + 1}: re-run {again['wall_s']:.1f}s {again['stages_s']}", flush=True)
        return {"first": first, "incremental": again}
    finally:
        subprocess.run(
            [sys.executable, "-m", "stripe_platform.cli", "down"],
            env=env,
            capture_output=True,
            check=False,
        )
        shutil.rmtree(home, ignore_errors=True)


def summarise(runs: list[dict], which: str) -> dict:
    stages: dict[str, list[float]] = {}
    for run in runs:
        for name, seconds in run[which]["stages_s"].items():
            stages.setdefault(name, []).append(seconds)
    return {
        "wall_s": spread([r[which]["wall_s"] for r in runs]),
        "stages_s": {name: spread(values) for name, values in stages.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="runs first, left out of the figures")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")

    out = args.output or RESULTS / f"demo-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="demo-bench-logs-"))
    warmup = [one_run(args.scale, n, logs, "warm-up") for n in range(args.warmup)]
    runs = [one_run(args.scale, n, logs) for n in range(args.runs)]
    results = {
        "benchmark": "demo",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scale": args.scale,
        "warmup": warmup,
        "runs": runs,
        "first": summarise(runs, "first"),
        "incremental": summarise(runs, "incremental"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    out.write_text(json.dumps(results, indent=2))
    shutil.rmtree(logs, ignore_errors=True)

    print(
        f"\n## `stripe-platform demo --scale {args.scale}` ({args.runs} run(s) after "
        f"{args.warmup} warm-up, fresh home each)\n"
    )
    print("| what | first run s (min, max) | re-run s (min, max) |\n|---|---:|---:|")

    def cell(s: dict | None) -> str:
        return f"{s['median']:.0f} ({s['min']:.0f}, {s['max']:.0f})" if s else "—"

    first, again = results["first"], results["incremental"]
    print(f"| **end to end, wall** | {cell(first['wall_s'])} | {cell(again['wall_s'])} |")
    for name in dict.fromkeys([*first["stages_s"], *again["stages_s"]]):
        print(
            f"| stage {name} | {cell(first['stages_s'].get(name))} | "
            f"{cell(again['stages_s'].get(name))} |"
        )
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
