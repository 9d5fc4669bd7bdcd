"""`audit rules`: the Sigma-style detection rules over the Log collection (issue 22, "Watch";
engine audit/detect.py, rules and their format in audit/rules/)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from stripe_platform.cli.audit import audit_app
from stripe_platform.cli.common import command, console, err, group, settings
from stripe_platform.errors import PlatformError

rules_app = group("Detection rules over the audit trail's Log documents: list, run, evaluate.")
audit_app.add_typer(rules_app, name="rules")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]
RulesOption = Annotated[
    Path | None,
    typer.Option("--rules", help="A rule file or directory (default: the packaged rules)"),
]
_SPAN = re.compile(r"^(\d+)([mhd])$")


class SpanError(PlatformError, ValueError):
    pass


def _span(text: str) -> dt.timedelta:
    match = _SPAN.match(text.strip())
    if not match or int(match.group(1)) < 1:
        raise SpanError(f"--since {text!r}: a number and a unit m, h or d (e.g. 1h, 30m, 2d)")
    unit = {"m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return dt.timedelta(**{unit: int(match.group(1))})


def _finding_dict(finding: Any) -> dict[str, Any]:
    data = asdict(finding)
    data["at"] = finding.at.isoformat()
    data["evidence"] = list(finding.evidence)
    return data


@command(rules_app, "list")
def rules_list(rules: RulesOption = None, as_json: JsonOption = False) -> None:
    """The rules: name, level, what they look for, how they aggregate."""
    from stripe_platform.audit.detect import EventCount, ValueSumBaseline, load_rules

    loaded = load_rules(rules)

    def aggregation(rule: Any) -> str:
        corr = rule.correlation
        if isinstance(corr, EventCount):
            return f">= {corr.minimum} per {','.join(corr.group_by)} within {corr.timespan}"
        if isinstance(corr, ValueSumBaseline):
            return (
                f"daily {corr.field} per {','.join(corr.group_by)}: z >= {corr.zscore} over "
                f"{corr.days} days, >= {corr.min_value:g}"
            )
        return "each event (one finding per user and day)"

    if as_json:
        console.print_json(
            data=[
                {
                    "name": r.name,
                    "id": r.id,
                    "title": r.title,
                    "level": r.level,
                    "status": r.status,
                    "condition": r.condition,
                    "aggregation": aggregation(r),
                    "file": str(r.path),
                }
                for r in loaded
            ]
        )
        return
    table = Table("rule", "level", "title", "condition", "aggregation")
    for r in loaded:
        table.add_row(r.name, r.level, r.title, r.condition, aggregation(r))
    console.print(table)


@command(rules_app, "run")
def rules_run(
    since: Annotated[str, typer.Option("--since", help="The window looked at: 30m, 1h, 2d")] = "1h",
    rules: RulesOption = None,
    no_incidents: Annotated[
        bool, typer.Option("--no-incidents", help="Only print the findings")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Run the rules over the Log collection's last --since (with the 15 days before as the
    baselines' history) and raise the findings as incidents (audit/incidents.py)."""
    from stripe_platform.audit.detect import detect, load_context, load_rules
    from stripe_platform.docstore import client as docstore

    s = settings()
    loaded = load_rules(rules)
    now = dt.datetime.now(dt.UTC)
    start = now - _span(since)
    bursts, baselines = history_spans(loaded)
    logs = docstore.connect(s)["Log"]
    docs = list(logs.find({"lines.timestamp": {"$gte": start}}))
    # Minutes before the window: every document (a burst cut by the window's start); days before:
    # only those reporting rows (what the baselines sum), not every statement of two weeks.
    history = list(logs.find({"lines.timestamp": {"$gte": start - bursts, "$lt": start}}))
    if baselines > bursts:
        history += logs.find(
            {
                "lines.timestamp": {"$gte": start - baselines, "$lt": start - bursts},
                "lines.message": {"$regex": "rows: [0-9]"},
            }
        )
    context = load_context(s)
    for note in context.notes:
        err.print(f"warning: {note}")
    findings = detect(s, docs, now=now, history=history, rules=loaded, context=context)
    incidents = None
    if findings and not no_incidents:
        try:
            from stripe_platform.audit.incidents import raise_findings
        except ImportError:
            err.print("warning: audit/incidents.py is not there: findings printed, not raised")
        else:
            incidents = raise_findings(s, findings)
    if as_json:
        console.print_json(
            data={
                "window": {"from": start.isoformat(), "to": now.isoformat()},
                "documents": len(docs),
                "history_documents": len(history),
                "findings": [_finding_dict(f) for f in findings],
                "incidents": None if incidents is None else len(incidents),
                "notes": list(context.notes),
            },
            default=str,
        )
        return
    table = Table("at", "rule", "severity", "user", "source", "records", "dedup key")
    for f in findings:
        table.add_row(
            f.at.isoformat(timespec="seconds"),
            f.rule,
            f.severity,
            f.user or "",
            f.source or "",
            str(len(f.evidence)),
            f.dedup_key,
        )
    console.print(table)
    raised = "" if incidents is None else f", {len(incidents)} incidents raised or updated"
    console.print(
        f"{len(docs)} Log documents since {start.isoformat()}: {len(findings)} findings{raised}"
    )


