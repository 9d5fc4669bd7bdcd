"""FACT_FraudAnalysis sets the fraud model's predictions (FraudScore) beside the confirmed fraud
(fraud reports), with the stream scorer's scores and delays (FraudScoreEvent): a seeded source
synced into DuckDB and built before any payment is scored, then with score rows, stream events and
fraud reports the test writes itself, incrementally and from scratch, and on a PostgreSQL
warehouse. Every expected figure is computed here from the OLTP rows, never through
dbt's models."""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import defaultdict
from decimal import Decimal

import pytest

from stripe_platform.ml.contract import load_platform_transactions
from stripe_platform.oltp import db
from stripe_platform.oltp.status import change_status
from stripe_platform.transform import analyses
from stripe_platform.transform import dbt as transform
from test_transform import cli, duckdb_rows, postgres_warehouse, seeded_source, sync_all

pytestmark = pytest.mark.timeout(1500)  # five dbt builds on shared cores

GROUP = ("DateKey", "CustomerKey", "MerchantKey", "LocationKey", "PaymentMethodKey")
MEASURES = (
    "ScoredCount",
    "PredictedFraudCount",
    "AvgFraudScore",
    "ConfirmedFraudCount",
    "PredictedConfirmedFraudCount",
)
MART_SQL = f"SELECT {', '.join(GROUP + MEASURES)} FROM analytics.fact_fraudanalysis"
STREAM_MEASURES = (
    "StreamScoredCount",
    "StreamFlaggedCount",
    "AvgStreamScore",
    "AvgCommitToScoreMs",
    "DayP95CommitToScoreMs",
)
STREAM_SQL = f"SELECT {', '.join(GROUP + STREAM_MEASURES)} FROM analytics.fact_fraudanalysis"
T0 = dt.datetime(2026, 11, 2, tzinfo=dt.UTC)  # scoring runs after the seeded history


@pytest.fixture
def source(settings, database, docdb, tmp_path):
    """A seeded source (the test's own OLTP and document databases) and an empty DuckDB
    warehouse."""
    yield from seeded_source(settings, database, docdb, tmp_path, scale=0.003, seed=7, docs=300)


def payments(s) -> dict[int, tuple]:
    """Each payment's group in the mart, from the OLTP row: (YYYYMMDD of its UTC date, customer,
    merchant, location, payment method)."""
    with db.connect(s) as conn:
        rows = conn.execute(
            "SELECT ID, to_char(DateTime AT TIME ZONE 'UTC', 'YYYYMMDD')::int, CustomerID, "
            "MerchantID, TransactionLocationID, PaymentMethodID FROM Transaction"
        ).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def fraud_reasons() -> list[str]:
    with (transform.DBT_PROJECT_DIR / "seeds" / "fraud_dispute_reasons.csv").open() as fh:
        return [r["reason"] for r in csv.DictReader(fh)]


def reported(s) -> set[int]:
    """Payments with a fraud report: a status change to disputed with a fraud reason."""
    with db.connect(s) as conn:
        return {
            r[0]
            for r in conn.execute(
                "SELECT c.TransactionID FROM TransactionStateChanges c "
                "JOIN TransactionStatus st ON st.ID = c.ToStatusID "
                "WHERE st.Name = 'disputed' AND c.Reason = ANY(%s)",
                (fraud_reasons(),),
            )
        }


