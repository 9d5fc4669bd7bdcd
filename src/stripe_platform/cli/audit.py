"""`audit`: the audit trail (issue 22, docs/audit.md): collect, verify, retention, rules, model.

This module holds the group and the trail's own commands (verify, checkpoint, retention,
export-lake); cli/audit_collect.py, cli/audit_rules.py and cli/audit_model.py register theirs on
`audit_app`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.cli.common import command, console, err, group, settings

audit_app = group(
    "The audit trail: collect the logs, verify the hash chain, retention, detection rules, the "
    "log anomaly model."
)

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]


@command(audit_app, "verify")
def audit_verify(
    stream: Annotated[
        str | None, typer.Option("--stream", help="Only this stream (default: all)")
    ] = None,
    lake: Annotated[
        bool,
        typer.Option("--lake", help="Also hold each stream to the lake's copy (its last record)"),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Prove the trail intact (hashes, order, signed checkpoints); exit 1 naming the first bad
    record, and raise an incident, if anything was altered, deleted, reordered or truncated."""
    from stripe_platform.audit import trail

    s = settings()
    report = trail.verify(s, stream=stream, lake=lake)
    incidents = None if report.ok else trail.raise_incident(s, report)
    if as_json:
        data = report.as_dict()
        data["incidents"] = None if incidents is None else [_plain(i) for i in incidents]
        console.print_json(data=data, default=str)
    else:
        table = Table("stream", "records", "seqs", "checkpoints", "anchored at", "result")
        for r in report.streams:
            seqs = "" if r.first_seq is None else f"{r.first_seq}..{r.last_seq}"
            result = "ok" if r.problem is None else f"{r.problem.why} at seq {r.problem.seq}"
            table.add_row(
                r.stream, str(r.records), seqs, str(r.checkpoints), str(r.anchored_at), result
            )
        console.print(table)
        console.print(
            f"{report.records} records, {report.checkpoints} checkpoints in {report.seconds} s"
        )
    if not report.ok:
        bad = report.first_bad
        err.print(
            f"audit trail NOT intact: stream {bad.stream}, seq {bad.seq}: {bad.why}: {bad.detail}"
        )
        if incidents is None:
            err.print("(no incident raised: the incidents module is not available)")
        raise typer.Exit(1)


def _plain(value):
    try:
        return asdict(value)
    except TypeError:
        return value if isinstance(value, (dict, str, int)) else str(value)


@command(audit_app, "checkpoint")
def audit_checkpoint(
    stream: Annotated[str | None, typer.Option("--stream", help="Only this stream")] = None,
    as_json: JsonOption = False,
) -> None:
    """Sign a checkpoint at the head of each stream that moved since its last one."""
    from stripe_platform.audit import trail

    made = trail.checkpoint(settings(), stream=stream)
    if as_json:
        console.print_json(data=[asdict(c) for c in made], default=str)
        return
    for c in made:
        console.print(f"{c.stream}: seq {c.seq} signed ({c.key_id}) {c.hash[:16]}...")
    if not made:
        console.print("no stream moved since its last checkpoint")


@command(audit_app, "retention")
def audit_retention(as_json: JsonOption = False) -> None:
    """Export to the lake, then remove what is past retention: records older than audit_hot_days
    from PostgreSQL (already in the lake), lake days older than audit_retention_days. The run is
    recorded on the trail's "audit" stream."""
    from stripe_platform.audit import trail

    result = trail.apply_retention(settings(), dt.datetime.now(dt.UTC))
    if as_json:
        console.print_json(data=result.as_dict(), default=str)
        return
    console.print(
        f"exported {result.exported.records} records in {len(result.exported.files)} files to "
        f"{result.exported.root}"
    )
    for cut in result.cuts:
        console.print(
            f"{cut.stream}: removed {cut.removed} records through seq {cut.through_seq} "
            f"(older than {cut.cutoff:%Y-%m-%d})"
        )
    console.print(f"lake days removed: {len(result.lake_removed)}")


@command(audit_app, "export-lake")
def audit_export_lake(as_json: JsonOption = False) -> None:
    """Copy the records not yet in the lake there (parquet per stream per day)."""
    from stripe_platform.audit import trail

    result = trail.export_lake(settings())
    if as_json:
        console.print_json(data=asdict(result))
        return
    console.print(
        f"exported {result.records} records in {len(result.files)} files to {result.root}"
    )
