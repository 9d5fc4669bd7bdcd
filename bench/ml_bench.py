"""Benchmark: the fraud model at scale: features, training, batch scoring, quality.

    uv run python bench/ml_bench.py --scale 1 [--runs 1] [--labels planted|reported]
        [--rounds 300] [--output FILE]

The data: the seed's generator at the scale (1 = 1,000,000 payments over 730 days up to END),
turned into the transactions contract's canonical table the way the ML tests do
(tests/ml_data.py: amounts in EUR, countries, labels), in memory: no database is involved.
``--labels planted`` (the default) labels every planted fraud (the ground truth; label time = its
fraud report when it has one); ``reported`` labels only the frauds the platform's store shows as
reported, what `ml train` reads from PostgreSQL. Measured, per run (``--runs``), in this order:

1. Features: the one feature definition for every payment with the batch engine
   (``batch_features``: DuckDB window functions over the whole table). Goal: < 60 s for
   1,000,000 payments (scaled linearly to the payments measured).
2. Training end to end: ``train_fraud`` in a fresh temporary MLflow store (a platform home of its
   own; the store is created before the clock starts, its creation timed apart): the default
   split (the last 90 days held back after a 7-day gap), the features, LightGBM's fit, the
   candidate and the rules baseline evaluated on the test period, one MLflow run logged and a
   version registered and promoted. Goal: < 5 min for 1,000,000 payments (scaled likewise).
3. Batch scoring excluding writes: the registered champion loaded as the scorer does
   (``Scorer.from_loaded(load_champion(...))``), then ``score_transactions`` over every payment:
   features from the table's own history and the model's predictions, nothing written. Goal:
   > 100,000 payments/s. Predict alone and features alone are shown beside it.
4. Quality on the held-back test period (from the training above, each run's): average precision
   of the model beside the rules baseline's (goal >= 2x), ROC AUC, recall at 1% false-positive
   rate, precision and recall at a 1% alert budget, card precision@100; no goal for the others,
   the rules' value beside each, and for the budget and card precision what a perfect ranking
   (the labels as scores) reaches on the same payments: their ceiling.

Libraries are imported (and the feature engine run once on 10,000 payments) before the clock
starts; that import time is reported apart (a `stripe-platform ml train` process pays it too).

Prints a markdown table and writes JSON (default bench/results/ml-<UTC time>.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ML_DATA = HERE.parent / "tests" / "ml_data.py"  # the seed as canonical transactions, one way
END = dt.date(2026, 11, 1)  # as the other benchmarks: the same data at the same scale
MILLION = 1_000_000
GOALS = {
    "features_s_per_million": 60.0,
    "training_s_per_million": 300.0,
    "scoring_tx_per_s": 100_000.0,
    "ap_ratio": 2.0,
}
WARMUP_ROWS = 10_000


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def load_ml_data() -> Any:
    spec = importlib.util.spec_from_file_location("bench_ml_data", ML_DATA)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1 = 1,000,000 payments")
    parser.add_argument("--runs", type=int, default=1, help="measured runs of each measure")
    parser.add_argument(
        "--labels",
        choices=("planted", "reported"),
        default="planted",
        help="planted: every planted fraud; reported: only those reported (the platform's view)",
    )
    parser.add_argument(
        "--rounds", type=int, help="LightGBM boosting rounds (default: the training default)"
    )
    parser.add_argument("--output", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.scale <= 0 or (args.rounds is not None and args.rounds < 1):
        parser.error("--runs and --rounds must be >= 1, --scale > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()

    started = time.perf_counter()
    import lightgbm  # noqa: F401 - imported before the clock starts
    import mlflow  # noqa: F401

    from stripe_platform.config import load_settings
    from stripe_platform.ml.evaluate import evaluate
    from stripe_platform.ml.features import FEATURE_NAMES, FEATURE_VERSION, batch_features
    from stripe_platform.ml.registry import Registry, load_champion
    from stripe_platform.ml.score import Scorer, score_transactions
    from stripe_platform.ml.split import split
    from stripe_platform.ml.train import NUM_BOOST_ROUND, train_fraud
    from stripe_platform.seed.dataset import build
    from stripe_platform.seed.spec import make_spec

    imports_s = time.perf_counter() - started
    rounds = args.rounds or NUM_BOOST_ROUND

    print(f"generating the seed's payments at scale {args.scale} ...", flush=True)
    started = time.perf_counter()
    spec = make_spec(scale=args.scale, end=END)
    data = build(spec)
    generation_s = time.perf_counter() - started
    started = time.perf_counter()
    transactions = load_ml_data().seed_transactions(data, labels=args.labels)
    canonical_s = time.perf_counter() - started
    del data
    n = transactions.num_rows
    print(
        f"{n:,} payments, {transactions.positives:,} labelled fraud ({args.labels}); "
        f"generation {generation_s:.1f} s, canonical table {canonical_s:.1f} s",
        flush=True,
    )
    batch_features(transactions.table.slice(0, WARMUP_ROWS))  # DuckDB's first query

    # What a perfect ranking (the labels themselves as scores) reaches on the test period: card
    # precision@k cannot exceed the share of a day's top k cards that are frauds at all.
    periods = split(transactions)
    test = periods.test_rows
    ceiling = evaluate(
        periods.test_labels,
        periods.test_labels.astype("float64"),
        customers=transactions.table["customer_id"].take(test).to_numpy(zero_copy_only=False),
        timestamps=transactions.table["timestamp"].take(test).to_numpy(zero_copy_only=False),
    ).as_dict()

    features_s: list[float] = []
    training: list[dict[str, Any]] = []
    scoring: list[dict[str, float]] = []
    quality: list[dict[str, Any]] = []
    for run in range(args.runs):
        started = time.perf_counter()
        frame = batch_features(transactions)
        features_s.append(time.perf_counter() - started)
        assert frame.shape == (n, len(FEATURE_NAMES))
        del frame
        print(f"run {run + 1}: features {features_s[-1]:.1f} s", flush=True)

        home = Path(tempfile.mkdtemp(prefix="stripe-platform-ml-bench-"))
        try:
            settings = load_settings(home=home, profile="embedded", mlflow_tracking_uri=None)
            registry = Registry.from_settings(settings)
            started = time.perf_counter()
            registry.check()  # creates the home's SQLite store (its migrations)
            store_s = time.perf_counter() - started
            started = time.perf_counter()
            result = train_fraud(
                settings, transactions=transactions, registry=registry, num_boost_round=rounds
            )
            wall = time.perf_counter() - started
            if not result.promoted:
                raise SystemExit(f"the first model of a fresh store was not promoted: {result}")
            training.append({"seconds": wall, "store_create_s": store_s, "timings": result.timings})
            print(f"run {run + 1}: training {wall:.1f} s {result.timings}", flush=True)
            report = result.as_dict()
            quality.append(
                {
                    "split": report["split"],
                    "model": report["metrics"],
                    "rules": report["rules_metrics"],
                    "ap_ratio": report["ap_ratio"],
                }
            )

            started = time.perf_counter()
            scorer = Scorer.from_loaded(load_champion(registry, settings.ml_model_name))
            load_s = time.perf_counter() - started
            scores, seconds_features, seconds_predict = score_transactions(scorer, transactions)
            if len(scores) != n:
                raise SystemExit(f"{len(scores)} scores for {n} payments")
            scoring.append(
                {
                    "features_s": seconds_features,
                    "predict_s": seconds_predict,
                    "load_s": load_s,
                    "flagged": int(scorer.decide(scores).sum()),
                    "threshold": scorer.threshold,
                }
            )
            print(
                f"run {run + 1}: scoring {n / (seconds_features + seconds_predict):,.0f} "
                f"payments/s (features {seconds_features:.1f} s, predict {seconds_predict:.1f} s)",
                flush=True,
            )
        finally:
            shutil.rmtree(home, ignore_errors=True)

    results = {
        "benchmark": "ml",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scale": args.scale,
        "runs": args.runs,
        "labels": args.labels,
        "transactions": n,
        "positives": transactions.positives,
        "period": {"start": spec.start.isoformat(), "end": END.isoformat(), "days": spec.days},
        "feature_version": FEATURE_VERSION,
        "features_count": len(FEATURE_NAMES),
        "num_boost_round": rounds,
        "goals": {**GOALS, **scaled_goals(n)},
        "setup": {
            "imports_s": imports_s,
            "generation_s": generation_s,
            "canonical_s": canonical_s,
        },
        "features": {"seconds": features_s},
        "training": training,
        "scoring": scoring,
        "quality": quality,
        "quality_ceiling": ceiling,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": load_start,
            "load_average_at_end": os.getloadavg(),
            # Linux reports kilobytes: the process's peak memory over the whole benchmark.
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
    }
    out = args.output or RESULTS / f"ml-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report_table(results))
    print(f"\nwritten {out}")
    return 0


def scaled_goals(transactions: int) -> dict[str, float]:
    """The goals in seconds for the payments measured (the issue's are for 1,000,000)."""
    share = transactions / MILLION
    return {
        "features_s": GOALS["features_s_per_million"] * share,
        "training_s": GOALS["training_s_per_million"] * share,
    }


def report_table(r: dict[str, Any]) -> str:
    """A short markdown table of the headline figures (run_all builds the full rows)."""
    goals, n = r["goals"], r["transactions"]
    features = statistics.median(r["features"]["seconds"])
    training = statistics.median(t["seconds"] for t in r["training"])
    scoring = statistics.median(n / (s["features_s"] + s["predict_s"]) for s in r["scoring"])
    q = r["quality"][0]
    model, rules = q["model"], q["rules"]

    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    lines = [
        f"\n## fraud model at scale {r['scale']} ({n:,} payments, {r['labels']} labels, "
        f"{r['runs']} run(s))\n",
        "| measure | median | goal |",
        "|---|---:|---:|",
        f"| features, batch engine | {features:.1f} s | < {goals['features_s']:.1f} s: "
        f"{verdict(features < goals['features_s'])} |",
        f"| training end to end | {training:.1f} s | < {goals['training_s']:.1f} s: "
        f"{verdict(training < goals['training_s'])} |",
        f"| batch scoring excluding writes | {scoring:,.0f} payments/s | > "
        f"{goals['scoring_tx_per_s']:,.0f}/s: {verdict(scoring > goals['scoring_tx_per_s'])} |",
        f"| average precision, model / rules | {model['average_precision']:.4f} / "
        f"{rules['average_precision']:.4f} ({q['ap_ratio']:.2f}x) | >= {goals['ap_ratio']:g}x: "
        f"{verdict(q['ap_ratio'] >= goals['ap_ratio'])} |",
        f"| ROC AUC, model / rules | {model['roc_auc']:.4f} / {rules['roc_auc']:.4f} | |",
        f"| recall at 1% FPR, model / rules | {model['recall_at_1pct_fpr']:.4f} / "
        f"{rules['recall_at_1pct_fpr']:.4f} | |",
        f"| precision / recall at a {model['alert_budget']:.0%} alert budget, model | "
        f"{model['budget_precision']:.4f} / {model['budget_recall']:.4f} | |",
        f"| card precision@{model['card_precision_k']}, model / rules (perfect ranking) | "
        f"{model['card_precision_at_k']:.4f} / {rules['card_precision_at_k']:.4f} "
        f"({r['quality_ceiling']['card_precision_at_k']:.4f}) | |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