def insert_scores(s, rows: list[tuple]) -> None:
    """FraudScore rows as `ml score` writes them: (transaction id, version, score, threshold,
    scored at)."""
    with db.connect(s, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO FraudScore (TransactionID, TransactionDateTime, ModelName, ModelVersion, "
            "FeatureVersion, Score, Threshold, IsFraud, ScoredAt) "
            "SELECT ID, DateTime, 'fraud', %s, 'v1', %s, %s, %s >= %s, %s "
            "FROM Transaction WHERE ID = %s",
            [(v, score, th, score, th, at, tid) for tid, v, score, th, at in rows],
        )


def insert_events(s, rows: list[tuple]) -> None:
    """FraudScoreEvent rows as `stream fraud` writes them: (transaction id, LSN, score,
    commit-to-score ms); the model's threshold 0.5."""
    with db.connect(s, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO FraudScoreEvent (TransactionID, LSN, TransactionDateTime, CommitTime, "
            "ModelName, ModelVersion, FeatureVersion, Score, Threshold, IsFraud, Source, "
            "CommitToScoreMs) SELECT ID, %s, DateTime, DateTime, 'fraud', 1, 'v1', %s, 0.5, "
            "%s >= 0.5, 'embedded', %s FROM Transaction WHERE ID = %s",
            [(lsn, score, score, ms, tid) for tid, lsn, score, ms in rows],
        )


def p95(values: list[float]) -> float:
    """The continuous 95th percentile (linear between the two nearest ranks)."""
    ordered = sorted(values)
    rank = 0.95 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def expected_stream(groups: dict[int, tuple], events: dict[tuple[int, int], tuple]) -> dict:
    """The stream measures per group: each payment's latest event (highest LSN) gives its score
    and decision, its earliest the commit-to-score delay; the p95 is the day's."""
    by_payment: dict[int, list] = defaultdict(list)
    for (tid, lsn), (score, ms) in events.items():
        by_payment[tid].append((lsn, score, ms))
    acc: dict[tuple, list] = defaultdict(lambda: [0, 0, [], []])
    days: dict[int, list] = defaultdict(list)
    for tid, group in groups.items():
        a = acc[group]
        if tid in by_payment:
            found = sorted(by_payment[tid])
            (_, score, _), (_, _, ms) = found[-1], found[0]
            a[0] += 1
            a[1] += score >= 0.5
            a[2].append(score)
            a[3].append(ms)
            days[group[0]].append(ms)
    return {
        g: (
            a[0],
            a[1],
            sum(a[2]) / len(a[2]) if a[2] else None,
            sum(a[3]) / len(a[3]) if a[3] else None,
            p95(days[g[0]]) if days.get(g[0]) else None,
        )
        for g, a in acc.items()
    }


def assert_stream(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for group, want in expected.items():
        got = actual[group]
        assert (got[0], got[1]) == (want[0], want[1]), group
        # Rounded to 6 (score) and 3 (ms) decimals, from doubles: half a unit and a hair more.
        for i, tolerance in ((2, "0.000000501"), (3, "0.000501"), (4, "0.000501")):
            if want[i] is None:
                assert got[i] is None, (group, i)
            else:
                assert abs(Decimal(got[i]) - Decimal(str(want[i]))) <= Decimal(tolerance), (
                    group,
                    i,
                )


def expected_mart(groups: dict[int, tuple], scores: dict, confirmed: set[int]) -> dict:
    """The mart's measures per group with rows in it: each payment's newest score (its latest
    scored row, then its highest version), its decision (score >= threshold) and its report."""
    newest: dict[int, tuple] = {}
    for (tid, version), (score, threshold, at) in scores.items():
        if tid not in newest or (at, version) > newest[tid][0]:
            newest[tid] = ((at, version), score, score >= threshold)
    acc: dict[tuple, list] = defaultdict(lambda: [0, 0, [], 0, 0])
    for tid, group in groups.items():
        a = acc[group]
        flagged = tid in newest and newest[tid][2]
        if tid in newest:
            a[0] += 1
            a[1] += flagged
            a[2].append(newest[tid][1])
        a[3] += tid in confirmed
        a[4] += flagged and tid in confirmed
    return {
        g: (a[0], a[1], sum(a[2]) / len(a[2]) if a[2] else None, a[3], a[4]) for g, a in acc.items()
    }


def mart(rows: list[tuple]) -> dict:
    return {tuple(r[:5]): tuple(r[5:]) for r in rows}


def assert_mart(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for group, want in expected.items():
        got = actual[group]
        assert (got[0], got[1], got[3], got[4]) == (want[0], want[1], want[3], want[4]), group
        if want[2] is None:
            assert got[2] is None, group
        else:  # AvgFraudScore is rounded to 6 decimals
            assert abs(Decimal(got[2]) - Decimal(want[2])) <= Decimal("0.0000005"), group


def totals(expected: dict) -> tuple[int, ...]:
    return tuple(sum(v[i] for v in expected.values()) for i in (0, 1, 3, 4))


def test_predicted_fraud_beside_confirmed_fraud_before_and_after_scoring(source, settings):
    s = source
    groups = payments(s)
    ids = sorted(groups)
    assert len(ids) > 1000
    with db.connect(s, autocommit=True) as conn:
        # Reports of the test's own: two fraud reports (one dispute later won: still fraud
        # reported) and a dispute for a reason that is not fraud. Completed payments, which may
        # be disputed.
        completed = [
            r[0]
            for r in conn.execute(
                "SELECT ID FROM Transaction WHERE TransactionStatusID = "
                "(SELECT ID FROM TransactionStatus WHERE Name = 'completed') ORDER BY ID"
            )
        ]
    confirmed = reported(s)
    own_fraud = [t for t in completed if t not in confirmed][:2]
    not_fraud = [t for t in completed if t not in confirmed][2:3]
    assert len(confirmed) > 5 and len(own_fraud) == 2

    # 1. Before any scoring: no FraudScore row. The mart builds, predicts nothing, and its
    # confirmed fraud is the seed's reports, the fraud model's label on the same payments.
    sync_all(s)
    first = json.loads(cli(s, "transform", "--json").stdout)
    assert first["success"] and first["counts"].get("error", 0) == 0
    labels = load_platform_transactions(s, require_labels=False).table
    labelled = {
        int(t)
        for t, label in zip(
            labels["transaction_id"].to_pylist(), labels["label"].to_pylist(), strict=True
        )
        if label
    }
    assert labelled == confirmed
    expected = expected_mart(groups, {}, confirmed)
    assert_mart(mart(duckdb_rows(s, MART_SQL)), expected)
    assert totals(expected) == (0, 0, len(confirmed), 0)
    assert_stream(mart(duckdb_rows(s, STREAM_SQL)), expected_stream(groups, {}))
    brief_answer = analyses.run_analysis(s, "fraud-daily-small-credit").rows
    assert sum(n for _, n in brief_answer) > 0

    # 2. Scores: version 1 for a third of the payments, version 2 (a later champion, another
    # threshold) rescoring half of those, and version 3 scoring a few before version 2 did (the
    # champion went back to 2): the latest scored row is the newest champion's. The confirmed
    # payments are scored high, so some are predicted too.
    scores: dict[tuple[int, int], tuple[float, float, dt.datetime]] = {}
    for n, tid in enumerate(ids):
        score = 0.97 if tid in confirmed and n % 2 else (tid * 7919 % 1000) / 1000
        if n % 3 == 0:
            scores[(tid, 1)] = (score, 0.5, T0)
        if n % 6 == 0:
            scores[(tid, 2)] = ((score + 0.25) % 1, 0.3, T0 + dt.timedelta(days=7))
        if n % 60 == 0:
            scores[(tid, 3)] = (0.99, 0.5, T0 + dt.timedelta(days=3))
    insert_scores(s, [(t, v, *row) for (t, v), row in scores.items()])
    # Stream events: a quarter of the payments scored as they committed, an eighth changed once
    # more (a later LSN, another score: the latest decides; the first change's delay counts).
    events: dict[tuple[int, int], tuple[float, float]] = {}
    for n, tid in enumerate(ids):
        if n % 4 == 1:
            score = (tid * 31 % 1000) / 1000
            events[(tid, 1000 + 10 * n)] = (score, 5 + (n % 17) * 3.25)
            if n % 8 == 1:
                events[(tid, 1005 + 10 * n)] = (1 - score, 900.0)
    insert_events(s, [(t, lsn, *row) for (t, lsn), row in events.items()])
    sync_all(s)
    cli(s, "transform")
    expected = expected_mart(groups, scores, confirmed)
    scored, predicted, _, both = totals(expected)
    assert scored == len(range(0, len(ids), 3)) and 0 < both < predicted < scored
    assert_mart(mart(duckdb_rows(s, MART_SQL)), expected)
    stream = expected_stream(groups, events)
    assert sum(v[0] for v in stream.values()) == len(range(1, len(ids), 4))
    assert 0 < sum(v[1] for v in stream.values()) < sum(v[0] for v in stream.values())
    assert_stream(mart(duckdb_rows(s, STREAM_SQL)), stream)
    # FraudCount reads the documents, which these rows did not change: the brief's answer stays.
    assert analyses.run_analysis(s, "fraud-daily-small-credit").rows == brief_answer

    # 3. Changes: the newest score of a payment deleted (its previous one counts again), a new
    # version for another, and the test's reports (fraud reported, one of them then won by the
    # merchant; a dispute that is not fraud).
    dropped = ids[6]
    with db.connect(s, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM FraudScore WHERE TransactionID = %s AND ModelVersion = 2", (dropped,)
        )
        del scores[(dropped, 2)]
        for tid, reason in zip(own_fraud, fraud_reasons(), strict=True):
            change_status(conn, tid, "disputed", reason=reason, updated_by="test")
        change_status(conn, own_fraud[0], "completed", reason="dispute won", updated_by="test")
        change_status(conn, not_fraud[0], "disputed", reason="duplicate charge", updated_by="test")
    assert reported(s) == confirmed | set(own_fraud)
    confirmed |= set(own_fraud)
    rescored = ids[1]
    scores[(rescored, 4)] = (0.9, 0.5, T0 + dt.timedelta(days=10))
    insert_scores(s, [(rescored, 4, *scores[(rescored, 4)])])
    # The stream: another change of a payment it scored twice (its score now flags it), and the
    # first change of one it had not scored (a long delay: its day's p95 moves).
    events[(ids[1], 5000)] = (0.95, 1.0)
    events[(ids[2], 5001)] = (0.1, 60000.0)
    insert_events(s, [(t, lsn, *events[(t, lsn)]) for t, lsn in ((ids[1], 5000), (ids[2], 5001))])
    sync_all(s)
    cli(s, "transform")
    expected = expected_mart(groups, scores, confirmed)
    assert_mart(mart(duckdb_rows(s, MART_SQL)), expected)
    stream = expected_stream(groups, events)
    assert_stream(mart(duckdb_rows(s, STREAM_SQL)), stream)
    assert totals(expected)[2] == len(confirmed)

    # The incremental runs left exactly what a rebuild from scratch computes.
    everything = "SELECT * FROM analytics.fact_fraudanalysis"
    incremental = sorted(duckdb_rows(s, everything), key=repr)
    cli(s, "transform", "--full-refresh")
    assert sorted(duckdb_rows(s, everything), key=repr) == incremental

    # 4. A PostgreSQL warehouse builds the same mart from the same data.
    with postgres_warehouse(settings, s) as on_postgres:
        sync_all(on_postgres)
        cli(on_postgres, "transform")
        with db.connect(settings, database=f"{s.pg_database}_warehouse") as conn:
            assert_mart(mart(conn.execute(MART_SQL).fetchall()), expected)
            assert_stream(mart(conn.execute(STREAM_SQL).fetchall()), stream)
