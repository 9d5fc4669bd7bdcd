"""Locust load for api_bench.py: one request kind at a fixed offered rate, every latency kept.

    locust -f bench/locustfile_api.py --headless --users U --spawn-rate U --run-time 30s \
        --host https://127.0.0.1:PORT --bench-target score|healthz --bench-rate R \
        --bench-payloads FILE --bench-ca CA --bench-samples OUT --bench-token-file TOKEN

Each of the U users fires at R / U per second on a fixed grid, the users' grids interleaved, so the
offered load is R requests/s evenly spaced as long as a request takes less than U / R seconds
(api_bench.py gives each user 250 ms); a late request does not move the grid. ``score`` POSTs /v1/fraud/score with the payloads of the file in turn
(real payments of the bench home) with the bearer token of --bench-token-file (the API's
authentication and authorisation on every request), ``healthz`` GETs /healthz: the same server's
HTTP + TLS floor.
TLS is verified against the platform's CA. Every request's start time, latency (ms), status and
error go to --bench-samples as JSON when the test stops, so the percentiles are exact rather than
locust's rounded histogram.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import gevent
import gevent.ssl
from locust import FastHttpUser, events, task

SAMPLES: list[tuple[float, float, int, str | None]] = []


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--bench-target", choices=("score", "healthz"), default="score")
    parser.add_argument("--bench-rate", type=float, default=200.0, help="offered requests/s")
    parser.add_argument("--bench-payloads", default="", help="JSON list of request bodies")
    parser.add_argument("--bench-ca", default="", help="CA certificate to verify the server")
    parser.add_argument("--bench-samples", default="", help="where the latencies go")
    parser.add_argument("--bench-token-file", default="", help="a file holding the bearer token")


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception, **kw) -> None:
    response = kw.get("response")
    status = getattr(response, "status_code", 0) or 0
    SAMPLES.append(
        (
            kw.get("start_time") or 0.0,
            response_time,
            status,
            None if exception is None else repr(exception)[:200],
        )
    )


@events.test_stop.add_listener
def _write(environment, **kw) -> None:
    out = environment.parsed_options.bench_samples
    if out:
        Path(out).write_text(json.dumps(SAMPLES))


class ApiUser(FastHttpUser):
    def __init__(self, environment) -> None:
        options = environment.parsed_options
        ca = options.bench_ca
        if ca:
            type(self).insecure = False
            type(self).ssl_context_factory = staticmethod(
                lambda **kw: gevent.ssl.create_default_context(cafile=ca)
            )
        super().__init__(environment)
        users = max(1, options.num_users or 1)
        self._period = users / options.bench_rate
        # User k fires at anchor + (k/U + i) * period: together, requests evenly spaced at the
        # offered rate. (locust's constant_throughput paces each user from its own last request:
        # users drift into bursts of U requests under a busy scheduler.)
        self._phase = next(_STARTED) % users / users * self._period
        self._next = 0.0
        self.target = options.bench_target
        if self.target == "score":
            self.payloads = _payloads(options.bench_payloads)
            token = Path(options.bench_token_file).read_text().strip()
            self.headers = {"Authorization": f"Bearer {token}"}

    def on_start(self) -> None:
        now = time.perf_counter()
        anchor = _ANCHOR.setdefault("t", now) + self._phase
        self._next = anchor + max(0, math.ceil((now - anchor) / self._period)) * self._period
        gevent.sleep(max(0.0, self._next - now))

    def wait_time(self) -> float:
        # A late request does not move the grid: the next ones catch up (an open load).
        self._next += self._period
        return max(0.0, self._next - time.perf_counter())

    @task
    def request(self) -> None:
        if self.target == "score":
            self.client.post(
                "/v1/fraud/score", json=next(self.payloads), headers=self.headers, name="score"
            )
        else:
            self.client.get("/healthz", name="healthz")


_STARTED = itertools.count()
_ANCHOR: dict[str, float] = {}
_CYCLES: dict[str, itertools.cycle] = {}


def _payloads(path: str) -> itertools.cycle:
    """One cycle over the file's bodies shared by every user (each body in turn)."""
    if path not in _CYCLES:
        _CYCLES[path] = itertools.cycle(json.loads(Path(path).read_text()))
    return _CYCLES[path]
