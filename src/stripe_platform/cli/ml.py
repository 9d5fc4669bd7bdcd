"""`ml`: the fraud model: train (with the promotion gate) and evaluate beside the rules baseline."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from stripe_platform.cli.common import command, console, err, group, settings

if TYPE_CHECKING:
    from stripe_platform.ml.split import SplitSpec

ml_app = group("Machine learning: the fraud model's training, evaluation and registry.")

# The options every command that reads a split shares (ml train, ml evaluate).
TransactionsFile = Annotated[
    Path | None,
    typer.Option(
        "--transactions",
        help="A labelled parquet file (the contract in docs/ml.md) instead of the platform's data",
        dir_okay=False,
    ),
]
TrainStart = Annotated[
    str | None,
    typer.Option(help="First day of training, YYYY-MM-DD (default: as far back as the data goes)"),
]
TrainDays = Annotated[
    int | None,
    typer.Option(min=1, help="Days of training (default: from --train-start up to the gap)"),
]
GapDays = Annotated[
    int,
    typer.Option(min=0, help="Days between training and test: labels arrive late (label delay)"),
]
TestDays = Annotated[int, typer.Option(min=1, help="Days of the held-back test period")]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON report on stdout")]


def split_spec(
    train_start: str | None, train_days: int | None, gap_days: int, test_days: int
) -> SplitSpec:
    from stripe_platform.ml.split import SplitSpec

    start = None
    if train_start is not None:
        try:
            start = dt.date.fromisoformat(train_start)
        except ValueError:
            raise typer.BadParameter(
                f"--train-start {train_start!r}: expected YYYY-MM-DD"
            ) from None
    return SplitSpec(
        train_start=start, train_days=train_days, gap_days=gap_days, test_days=test_days
    )


def _metrics_line(name: str, metrics: dict[str, Any]) -> str:
    return (
        f"{name:<10} AP {metrics['average_precision']:.4f}  ROC AUC {metrics['roc_auc']:.4f}  "
        f"recall@1%FPR {metrics['recall_at_1pct_fpr']:.4f}  "
        f"precision/recall@budget {metrics['budget_precision']:.4f}/{metrics['budget_recall']:.4f}"
        f"  card precision@{metrics['card_precision_k']} {metrics['card_precision_at_k']:.4f}"
    )


def _show_split(report: dict[str, Any]) -> None:
    split = report["split"]
    console.print(
        f"data: {escape(report['source'])} ({report['rows']:,} transactions)\n"
        f"train {split['train_start']} .. {split['train_end']} "
        f"({split['train_rows']:,} rows, {split['train_positives']:,} frauds), "
        f"gap {split['gap_days']} d, "
        f"test {split['test_start']} .. {split['test_end']} "
        f"({split['test_rows']:,} rows, {split['test_positives']:,} frauds)"
    )


@command(ml_app, "train")
def ml_train(
    transactions: TransactionsFile = None,
    train_start: TrainStart = None,
    train_days: TrainDays = None,
    gap_days: GapDays = 7,
    test_days: TestDays = 90,
    as_json: AsJson = False,
) -> None:
    """Train the fraud model, log and register it in MLflow, and move the `champion` alias to it
    only if it beats the current champion on the same held-back test period."""
    from stripe_platform.ml.train import train_fraud

    spec = split_spec(train_start, train_days, gap_days, test_days)
    if not as_json:
        err.print("training the fraud model...")
    result = train_fraud(settings(), transactions=transactions, split=spec)
    report = result.as_dict()
    if as_json:
        console.print_json(data=report)
        return
    for note in report["notes"]:
        console.print(f"note: {escape(note)}")
    _show_split(report)
    console.print(_metrics_line("candidate", report["metrics"]))
    champion, mine = report["champion_metrics"], report["gate_metrics"]
    if champion is not None and champion["transactions"] == report["metrics"]["transactions"]:
        console.print(_metrics_line("champion", champion))
    elif champion is not None:
        # The gate compared on the test payments the champion did not train on (a note says).
        console.print(f"the gate's {champion['transactions']:,} payments:")
        console.print(_metrics_line("candidate", mine))
        console.print(_metrics_line("champion", champion))
    console.print(_metrics_line("rules", report["rules_metrics"]))
    console.print(
        f"registered {escape(report['model_name'])} version {report['version']} "
        f"(run {report['run_id']}, {report['seconds']:.1f}s)"
    )
    verdict = "promoted to champion" if report["promoted"] else "not promoted"
    console.print(f"{verdict}: {escape(report['gate_reason'])}")


@command(ml_app, "evaluate")
def ml_evaluate(
    transactions: TransactionsFile = None,
    train_start: TrainStart = None,
    train_days: TrainDays = None,
    gap_days: GapDays = 7,
    test_days: TestDays = 90,
    as_json: AsJson = False,
) -> None:
    """Evaluate the champion beside the rules baseline on the split's test period."""
    from stripe_platform.ml.train import evaluate_champion

    spec = split_spec(train_start, train_days, gap_days, test_days)
    report = evaluate_champion(settings(), transactions=transactions, split=spec).as_dict()
    if as_json:
        console.print_json(data=report)
        return
    for note in report["notes"]:
        console.print(f"note: {escape(note)}")
    _show_split(report)
    console.print(_metrics_line("model", report["metrics"]))
    console.print(_metrics_line("rules", report["rules_metrics"]))
    console.print(
        f"model: {escape(report['model_name'])} version {report['version']} (champion); "
        f"average precision {report['ap_ratio']:.2f}x the rules'"
    )


