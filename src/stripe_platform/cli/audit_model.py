"""`audit model`: the log anomaly model (issue 22, "Watch"; ml/log_anomaly.py): train and register
it (``models:/log_anomaly@champion``), evaluate it beside the rules on the planted anomalies."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from stripe_platform.cli.audit import audit_app
from stripe_platform.cli.common import command, console, group, settings
from stripe_platform.errors import PlatformError

model_app = group("The log anomaly model: train (and register), evaluate against the rules.")
audit_app.add_typer(model_app, name="model")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]
TestDaysOption = Annotated[
    int,
    typer.Option("--test-days", min=1, help="The held-back test period: the last N whole days"),
]
GenerateOption = Annotated[
    bool,
    typer.Option(
        "--generate",
        help="Generate the seed's labelled logs (--scale, --seed) instead of reading the Log "
        "collection",
    ),
]
ScaleOption = Annotated[float, typer.Option("--scale", help="Seed scale of generated logs")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of generated logs")]


class NoLabelledLogs(PlatformError, LookupError):
    """The Log collection holds no labelled document to train or evaluate on."""


def _documents(generate: bool, scale: float, seed: int) -> list[dict[str, Any]]:
    """The labelled Log documents: the seed's in the platform's Log collection (the collector's
    own documents carry no label: the threshold and the metrics need the planted ground truth)."""
    if generate:
        import numpy as np

        from stripe_platform.seed.logs import log_documents
        from stripe_platform.seed.spec import SeedSpec

        spec = SeedSpec(scale=scale, seed=seed)
        return list(log_documents(spec, np.random.default_rng([spec.seed, 6])))
    from stripe_platform.docstore import client as docstore

    docs = list(docstore.connect(settings())["Log"].find({"isAnomaly": {"$exists": True}}))
    if not docs:
        raise NoLabelledLogs(
            "the Log collection holds no labelled (seeded) document: run `stripe-platform seed`, "
            "or pass --generate"
        )
    return docs


@command(model_app, "train")
def model_train(
    test_days: TestDaysOption = 30,
    generate: GenerateOption = False,
    scale: ScaleOption = 1.0,
    seed: SeedOption = 42,
    as_json: JsonOption = False,
) -> None:
    """Train on the period before the last --test-days, register a version in MLflow, and move
    models:/log_anomaly@champion to it when it beats the champion's F1 on the test period."""
    from stripe_platform.ml.log_anomaly import MODEL_NAME, train

    result = train(settings(), _documents(generate, scale, seed), test_days=test_days)
    if as_json:
        console.print_json(data=result.as_dict())
        return
    m, p = result.metrics, result.periods
    console.print(
        f"{MODEL_NAME} version {result.version}: trained {p['train_start']} .. {p['train_end']} "
        f"({p['train_rows']} documents), tested {p['test_start']} .. {p['test_end']} "
        f"({p['test_rows']}, {p['test_anomalies']} planted anomalies): precision "
        f"{m['precision']:.3f}, recall {m['recall']:.3f}, F1 {m['f1']:.3f}, "
        f"{m['false_alerts_per_normal_day']} false alerts per normal day"
    )
    verdict = "promoted to champion" if result.promoted else "not promoted"
    console.print(f"{verdict}: {result.reason}")


@command(model_app, "evaluate")
def model_evaluate(
    test_days: TestDaysOption = 30,
    generate: GenerateOption = False,
    scale: ScaleOption = 1.0,
    seed: SeedOption = 42,
    supervised: Annotated[
        bool,
        typer.Option("--supervised/--no-supervised", help="Also measure the LightGBM reference"),
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """On the held-back test period: the model, the rules, both (union), a threshold baseline and
    the supervised reference: precision, recall, false alerts per normal day."""
    from stripe_platform.ml.log_anomaly import evaluate

    report = evaluate(
        settings(), _documents(generate, scale, seed), test_days=test_days, supervised=supervised
    )
    if as_json:
        console.print_json(data=report)
        return
    table = Table("detector", "precision", "recall", "F1", "false pos.", "missed", "FP/normal day")
    for name, m in report.items():
        if name == "split":
            continue
        if "precision" not in m:
            table.add_row(name, m.get("note", "-"), "", "", "", "", "")
            continue
        table.add_row(
            name,
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            f"{m['f1']:.3f}",
            str(m["false_positives"]),
            str(m["false_negatives"]),
            str(m["false_alerts_per_normal_day"]),
        )
    console.print(table)
    p = report["split"]
    console.print(
        f"train {p['train_start']} .. {p['train_end']} ({p['train_rows']} documents, "
        f"{p['train_anomalies']} anomalies); test {p['test_start']} .. {p['test_end']} "
        f"({p['test_rows']}, {p['test_anomalies']} anomalies)"
    )
