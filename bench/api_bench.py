"""Benchmark: the fraud scoring API under a real load generator (locust), on loopback, over TLS.

    uv run python bench/api_bench.py [--scale 0.05] [--runs 1] [--rate 200] [--seconds 20]
        [--step-seconds 8] [--max-steps 6] [--budget 300] [--output FILE] [--keep-home]

In a platform home of its own (bench/realtime_setup.py: `seed --scale S`, `ml train`: a real
champion), `stripe-platform api` is started (uvicorn, TLS with the home's certificates, on a free
port of 127.0.0.1) and, once `GET /readyz` answers 200, locust (bench/locustfile_api.py, headless,
every latency recorded) offers a fixed load. The score requests carry a bearer token of the
fraud_service role (an access policy of the bench home's own, the token issued in its database),
so every one goes through the API's authentication and authorisation (api/auth.py):

1. `POST /v1/fraud/score` at --rate requests/s (200) for --seconds: p50/p95/p99 (goal p99 < 10 ms);
   then `GET /healthz` at the same rate for as long: the reference, the same server's HTTP + TLS
   floor (a route that does nothing). --runs repeats both, alternating.
2. The highest rate each kind holds, holding meaning p99 < 50 ms, at least 95% of the offered
   rate achieved and at most 0.1% failed requests: a kind that held the fixed rate in every run
   steps up (x1.5 a step) until a step does not hold (the last rate held before it), one that did
   not steps down (/1.5 a step) until one holds; at most --max-steps steps of --step-seconds each
   (longer at a low rate: at least 500 requests after the warm-up, or the p99 is the largest
   one or two), score then healthz at each step, and none once --budget seconds (from the start, setup
   included) would be overrun.

The first 2 s of each locust run are left out (connections opening). Each user runs at rate/U per
second with U = rate/4 users: a request may take 250 ms before the offered rate drops (a closed
loop beyond that: the achieved rate says so). locust shares the 2 cores with the server and
PostgreSQL: the CPU seconds of the server and of locust are kept for each run.

Prints a markdown table and writes JSON (default bench/results/api-<UTC time>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below
from realtime_setup import (
    BenchHome,
    load_average,
    percentiles,
    stop,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOCUSTFILE = HERE / "locustfile_api.py"
GOALS = {"p99_ms_at_rate": 10.0, "rate": 200.0, "held_p99_ms": 50.0}
HOLD_ACHIEVED = 0.95  # share of the offered rate that must be achieved
HOLD_FAILURES = 0.001  # share of requests that may fail
WARMUP_S = 2.0  # left out of each locust run: connections opening
PER_USER_RATE = 4.0  # requests/s of each locust user: 250 ms a request before the rate drops
STEP_FACTOR = 1.5
READY_TIMEOUT_S = 180.0
PAYLOADS = 2_000
MIN_SAMPLES = 500  # requests a step measures at least (a low rate's step lasts longer)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.05, help="the bench home's seed scale")
    parser.add_argument("--runs", type=int, default=1, help="runs of the fixed-rate measure")
    parser.add_argument("--rate", type=float, default=GOALS["rate"], help="requests/s offered")
    parser.add_argument("--seconds", type=float, default=20.0, help="each fixed-rate run")
    parser.add_argument("--step-seconds", type=float, default=8.0, help="each step-up run")
    parser.add_argument("--max-steps", type=int, default=6, help="step-up runs per kind at most")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for everything")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    parser.add_argument("--keep-home", action="store_true", help="keep the bench home (logs)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.max_steps < 0 or min(args.rate, args.seconds, args.scale) <= 0:
        parser.error("--runs >= 1, --max-steps >= 0, --rate, --seconds and --scale > 0")
    if args.seconds <= WARMUP_S or args.step_seconds <= WARMUP_S:
        parser.error(f"--seconds and --step-seconds must exceed the {WARMUP_S:g} s warm-up")
    return args


# The bench home's access policy: the machine client that scores (docs/access.md).
POLICY = """\
version: 1
roles:
  fraud_service:
    description: the load generator, a machine client of POST /v1/fraud/score
    api: [fraud.score]
users:
  bench-scorer:
    roles: [fraud_service]
    stores: [api]
