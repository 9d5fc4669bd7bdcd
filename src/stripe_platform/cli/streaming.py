"""`stream`: the real-time fraud path: the stream scorer and its status."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import sys
import threading
from typing import Annotated, Any, Literal

import typer

from stripe_platform.cli.common import command, console, err, group, settings

stream_app = group("Real time: the fraud stream scorer over the change stream, and its status.")

AsJson = Annotated[bool, typer.Option("--json", help="One JSON report on stdout")]


def _log_to_stderr() -> None:
    """The service's log (rejected changes, model switches, alerts) on stderr: the supervisor
    keeps it in <home>/stream/fraud/stream.log."""
    logger = logging.getLogger("stripe_platform")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _line(status: dict[str, Any]) -> str:
    latency = status.get("commit_to_score_ms") or {}
    p95 = latency.get("p95")
    lag = status.get("slot_lag_bytes")
    if lag is None:
        lag = status.get("consumer_lag_messages")
        lag_text = "-" if lag is None else f"{lag:,} messages"
    else:
        lag_text = f"{lag:,} bytes"
    skipped = sum((status.get("skipped") or {}).values())
    return (
        f"{status.get('state')}: scored {status.get('scored', 0):,}, flagged "
        f"{status.get('flagged', 0):,}, alerts {status.get('alerts', 0):,}, skipped {skipped:,}; "
        f"commit-to-score p95 {'-' if p95 is None else f'{p95:.1f} ms'}; lag {lag_text}"
    )


@command(stream_app, "fraud")
def stream_fraud(
    source: Annotated[
        Literal["embedded", "kafka"] | None,
        typer.Option(
            help="Where changes come from: the embedded cluster's replication slot or Debezium's "
            "topics on Kafka (default: the settings' stream source)"
        ),
    ] = None,
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="Stop once every committed change is scored")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Score every new or changed payment with the champion as it commits (FraudScoreEvent, the
    Transaction documents, alerts); runs until SIGTERM or Ctrl-C, which stop it cleanly."""
    from stripe_platform.streaming import scorer

    s = settings()
    if source is not None:
        s = s.model_copy(update={"stream_source": source})
    _log_to_stderr()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())  # the batch in hand finishes first
    shown = threading.Event()
    progress: threading.Thread | None = None
    if err.is_terminal and not as_json:

        def show() -> None:  # a live line from the status file the service writes
            with err.status("starting the fraud stream...") as live:
                while not shown.wait(1.0):
                    status = scorer.read_status(s)
                    if status is not None:
                        live.update(_line(status))

        progress = threading.Thread(target=show, name="stream-progress", daemon=True)
        progress.start()
    else:
        err.print(f"fraud stream: status in {scorer.status_path(s)}")
    try:
        summary = scorer.run(s, stop=stop, until_idle=until_idle)
    finally:
        shown.set()
        if progress is not None:
            progress.join(timeout=5)  # the live line ends before the summary is printed
    report = summary.as_dict()
    if as_json:
        console.print_json(data=report)
        return
    latency = report["commit_to_score_ms"]
    console.print(
        f"{report['state']}: {report['model_name']} version {report['model_version']} scored "
        f"{report['scored']:,} changes ({report['flagged']:,} flagged, {report['replayed']:,} "
        f"delivered again), {report['alerts']:,} alerts, skipped {report['skipped'] or 'none'}; "
        f"commit-to-score p50/p95/p99 {latency['p50']}/{latency['p95']}/{latency['p99']} ms over "
        f"{latency['count']:,}; position {report['position']}; {report['seconds']:.1f}s"
    )


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


@command(stream_app, "status")
def stream_status(as_json: AsJson = False) -> None:
    """The fraud stream's last status: state, model, position, lag, commit-to-score delay."""
    from stripe_platform.streaming import scorer

    s = settings()
    status = scorer.read_status(s)
    if status is None:
        raise scorer.StreamError(
            f"no fraud stream status under {s.home_dir}: the stream has not run there (start it "
            "with `stripe-platform stream fraud`)"
        )
    status["alive"] = _alive(status.get("pid"))
    try:
        beat = dt.datetime.fromisoformat(status["heartbeat_at"])
        status["heartbeat_age_seconds"] = round((dt.datetime.now(dt.UTC) - beat).total_seconds(), 3)
    except (KeyError, TypeError, ValueError):
        status["heartbeat_age_seconds"] = None
    if as_json:
        console.print_json(data=status)
        return
    model = status.get("model") or {}
    latency = status.get("commit_to_score_ms") or {}
    process = "running" if status["alive"] else "not running"
    console.print(
        f"fraud stream ({status.get('source')}): {status.get('state')}, process "
        f"{status.get('pid')} {process}, heartbeat {status['heartbeat_age_seconds']}s ago"
    )
    if status.get("error"):
        console.print(f"error: {status['error']}")
    if model:
        console.print(
            f"model: {model.get('name')} version {model.get('version')} (threshold "
            f"{model.get('threshold')})" + (f"; {model['error']}" if model.get("error") else "")
        )
    console.print(
        f"position {status.get('position')}; slot lag {status.get('slot_lag_bytes')} bytes; "
        f"consumer lag {status.get('consumer_lag_messages')} messages"
    )
    console.print(
        f"commit-to-score ms over the last {latency.get('count', 0):,}: p50 {latency.get('p50')}, "
        f"p95 {latency.get('p95')}, p99 {latency.get('p99')}, max {latency.get('max')}"
    )
    console.print(
        f"scored {status.get('scored', 0):,}, flagged {status.get('flagged', 0):,}, alerts "
        f"{status.get('alerts', 0):,}, skipped {status.get('skipped') or {}}, dead-lettered "
        f"{status.get('dead_lettered', 0):,}"
    )
    console.print(
        f"documents written {status.get('documents_written', 0):,}, without a document "
        f"{status.get('documents_missing', 0):,}"
        + (f"; {status['documents_error']}" if status.get("documents_error") else "")
    )


@command(stream_app, "start")
def stream_start(
    wait: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for it to run (0: return at once); a crash at start fails"
        ),
    ] = 120.0,
) -> None:
    """Start the fraud stream in the background (what the cdc_fraud_stream DAG does when none
    runs); its log is <home>/stream/fraud/stream.log."""
    from stripe_platform.streaming import supervisor

    s = settings()
    pid = supervisor.start(s)
    state = "started"
    if wait > 0:
        state = supervisor.wait_running(s, pid, wait).state or "started"
    console.print(f"fraud stream {state} (pid {pid}); log {supervisor.log_path(s)}")


@command(stream_app, "stop")
def stream_stop(
    timeout: Annotated[
        float, typer.Option(help="Seconds to let it finish its batch before SIGKILL")
    ] = 30.0,
) -> None:
    """Stop the background fraud stream: SIGTERM (it finishes its batch), SIGKILL after the
    timeout."""
    from stripe_platform.streaming import supervisor

    pid = supervisor.stop(settings(), timeout)
    console.print("no fraud stream running" if pid is None else f"fraud stream stopped (pid {pid})")