def history_spans(rules: Any) -> tuple[dt.timedelta, dt.timedelta]:
    """How far before the window the rules need documents: (bursts' longest timespan, baselines'
    longest history)."""
    from stripe_platform.audit.detect import EventCount, ValueSumBaseline

    bursts = baselines = dt.timedelta(0)
    for rule in rules:
        if isinstance(rule.correlation, ValueSumBaseline):
            baselines = max(baselines, dt.timedelta(days=rule.correlation.days + 1))
        elif isinstance(rule.correlation, EventCount):
            bursts = max(bursts, rule.correlation.timespan)
    return bursts, baselines


@command(rules_app, "evaluate")
def rules_evaluate(
    scale: Annotated[float, typer.Option("--scale", help="Seed scale of the generated logs")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated logs")] = 42,
    from_store: Annotated[
        bool,
        typer.Option("--from-store", help="Read the seeded Log collection instead of generating"),
    ] = False,
    test_days: Annotated[
        int | None,
        typer.Option(
            "--test-days",
            min=1,
            help="Score only the last N days (the earlier ones are the baselines' history): the "
            "time split the log model is held to",
        ),
    ] = None,
    rules: RulesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Precision and recall of the rules on the seed's planted log anomalies (docs/seed.md), per
    rule and overall, and the false alerts per day of normal activity."""
    from stripe_platform.audit.detect import evaluate_labelled, load_rules

    s = settings()
    loaded = load_rules(rules)
    if from_store:
        from stripe_platform.docstore import client as docstore

        docs = list(docstore.connect(s)["Log"].find({"isAnomaly": {"$exists": True}}))
        if not docs:
            raise SpanError("the Log collection holds no seeded (labelled) documents: run `seed`")
    else:
        import numpy as np

        from stripe_platform.seed.logs import log_documents
        from stripe_platform.seed.spec import SeedSpec

        spec = SeedSpec(scale=scale, seed=seed)
        docs = list(log_documents(spec, np.random.default_rng([spec.seed, 6])))
    report = evaluate_labelled(s, docs, test_days=test_days, rules=loaded)
    if as_json:
        console.print_json(data=report)
        return
    table = Table("rule", "findings", "flagged", "true pos.", "precision", "recall", "labels")
    for name, r in report["rules"].items():
        table.add_row(
            name,
            str(r["findings"]),
            str(r["flagged"]),
            str(r["true_positives"]),
            _fmt(r["precision"]),
            _fmt(r["recall"]),
            ",".join(r["labels"]) or "-",
        )
    o = report["overall"]
    table.add_row(
        "ALL", str(o["findings"]), str(o["flagged"]), str(o["true_positives"]),
        _fmt(o["precision"]), _fmt(o["recall"]), "every planted anomaly",
    )  # fmt: skip
    console.print(table)
    fa = report["false_alerts"]
    console.print(
        f"{report['documents']} Log documents over {report['days']} days; recall by type: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in report["recall_by_type"].items())
        + f"; false alerts: {fa['total']} ({fa['per_day']} a day, at most {fa['max_in_a_day']})"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