"""


def scorer_token(home: BenchHome) -> Path:
    """The home's access policy (its settings point the API at it) and a bearer token of its
    scorer, issued in the home's database for a day; returns the file holding the secret (0600:
    not on locust's command line, where `ps` would show it)."""
    from stripe_platform.security import sessions

    policy = home.path / "access-policy.yaml"
    policy.write_text(POLICY)
    home.env["STRIPE_PLATFORM_ACCESS_POLICY"] = str(policy)
    _, secret = sessions.issue_token(
        home.settings(access_policy=policy),
        user="bench-scorer",
        roles=["fraud_service"],
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
        created_by="bench/api_bench.py",
    )
    path = home.logs / "scorer.token"
    path.touch(mode=0o600)
    path.write_text(secret)
    return path


# -- the load -----------------------------------------------------------------------------------
def request_bodies(settings, n: int = PAYLOADS) -> list[dict[str, Any]]:
    """Bodies for POST /v1/fraud/score: the home's latest payments as they would arrive now (new
    ids, the current time), so the API computes features against its live state."""
    from stripe_platform.oltp import db

    with db.connect(settings, autocommit=True) as conn:
        rows = conn.execute(
            """SELECT t.CustomerID, t.MerchantID, t.Amount::float8, c.Code, t.DeviceID,
                      t.IPAddress, place.CountryCode, billing.CountryCode
               FROM Transaction t
               JOIN Currency c ON c.ID = t.CurrencyID
               LEFT JOIN Location place ON place.ID = t.TransactionLocationID
               LEFT JOIN Address a ON a.ID = t.BillingAddressID
               LEFT JOIN Location billing ON billing.ID = a.LocationID
               ORDER BY t.DateTime DESC LIMIT %s""",
            (n,),
        ).fetchall()
    now = dt.datetime.now(dt.UTC).isoformat()
    return [
        score_body(i, now, customer, merchant, amount, currency, device, ip, country, billing)
        for i, (customer, merchant, amount, currency, device, ip, country, billing) in enumerate(
            rows
        )
    ]


def score_body(
    i: int,
    timestamp: str,
    customer: int,
    merchant: int,
    amount: float,
    currency: str,
    device: int | None,
    ip: str | None,
    country: str | None,
    billing: str | None,
) -> dict[str, Any]:
    """One request body in the API's schema (src/stripe_platform/api/models.py)."""
    body: dict[str, Any] = {
        "transaction_id": f"bench-{i}",
        "timestamp": timestamp,
        "customer_id": str(customer),
        "merchant_id": str(merchant),
        "amount": round(amount, 2),
        "currency": currency,
    }
    optional = {"device_id": device, "ip": ip, "country": country, "billing_country": billing}
    body.update({k: str(v) for k, v in optional.items() if v is not None})
    return body