@command(ml_app, "score")
def ml_score(
    transactions: Annotated[
        Path | None,
        typer.Option(
            "--transactions",
            help="A parquet file to score (the contract in docs/ml.md, label optional) instead "
            "of the platform's payments",
            dir_okay=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Where to write the file's scores (parquet); with --transactions only"),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Score with the champion: the platform's payments not scored yet (FraudScore and the
    Transaction documents' AnomalyScore/isFraud; a re-run writes nothing twice), or a file."""
    from stripe_platform.ml.score import score_file, score_platform

    if (transactions is None) != (output is None):
        raise typer.BadParameter("--transactions and --output go together")
    if transactions is not None and output is not None:
        report: Any = score_file(settings(), transactions, output)
        summary = (
            f"scored {report.rows:,} payments of {escape(report.source)} with "
            f"{escape(report.model_name)} version {report.model_version}: "
            f"{report.flagged:,} flagged (score >= {report.threshold:g}) -> {escape(report.output)}"
        )
    else:
        report = score_platform(settings())
        summary = (
            f"{escape(report.model_name)} version {report.model_version}: scored "
            f"{report.scored:,} payments ({report.flagged:,} flagged, score >= "
            f"{report.threshold:g}; {report.already_scored:,} scored before), "
            f"{report.documents_updated:,} Transaction documents updated "
            f"({report.documents_missing:,} payments have none), {report.seconds_total:.1f}s"
        )
    if as_json:
        console.print_json(data=report.as_dict())
        return
    for note in getattr(report, "notes", []):
        console.print(f"note: {escape(note)}")
    console.print(summary)


@command(ml_app, "drift")
def ml_drift(
    window_days: Annotated[
        int, typer.Option(min=1, help="Days of the latest payments compared with the training")
    ] = 7,
    as_json: AsJson = False,
) -> None:
    """Compare the latest window of payments' features with the champion's training payments
    (Evidently): an HTML report and a JSON verdict under the platform home."""
    from stripe_platform.ml.drift import check_platform_drift

    verdict = check_platform_drift(settings(), window_days=window_days)
    if as_json:
        console.print_json(data=verdict.as_dict())
        return
    console.print(verdict.summary())
    if verdict.drifted_features:
        console.print(f"drifted: {', '.join(verdict.drifted_features)}")
    console.print(f"report: {verdict.html_path}\nverdict: {verdict.json_path}")


@command(ml_app, "manifests")
def ml_manifests(
    values: Annotated[
        list[str] | None,
        typer.Option("--set", help="name=value over deploy/k8s/values.yaml (repeatable)"),
    ] = None,
) -> None:
    """Print the training Job's Kubernetes manifests (deploy/k8s), for `kubectl create -f -` (the Job has a generateName, which `kubectl apply` refuses)."""
    from stripe_platform.orchestration.ml import parse_overrides, render_yaml

    console.print(render_yaml(parse_overrides(values or [])), end="")
