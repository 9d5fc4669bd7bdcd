"""Benchmark: what encryption at rest costs the spine, and how fast keys rotate (issue 20).

    uv run python bench/security_bench.py --scale 1 [--runs 1] [--output FILE]

Two fresh platform homes a run (two embedded clusters), identical but for
``STRIPE_PLATFORM_ENCRYPT_AT_REST``: ``on`` (the default: the catalog's protected document fields
and raw-layer fields encrypted on write, per data subject where the stream names one) and ``off``.
The OLTP's pgcrypto columns are encrypted in both (they were before this issue; their per-table
keys are what `keys rotate`/`keys reencrypt` act on). Each run, alternating off then on:
- the seed (`stripe-platform seed --scale S`, OLTP and documents), wall time of the command;
- a full-refresh sync of the four connections (PostgreSQL and documents to the lake, and to the
  DuckDB warehouse), each the engine's own time from `sync --json`.
Then, in the ``on`` home:
- `keys rewrap` (rotate every store's KEK and re-wrap every data key), its own time, 3 times;
- `keys rotate` of the three OLTP data-key scopes, then `keys reencrypt` (every encrypted column
  re-encrypted under the new versions in committed batches, then the old versions retired): rows/s.

Writes one JSON document (--output) and prints a summary. Goal: encryption on < 15 % slower than
off for the seed and for the full-refresh syncs; rewrap of every data key < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONNECTIONS = ("postgres-to-s3", "mongodb-to-s3", "postgres-to-snowflake", "mongodb-to-snowflake")
REENCRYPT_SCOPES = ("postgres/customer", "postgres/address", "postgres/paymentinstrument")
REWRAPS = 3
CLI = [sys.executable, "-m", "stripe_platform.cli"]


def cli(home: Path, encrypt: bool, *args: str) -> tuple[float, str]:
    env = dict(os.environ)
    env.update(
        STRIPE_PLATFORM_HOME=str(home),
        STRIPE_PLATFORM_ENCRYPT_AT_REST="true" if encrypt else "false",
        STRIPE_PLATFORM_PROFILE="embedded",
    )
    for name in ("STRIPE_PLATFORM_LAKE_URI", "STRIPE_PLATFORM_WAREHOUSE_PATH", "MONGODB_URI"):
        env.pop(name, None)  # each home keeps its own lake, warehouse and documents
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"stripe-platform {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def json_of(home: Path, encrypt: bool, *args: str) -> dict[str, Any]:
    return json.loads(cli(home, encrypt, *args, "--json")[1])


def one_run(work: Path, n: int, scale: float) -> tuple[dict[str, Any], Path]:
    """Both modes from fresh homes (a first sync is a full refresh); returns the run's figures
    and the ``on`` home, still up, for the rotation measures."""
    run: dict[str, Any] = {}
    for mode in ("off", "on"):
        home, encrypt = work / f"{mode}-{n}", mode == "on"
        cli(home, encrypt, "up")
        seed_s, _ = cli(home, encrypt, "seed", "--scale", str(scale))
        print(f"  {mode:<3} seed {seed_s:.1f} s", flush=True)
        syncs = {}
        for connection in CONNECTIONS:
            report = json_of(home, encrypt, "sync", connection)
            syncs[connection] = {"seconds": report["seconds"], "rows": report["rows"]}
            print(
                f"  {mode:<3} {connection:<22} {report['rows']:>10,} rows "
                f"{report['seconds']:6.1f} s",
                flush=True,
            )
        run[mode] = {"seed_s": seed_s, "syncs": syncs}
        if mode == "off":
            down(home)
            shutil.rmtree(home, ignore_errors=True)  # a home at scale 1 holds gigabytes
    return run, home


def down(home: Path) -> None:
    subprocess.run(
        [*CLI, "down"], env=dict(os.environ, STRIPE_PLATFORM_HOME=str(home)), capture_output=True
    )


def rotation(home: Path) -> dict[str, Any]:
    rewraps = []
    for _ in range(REWRAPS):
        report = json_of(home, True, "keys", "rewrap")
        rewraps.append({"seconds": report["seconds"], "count": report["count"]})
    for scope in REENCRYPT_SCOPES:
        cli(home, True, "keys", "rotate", scope)
    reencrypt = json_of(home, True, "keys", "reencrypt")
    return {"rewrap": rewraps, "reencrypt": reencrypt}


def summary(result: dict[str, Any]) -> list[str]:
    lines = []
    runs = result["runs"]

    def median(mode: str, key) -> float:
        return statistics.median(key(r[mode]) for r in runs)

    for label, key in [("seed", lambda m: m["seed_s"])] + [
        (c, lambda m, c=c: m["syncs"][c]["seconds"]) for c in CONNECTIONS
    ]:
        off, on = median("off", key), median("on", key)
        lines.append(
            f"{label:<22} off {off:7.1f} s  on {on:7.1f} s  {100 * (on / off - 1):+5.1f} %"
        )
    rewrap = statistics.median(r["seconds"] for r in result["rotation"]["rewrap"])
    count = result["rotation"]["rewrap"][0]["count"]
    lines.append(f"rewrap of {count} data keys: {rewrap:.3f} s (median of {REWRAPS})")
    re = result["rotation"]["reencrypt"]
    lines.append(
        f"re-encryption: {re['rows']:,} rows in {re['seconds']:.1f} s "
        f"({re['rows_per_second']:,.0f} rows/s)"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="security-bench-"))
    work.chmod(0o755)  # the embedded cluster runs as another OS user when we are root
    homes: list[Path] = []
    try:
        runs = []
        for n in range(args.runs):
            print(f"run {n + 1}/{args.runs} at scale {args.scale}", flush=True)
            run, on_home = one_run(work, n, args.scale)
            runs.append(run)
            homes.append(on_home)
            if n + 1 < args.runs:
                down(on_home)
                shutil.rmtree(on_home, ignore_errors=True)
        result = {
            "scale": args.scale,
            "runs": runs,
            "rotation": rotation(homes[-1]),
            "load_average_at_end": os.getloadavg(),
        }
    finally:
        for home in work.iterdir():
            down(home)
        shutil.rmtree(work, ignore_errors=True)
    for line in summary(result):
        print(line)
    if args.output:
        args.output.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