def wait_ready(url: str, ca: Path, proc: subprocess.Popen, log: Path) -> float:
    """Seconds until GET /readyz answers 200 (the model loaded, the state warmed)."""
    import httpx

    started = time.perf_counter()
    with httpx.Client(verify=str(ca), timeout=5.0) as client:
        while time.perf_counter() - started < READY_TIMEOUT_S:
            if proc.poll() is not None:
                raise SystemExit(f"`stripe-platform api` exited ({proc.returncode}): {tail(log)}")
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
    raise SystemExit(f"`stripe-platform api` not ready in {READY_TIMEOUT_S:.0f} s: {tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children so far."""
    import psutil

    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += sum(child.cpu_times()[:2])
        return total
    except psutil.Error:
        return float("nan")


def locust(
    home: BenchHome,
    url: str,
    target: str,
    rate: float,
    seconds: float,
    payloads: Path,
    server_pid: int,
    token: Path,
) -> dict[str, Any]:
    """One headless locust run at a fixed offered rate; the latencies after the warm-up."""
    users = max(1, math.ceil(rate / PER_USER_RATE))
    samples = home.logs / f"samples-{target}-{rate:.0f}-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        *("-f", str(LOCUSTFILE), "--headless", "--only-summary"),
        *("--users", str(users), "--spawn-rate", str(users)),
        *("--run-time", f"{seconds:g}s", "--stop-timeout", "5"),
        *("--host", url, "--loglevel", "WARNING"),
        *("--bench-target", target, "--bench-rate", f"{rate:g}"),
        *("--bench-payloads", str(payloads), "--bench-ca", str(home.path / "tls" / "ca.crt")),
        *("--bench-samples", str(samples), "--bench-token-file", str(token)),
    ]
    server_cpu = cpu_seconds(server_pid)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=HERE, env=home.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    server_cpu = cpu_seconds(server_pid) - server_cpu
    (home.logs / f"locust-{target}-{rate:.0f}.log").write_text(output)
    try:
        raw = json.loads(samples.read_text())
    except (OSError, ValueError):
        raise SystemExit(
            f"locust wrote no samples ({proc.returncode}):\n{output[-3000:]}"
        ) from None
    if not raw:
        raise SystemExit(f"locust made no request ({proc.returncode}):\n{output[-3000:]}")
    first = min(s[0] for s in raw)
    kept = [s for s in raw if s[0] >= first + WARMUP_S]
    starts = [s[0] for s in kept]
    span = (max(starts) - min(starts)) if len(starts) > 1 else 0.0
    ok = [s[1] for s in kept if s[3] is None and 200 <= s[2] < 300]
    failed = [s for s in kept if s[3] is not None or not 200 <= s[2] < 300]
    achieved = (len(kept) - 1) / span if span > 0 else 0.0
    result = {
        "target": target,
        "offered_per_s": rate,
        "users": users,
        "seconds": seconds,
        "achieved_per_s": achieved,
        "requests": len(kept),
        "warmup_requests": len(raw) - len(kept),
        "failed": len(failed),
        "errors": sorted({str(s[3] or s[2]) for s in failed})[:5],
        # of the requests that succeeded (all of them when none did: a failure's time)
        "ms": percentiles(ok or [s[1] for s in kept]),
        "server_cpu_s": server_cpu,
        "locust_cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": wall,
        "locust_cpu_warning": "CPU usage above" in output,
        "locust_exit": proc.returncode,
    }
    result["holds"] = holds(result)
    print(
        f"{target} at {rate:g}/s: achieved {achieved:,.0f}/s, p50 {result['ms']['p50']:.2f} ms, "
        f"p95 {result['ms']['p95']:.2f} ms, p99 {result['ms']['p99']:.2f} ms, "
        f"{len(failed)} failed of {len(kept):,}; server CPU {server_cpu:.1f} s, locust CPU "
        f"{result['locust_cpu_s']:.1f} s{' (locust CPU-bound)' if result['locust_cpu_warning'] else ''}"
        f"; load {load_average()[0]}",
        flush=True,
    )
    return result


def step_seconds(minimum: float, rate: float) -> float:
    """A step long enough for MIN_SAMPLES requests after the warm-up: a p99 of fewer is its
    largest one or two."""
    return max(minimum, WARMUP_S + math.ceil(MIN_SAMPLES / max(rate, 1.0)))


def highest_held(fixed: list[dict[str, Any]], steps: list[dict[str, Any]]) -> float | None:
    """The highest offered rate held: stepping up from a fixed rate held in every run, the last
    rate held before the first that was not; stepping down, the first rate held (None: none)."""
    if all(r["holds"] for r in fixed):
        best = fixed[0]["offered_per_s"]
        for r in steps:
            if not r["holds"]:
                break
            best = r["offered_per_s"]
        return best
    return next((r["offered_per_s"] for r in steps if r["holds"]), None)


def holds(r: dict[str, Any]) -> bool:
    return (
        r["ms"]["p99"] is not None
        and r["ms"]["p99"] < GOALS["held_p99_ms"]
        and r["achieved_per_s"] >= HOLD_ACHIEVED * r["offered_per_s"]
        and r["failed"] <= HOLD_FAILURES * max(1, r["requests"])
    )


