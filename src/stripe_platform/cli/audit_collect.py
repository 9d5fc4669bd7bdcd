"""`audit collect`: ship PostgreSQL's jsonlog and the API's access log into the Log collection, the
audit trail and the lake (audit/collector.py, docs/audit.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from stripe_platform.cli.audit import audit_app
from stripe_platform.cli.common import command, console, err, settings
from stripe_platform.errors import PlatformError


class CollectOptionError(PlatformError, ValueError):
    """A --log-dir that is not SOURCE=DIRECTORY."""


def _log_sources(s, given: list[str] | None):
    from stripe_platform.audit import collector

    if not given:
        return None
    chosen = []
    defaults = {src.name: src for src in collector.sources(s)}
    for item in given:
        name, sep, directory = item.partition("=")
        if not sep or name not in collector.SOURCES or not directory:
            raise CollectOptionError(
                f"--log-dir {item!r}: expected SOURCE=DIRECTORY with SOURCE one of "
                f"{', '.join(collector.SOURCES)}"
            )
        pattern = (
            defaults[name].pattern
            if name in defaults
            else ("postgresql-*.json" if name == "postgres" else "api-*.jsonl")
        )
        chosen.append(collector.LogSource(name, Path(directory), pattern))
    return chosen


@command(audit_app, "collect")
def audit_collect(
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep collecting, a pass every --interval seconds")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between passes with --follow")
    ] = 5.0,
    batch_lines: Annotated[
        int, typer.Option("--batch-lines", min=1, help="Lines per transaction")
    ] = 5000,
    log_dir: Annotated[
        list[str] | None,
        typer.Option(
            "--log-dir",
            help="SOURCE=DIRECTORY: read these logs instead of this host's (archived logs); "
            "repeatable",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout (a line a pass)")] = False,
) -> None:
    """Collect the new lines of PostgreSQL's jsonlog and the API's access log since the last run:
    into the Log collection (one document per session/query), the audit trail and the lake,
    secrets redacted; bad lines quarantined. Progress and counts: lines read, documents written,
    quarantined, bytes/s."""
    from stripe_platform.audit import collector

    s = settings()
    chosen = _log_sources(s, log_dir)

    def report(result: collector.CollectResult) -> None:
        if as_json:
            console.print(json.dumps(result.as_dict()), soft_wrap=True)
            return
        for note in result.notes:
            err.print(f"note: {note}")
        q = result.quarantined
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(q.items()))
        console.print(
            f"{result.lines_read} lines read ({result.bytes_read} bytes, "
            f"{result.bytes_per_second / 1e6:.2f} MB/s, {result.lines_per_second:.0f} lines/s), "
            f"{result.documents_written} Log documents written, {result.trail_records} trail "
            f"records, {result.lake_files} lake files, {sum(q.values())} quarantined"
            + (f" ({detail})" if detail else "")
            + f" in {result.seconds:.2f} s"
        )

    collector.collect(
        s,
        until_idle=not follow,
        interval=interval,
        log_sources=chosen,
        batch_lines=batch_lines,
        on_pass=report,
    )
    if follow and not as_json:
        err.print("stopped")