# -- the run ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begun = time.perf_counter()
    load_start = load_average()
    home = BenchHome("api-bench", scale=args.scale)
    api = None
    try:
        print(f"bench home {home.path}: seed --scale {args.scale}, ml train ...", flush=True)
        prepared = home.prepare()
        print(
            f"seeded in {prepared['seed_s']:.1f} s, trained {prepared['model']['name']} "
            f"v{prepared['model']['version']} in {prepared['train_s']:.1f} s",
            flush=True,
        )
        settings = home.settings()
        payloads = home.logs / "payloads.json"
        payloads.write_text(json.dumps(request_bodies(settings)))
        token = scorer_token(home)  # before the API starts: its environment names the policy
        api_log = home.logs / "api.log"
        api = home.start("api", log=api_log.name)
        url = f"https://127.0.0.1:{home.env['STRIPE_PLATFORM_API_PORT']}"
        ready_s = wait_ready(url, home.path / "tls" / "ca.crt", api, api_log)
        print(f"api ready at {url} after {ready_s:.1f} s", flush=True)

        def run(target: str, rate: float, seconds: float) -> dict[str, Any]:
            if api.poll() is not None:
                raise SystemExit(
                    f"`stripe-platform api` exited ({api.returncode}): {tail(api_log)}"
                )
            return locust(home, url, target, rate, seconds, payloads, api.pid, token)

        fixed: dict[str, list[dict[str, Any]]] = {"score": [], "healthz": []}
        for _ in range(args.runs):
            for target in ("score", "healthz"):
                fixed[target].append(run(target, args.rate, args.seconds))

        # A kind that held the fixed rate in every run steps up (x1.5) until a step does not
        # hold; one that did not steps down (/1.5) until a step holds: either way the highest
        # rate held is found within the steps, or said not found.
        steps: dict[str, list[dict[str, Any]]] = {"score": [], "healthz": []}
        factor = {
            t: STEP_FACTOR if all(r["holds"] for r in runs) else 1 / STEP_FACTOR
            for t, runs in fixed.items()
        }
        rates = {t: args.rate * f for t, f in factor.items()}
        going, stopped = {"score", "healthz"}, ""
        for _ in range(args.max_steps):
            if not going:
                break
            # locust's start and stop take about 8 s around each run
            cost = sum(step_seconds(args.step_seconds, rates[t]) + 8 for t in going)
            if time.perf_counter() - begun + cost > args.budget:
                stopped = f"the {args.budget:.0f} s budget"
                break
            for target in ("score", "healthz"):
                if target in going:
                    seconds = step_seconds(args.step_seconds, rates[target])
                    r = run(target, round(rates[target]), seconds)
                    steps[target].append(r)
                    if r["holds"] != (factor[target] > 1):  # the search for this kind is over
                        going.discard(target)
                    rates[target] *= factor[target]
        if not stopped:
            stopped = f"--max-steps {args.max_steps}" if going else "the search's end"
    finally:
        api_exit = stop(api)
        home.close(keep=args.keep_home)

    results = {
        "benchmark": "api",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "endpoint": "POST /v1/fraud/score (bearer token, scope fraud.score)",
        "reference": "GET /healthz (same server, same TLS)",
        "server": "stripe-platform api (uvicorn, TLS, 127.0.0.1)",
        "load_generator": f"locust {_version('locust')} (FastHttpUser, headless, one process)",
        "goals": GOALS,
        "hold": {
            "p99_ms": GOALS["held_p99_ms"],
            "achieved_share": HOLD_ACHIEVED,
            "failed_share": HOLD_FAILURES,
        },
        "seconds": args.seconds,
        "step_seconds": args.step_seconds,
        "min_samples": MIN_SAMPLES,
        "warmup_s": WARMUP_S,
        "per_user_rate": PER_USER_RATE,
        "home": prepared,
        "api_ready_s": ready_s,
        "api_exit": api_exit,
        "fixed": fixed,
        "steps": steps,
        "step_stopped_by": stopped,
        "highest_held": {target: highest_held(fixed[target], steps[target]) for target in fixed},
        "wall_s": time.perf_counter() - begun,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": load_start,
            "load_average_at_end": load_average(),
        },
    }
    out = args.output or RESULTS / f"api-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report_table(results))
    print(f"\nwritten {out}")
    return 0


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report_table(r: dict[str, Any]) -> str:
    def fmt(ms: dict[str, Any]) -> str:
        return f"{ms['p50']:.2f} / {ms['p95']:.2f} / {ms['p99']:.2f} ms"

    lines = [
        f"\n## scoring API at {r['goals']['rate']:g} requests/s ({r['load_generator']})\n",
        "| measure | p50 / p95 / p99 | achieved | failed |",
        "|---|---:|---:|---:|",
    ]
    for target in ("score", "healthz"):
        for x in r["fixed"][target]:
            lines.append(
                f"| {target} at {x['offered_per_s']:g}/s, {x['seconds']:g} s | {fmt(x['ms'])} | "
                f"{x['achieved_per_s']:,.0f}/s | {x['failed']} of {x['requests']:,} |"
            )
    for target in ("score", "healthz"):
        for x in r["steps"][target]:
            lines.append(
                f"| step: {target} at {x['offered_per_s']:g}/s | {fmt(x['ms'])} | "
                f"{x['achieved_per_s']:,.0f}/s | {x['failed']} of {x['requests']:,} "
                f"({'holds' if x['holds'] else 'does not hold'}) |"
            )
    held = r["highest_held"]
    lines.append(
        f"\nhighest rate held (p99 < {r['hold']['p99_ms']:g} ms): score {held['score']}, "
        f"healthz {held['healthz']} (stepping stopped by {r['step_stopped_by']})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
