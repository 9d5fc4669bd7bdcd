"""The ML transactions contract and the one feature definition.

- The contract: every error a user's parquet file can hit (written for real in tmp_path) names
  the file and the column; the platform's loader reads a seeded PostgreSQL with fraud reports as
  labels.
- The features: both engines (DuckDB batch, online state) give the same numbers for every payment
  of the seed's generated data and for hand-built edge cases, whose expected values are written
  here by hand.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ml_data import fraud_reports, seed_transactions
from stripe_platform.errors import PlatformError
from stripe_platform.ml import contract, features
from stripe_platform.ml.contract import (
    CANONICAL_SCHEMA,
    AmbiguousColumns,
    DuplicateTransactionIds,
    EmptyTransactions,
    InvalidValues,
    MissingColumn,
    MistypedColumn,
    NoPositiveLabels,
    NullValues,
    Transactions,
    UnreadableFile,
    canonicalize,
    load_platform_transactions,
    read_transactions,
    records,
)
from stripe_platform.ml.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    FeatureMismatch,
    OnlineFeatureState,
    batch_features,
    check_compatible,
    feature_version,
    online_features,
)
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec

UTC = dt.UTC
T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=UTC)  # a Wednesday
US = dt.timedelta(microseconds=1)
MINUTE, HOUR, DAY = dt.timedelta(minutes=1), dt.timedelta(hours=1), dt.timedelta(days=1)
# Euros per unit by Currency.ID, from dbt_project/seeds/currency_rates.csv.
EUR_PER_UNIT = {2: 0.86, 3: 1.14, 4: 0.0055, 6: 1.07}


def approx(values: list[float | None]) -> list:
    """Expected floats within 1e-12 (None stays None)."""
    return [None if v is None else pytest.approx(v, abs=1e-12) for v in values]


# -- helpers -----------------------------------------------------------------------------------
def payments(rows: list[dict]) -> Transactions:
    """Hand-built payments: customer c1, merchant m1, amount 1 and label 0 unless given."""
    defaults = {
        "customer_id": "c1",
        "merchant_id": "m1",
        "amount": 1.0,
        "label": 0,
        "label_time": None,
        "device_id": None,
        "ip": None,
        "country": None,
        "billing_country": None,
    }
    full = [{**defaults, "transaction_id": f"t{i}", **row} for i, row in enumerate(rows)]
    schema = pa.schema(
        [f for f in CANONICAL_SCHEMA if f.name != "label"] + [pa.field("label", pa.int64())]
    )
    table = pa.Table.from_pylist(full, schema=schema)
    return canonicalize(table, source="hand-built", require_labels=False)


def by_public_api(t: Transactions) -> pd.DataFrame:
    """Features from OnlineFeatureState's public calls, as the stream makes them: each label
    added once known (strictly before the payment that needs it), then update() per payment."""
    state = OnlineFeatureState()
    labels = sorted(
        (known or ts, tid)
        for tid, ts, label, known in zip(
            *(
                t.table[c].to_pylist()
                for c in ("transaction_id", "timestamp", "label", "label_time")
            ),
            strict=True,
        )
        if label == 1
    )
    rows = []
    for record in records(t.table):
        while labels and labels[0][0] < record.timestamp:
            known, tid = labels.pop(0)
            assert state.add_label(tid, known)
        rows.append(state.update(record))
    return pd.DataFrame(rows, columns=FEATURE_NAMES)


def same(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
    """Cell by cell: equal within 1e-9, or both NaN."""
    x, y = a.to_numpy(), b.to_numpy()
    return np.isclose(x, y, rtol=0, atol=1e-9) | (np.isnan(x) & np.isnan(y))


def column(t: Transactions, name: str) -> list[float | None]:
    """One feature for every payment, computed by both engines (which must agree); NaN -> None."""
    batch, online = batch_features(t), online_features(t)
    assert same(batch, online).all(), f"engines disagree:\n{batch}\n{online}"
    return [None if math.isnan(v) else v for v in batch[name]]


# -- features: hand-built cases, expected values written by hand ---------------------------------
def test_same_instant_and_window_boundaries():
    """A window [t - 1h, t): its lower bound is in, the payment's own instant is out."""
    t = payments(
        [
            {"timestamp": T0, "amount": 10.0},
            {"timestamp": T0, "amount": 20.0},  # the same instant: neither sees the other
            {"timestamp": T0 + HOUR - US, "amount": 5.0},
            {"timestamp": T0 + HOUR, "amount": 1.0},  # T0 is exactly 1 h before: in
            {"timestamp": T0 + HOUR + US, "amount": 2.0},  # T0 is 1 h + 1 us before: out
        ]
    )
    assert column(t, "customer_count_1h") == [0, 0, 2, 3, 2]
    assert column(t, "customer_amount_sum_1h") == [0.0, 0.0, 30.0, 35.0, 6.0]
    assert column(t, "customer_count_24h") == [0, 0, 2, 3, 4]
    assert column(t, "merchant_count_1h") == [0, 0, 2, 3, 2]
    # 30-day mean before each payment; the ratio is this amount over it.
    assert column(t, "customer_amount_mean_30d") == approx([None, None, 15.0, 35 / 3, 9.0])
    assert column(t, "customer_amount_ratio_30d") == approx([None, None, 1 / 3, 3 / 35, 2 / 9])
    assert column(t, "amount") == [10.0, 20.0, 5.0, 1.0, 2.0]


def test_merchant_risk_respects_the_label_delay_and_when_a_label_became_known():
    """merchant_fraud_rate_{7d,28d}_delay_7d: frauds among the merchant's payments in
    [t - 7d - W, t - 7d), counting a fraud only once its label is known (before t)."""
    t = payments(
        [
            # p0: fraud, reported 20 days later (after the 7-day delay).
            {"timestamp": T0, "label": 1, "label_time": T0 + 20 * DAY},
            {"timestamp": T0 + HOUR},  # p1: legitimate
            {"timestamp": T0 + 10 * DAY},  # p2: window [T0 - 4d, T0 + 3d): p0 p1, p0 unknown
            {"timestamp": T0 + 14 * DAY},  # p3: 7d window [T0, T0 + 7d): p0 p1 (p0 on the bound)
            {"timestamp": T0 + 14 * DAY + US},  # p4: 7d window starts 1 us after p0: p1 only
            {"timestamp": T0 + 21 * DAY},  # p5: p0 known now; 7d window holds only p2
            # m2: a fraud with no label time is known one delay after it.
            {"merchant_id": "m2", "timestamp": T0 + 2 * HOUR, "label": 1},
            {"merchant_id": "m2", "timestamp": T0 + 7 * DAY + 2 * HOUR},  # window ends at it
            {"merchant_id": "m2", "timestamp": T0 + 7 * DAY + 2 * HOUR + US},
        ]
    )
    # Canonical order is by time: p0 p1 m2a m2b m2c p2 p3 p4 p5.
    assert t.table["transaction_id"].to_pylist() == [
        "t0", "t1", "t6", "t7", "t8", "t2", "t3", "t4", "t5",
    ]  # fmt: skip
    assert column(t, "merchant_fraud_rate_7d_delay_7d") == [
        None, None, None, None, 1.0, 0.0, 0.0, 0.0, 0.0,
    ]  # fmt: skip
    assert column(t, "merchant_fraud_rate_28d_delay_7d") == approx([
        None, None, None, None, 1.0, 0.0, 0.0, 0.0, 1 / 3,
    ])  # fmt: skip
    # The stream's own calls give the same numbers.
    assert same(by_public_api(t), batch_features(t)).all()


def test_online_state_warmed_with_labels_known_later_counts_them_only_from_then():
    """Warming from history adds every label at once; one known after a payment does not count
    for it."""
    history = payments(
        [
            {"timestamp": T0, "label": 1, "label_time": T0 + 20 * DAY},
            {"timestamp": T0 + HOUR},
        ]
    )
    state = OnlineFeatureState()
    state.ingest_history(history)
    later = payments([{"timestamp": T0 + 10 * DAY}, {"timestamp": T0 + 21 * DAY}])
    day10, day21 = (
        dict(zip(FEATURE_NAMES, state.features(r), strict=True)) for r in records(later.table)
    )
    assert day10["merchant_fraud_rate_7d_delay_7d"] == 0.0  # 0 of 2: not known on day 10
    assert day21["merchant_fraud_rate_28d_delay_7d"] == 0.5  # known on day 20
    assert math.isnan(day21["merchant_fraud_rate_7d_delay_7d"])  # no payment in its window
    assert day21["merchant_count_7d"] == 0.0
    assert day10["customer_count_30d"] == 2.0


def test_new_device_country_mismatch_hour_and_weekend():
    saturday_late = dt.datetime(2025, 1, 4, 23, 30, tzinfo=UTC)
    monday_early = dt.datetime(2025, 1, 6, 0, 15, tzinfo=UTC)
    t = payments(
        [
            {"timestamp": T0, "device_id": "d1", "country": "FR", "billing_country": "fr"},
            {"timestamp": T0 + DAY, "device_id": "d1", "country": "FR", "billing_country": "DE"},
            {"timestamp": T0 + DAY + HOUR, "device_id": "d2", "country": "FR"},
            {"timestamp": T0 + DAY + HOUR, "device_id": "d2"},  # same instant: also new
            {"timestamp": T0 + DAY + 2 * HOUR, "device_id": "d2"},
            {"timestamp": T0 + 91 * DAY + HOUR, "device_id": "d1"},  # unused for 90 days + 1 h
            {"timestamp": T0 + 92 * DAY},  # no device
            {"customer_id": "c2", "timestamp": T0 + 2 * DAY, "device_id": "d1"},  # c2's first
            {"customer_id": "c2", "timestamp": saturday_late, "ip": "10.0.0.1"},
            {"customer_id": "c2", "timestamp": monday_early, "ip": "10.0.0.1"},
        ]
    )
    # Canonical order: c1@T0, c1@+1d, c1 d2, c1 d2, c1 d2 later, c2@+2d, sat, mon, c1@+91d, +92d
    assert column(t, "new_device_90d") == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, None, None, 1.0, None]
    assert column(t, "country_mismatch") == [0.0, 1.0, None, None, None, None, None, None, None, None]  # fmt: skip
    assert column(t, "hour_of_day") == [12.0, 12.0, 13.0, 13.0, 14.0, 12.0, 23.0, 0.0, 13.0, 12.0]
    assert column(t, "is_weekend") == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # The device shared by c1 and c2 counts its payments, whoever made them (T0 is exactly
    # 24 h before the second payment: in).
    assert column(t, "device_count_24h") == [0, 1, 0, 0, 2, 1, None, None, 0, None]
    assert column(t, "ip_count_7d") == [None] * 6 + [0.0, 1.0, None, None]
    assert same(by_public_api(t), batch_features(t)).all()


def test_late_payment_within_the_allowed_lateness_still_counts_online():
    state = OnlineFeatureState()
    rows = payments(
        [
            {"timestamp": T0, "amount": 1.0},
            {"timestamp": T0 + 30 * MINUTE, "amount": 2.0},  # arrives last
            {"timestamp": T0 + 40 * MINUTE, "amount": 4.0},
            {"timestamp": T0 + 50 * MINUTE, "amount": 8.0},
        ]
    )
    first, late, third, fourth = records(rows.table)
    state.ingest(first)
    state.ingest(third)
    state.ingest(late)
    values = dict(zip(FEATURE_NAMES, state.features(fourth), strict=True))
    assert values["customer_count_1h"] == 3.0
    assert values["customer_amount_sum_1h"] == 7.0
    assert not state.add_label("never-seen", T0)


# -- features: the seed's realistic data -----------------------------------------------------------
@pytest.fixture(scope="module")
def seeded_sample() -> Transactions:
    return seed_transactions(build(make_spec(scale=0.02, seed=7, end=dt.date(2026, 1, 1))))


def test_both_engines_agree_on_every_feature_of_every_generated_payment(seeded_sample):
    t = seeded_sample
    # The sample exercises what the features look at: frauds reported or not, merchant risk,
    # new devices, payments without device, country mismatches, bursts.
    label_time = t.table["label_time"].to_pylist()
    label = t.table["label"].to_pylist()
    assert t.num_rows == 20_000 and t.positives == 100
    assert any(lt is not None for lt in label_time)
    assert any(lt is None and lb == 1 for lt, lb in zip(label_time, label, strict=True))
    batch, online = batch_features(t), online_features(t)
    assert list(batch.columns) == list(FEATURE_NAMES) == list(online.columns)
    assert len(batch) == len(online) == t.num_rows
    disagree = {
        n: int(k) for n, k in zip(FEATURE_NAMES, (~same(batch, online)).sum(0), strict=True) if k
    }
    assert disagree == {}
    assert (batch["merchant_fraud_rate_28d_delay_7d"] > 0).sum() > 100
    assert set(batch["new_device_90d"].dropna()) == {0.0, 1.0}
    assert batch["device_count_1h"].isna().sum() > 0
    assert (batch["country_mismatch"] == 1).sum() > 100
    assert batch["customer_count_1h"].max() >= 5


def test_online_memory_is_bounded_by_the_longest_window(seeded_sample):
    t = seeded_sample
    state = OnlineFeatureState(allowed_lateness=dt.timedelta(0))
    online_features(t, state=state)
    ts = np.array(t.table["timestamp"].cast(pa.int64()).to_numpy())
    last = ts.max()
    day = 86_400_000_000

    def within(days: int) -> int:  # payments the state must keep for a window of `days`
        return int((ts >= last - days * day).sum())

    held = state.retained()
    assert held["customer"] == within(30)
    with_device = np.array(t.table["device_id"].is_valid())
    assert held["customer_device"] == int((with_device & (ts >= last - 90 * day)).sum())
    assert held["merchant"] == within(35)  # 28-day risk window + 7-day delay
    assert held["recent_payments"] == within(35)
    assert within(35) < t.num_rows / 10  # two years of history were ingested


# -- the definition's identity ----------------------------------------------------------------------
def test_feature_names_and_version_identify_the_definition():
    assert FEATURE_NAMES[:5] == (
        "amount",
        "hour_of_day",
        "is_weekend",
        "country_mismatch",
        "new_device_90d",
    )
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert feature_version(features.FEATURES) == FEATURE_VERSION
    changed = (*features.FEATURES[:-1], features.window("ip", "sum", hours=12))
    assert feature_version(changed) != FEATURE_VERSION
    check_compatible(FEATURE_VERSION, FEATURE_NAMES)
    with pytest.raises(FeatureMismatch, match="retrain"):
        check_compatible(feature_version(changed))
    with pytest.raises(FeatureMismatch, match="ip_amount_sum_24h"):
        check_compatible(FEATURE_VERSION, FEATURE_NAMES[:-1])
    with pytest.raises(ValueError, match="window"):
        features.FeatureSpec("window", "customer", "count")


# -- the contract on real parquet files ---------------------------------------------------------------
def good_rows() -> dict[str, list]:
    return {
        "transaction_id": [3, 1, 2],
        "timestamp": pa.array(
            [dt.datetime(2025, 1, 2), dt.datetime(2025, 1, 1), dt.datetime(2025, 1, 1, 6)],
            pa.timestamp("ns"),
        ),
        "customer_id": ["c1", "c2", "c1"],
        "terminal_id": [10, 11, 10],
        "amount": [12.5, 3, 7.25],
        "label": [True, False, False],
        "device_id": ["d1", None, ""],
        "country": [" fr", "DE", None],
        "notes": ["x", "y", "z"],
    }


def write(tmp_path: Path, columns: dict, name: str = "tx.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def test_a_valid_file_becomes_canonical(tmp_path):
    path = write(tmp_path, good_rows())
    t = read_transactions(path)
    assert t.table.schema == CANONICAL_SCHEMA
    assert t.table["transaction_id"].to_pylist() == ["1", "2", "3"]  # sorted by time
    assert t.table["timestamp"].to_pylist()[0] == dt.datetime(2025, 1, 1, tzinfo=UTC)
    assert t.table["merchant_id"].to_pylist() == ["11", "10", "10"]
    assert t.table["amount"].to_pylist() == [3.0, 7.25, 12.5]
    assert t.table["label"].to_pylist() == [0, 0, 1]
    assert t.table["device_id"].to_pylist() == [None, None, "d1"]  # empty = missing
    assert t.table["country"].to_pylist() == ["DE", None, "FR"]
    assert t.table["ip"].null_count == 3
    assert t.ignored_columns == ("notes",)
    assert t.notes() == ["ignored columns: notes", "terminal_id used as merchant_id"]
    assert t.positives == 1


def expect(error: type[PlatformError], path: Path, *fragments: str, **kwargs) -> PlatformError:
    with pytest.raises(error) as caught:
        read_transactions(path, **kwargs)
    message = str(caught.value)
    assert isinstance(caught.value, PlatformError)
    assert message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


def test_missing_columns_are_named(tmp_path):
    rows = good_rows()
    del rows["amount"]
    error = expect(MissingColumn, write(tmp_path, rows), "'amount'")
    assert error.column == "amount"
    rows = good_rows()
    del rows["terminal_id"]
    expect(MissingColumn, write(tmp_path, rows), "'merchant_id'", "terminal_id")
    rows = good_rows()
    rows["Amount"] = rows.pop("amount")
    expect(MissingColumn, write(tmp_path, rows), "'amount'", "found 'Amount'")
    rows = good_rows()
    del rows["label"]
    expect(MissingColumn, write(tmp_path, rows), "'label'")
    scored = read_transactions(write(tmp_path, rows), require_labels=False)  # optional to score
    assert scored.table["label"].null_count == 3


def test_mistyped_columns_say_what_was_found_and_expected(tmp_path):
    rows = good_rows()
    rows["amount"] = ["12.5", "3", "7.25"]
    error = expect(MistypedColumn, write(tmp_path, rows), "'amount'", "string", "number")
    assert (error.found, error.column) == ("string", "amount")
    rows = good_rows()
    rows["timestamp"] = ["2025-01-02", "2025-01-01", "2025-01-01"]
    expect(MistypedColumn, write(tmp_path, rows), "'timestamp'", "string", "timestamp")
    rows = good_rows()
    rows["terminal_id"] = [1.5, 2.5, 1.5]
    expect(MistypedColumn, write(tmp_path, rows), "'terminal_id'", "double", "string or")
    rows = good_rows()
    rows["label"] = [2, 0, 1]
    expect(InvalidValues, write(tmp_path, rows), "'label'", "0 or 1", "[2]")


def test_missing_values_in_a_required_column(tmp_path):
    rows = good_rows()
    rows["customer_id"] = ["c1", None, "c1"]
    expect(NullValues, write(tmp_path, rows), "'customer_id'", "1 missing", "row 2")
    rows = good_rows()
    rows["amount"] = [12.5, float("nan"), 1.0]
    expect(NullValues, write(tmp_path, rows), "'amount'")
    rows = good_rows()
    rows["label"] = [1, None, 0]
    expect(NullValues, write(tmp_path, rows), "'label'")
    assert read_transactions(write(tmp_path, rows), require_labels=False).num_rows == 3
    rows = good_rows()
    rows["amount"] = [12.5, float("inf"), 1.0]
    expect(InvalidValues, write(tmp_path, rows), "'amount'", "infinite")


def test_duplicate_ids_no_fraud_and_empty_files(tmp_path):
    rows = good_rows()
    rows["transaction_id"] = ["a", "b", "a"]
    expect(DuplicateTransactionIds, write(tmp_path, rows), "'transaction_id'", "['a']")
    rows = good_rows()
    rows["label"] = [0, 0, 0]
    expect(NoPositiveLabels, write(tmp_path, rows), "'label'", "no 1")
    assert read_transactions(write(tmp_path, rows), require_labels=False).positives == 0
    empty = pa.table(good_rows()).slice(0, 0)
    pq.write_table(empty, tmp_path / "empty.parquet")
    expect(EmptyTransactions, tmp_path / "empty.parquet", "no rows")
    (tmp_path / "notes.txt").write_text("transaction_id,amount\n1,2\n")
    expect(UnreadableFile, tmp_path / "notes.txt", "parquet")
    expect(UnreadableFile, tmp_path / "absent.parquet", "no such file")
    rows = good_rows()
    rows["merchant_id"] = rows["terminal_id"]
    expect(AmbiguousColumns, write(tmp_path, rows), "'merchant_id'", "'terminal_id'")


# -- the platform's own data ----------------------------------------------------------------------------
def test_the_platform_loader_reads_a_seeded_database(settings, database, docdb):
    s = settings.model_copy(update={"pg_database": database, "mongodb_database": docdb.name})
    data = build(make_spec(scale=0.003, seed=11, end=dt.date(2026, 1, 1), max_documents=100))
    seed_load.seed(s, data, docdb)

    t = load_platform_transactions(s)
    assert t.table.schema == CANONICAL_SCHEMA
    assert t.num_rows == 3_000
    labelled = {
        int(i) for i, lb in zip(t.table["transaction_id"].to_pylist(), t.table["label"].to_pylist(), strict=True) if lb
    }  # fmt: skip
    reports = fraud_reports(data)
    planted = set(data.transactions["id"].filter(pa.array(data.is_fraud == 1)).to_pylist())
    assert labelled == set(reports) and 0 < len(labelled) <= len(planted)
    assert labelled <= planted  # a fraud report is always a planted fraud
    # Everything else is the seed's own data, as the test helper derives it without SQL.
    expected = seed_transactions(data, labels="reported").table
    for name in CANONICAL_SCHEMA.names:
        if name != "amount":
            assert t.table[name].equals(expected[name]), name
    assert np.allclose(t.table["amount"].to_numpy(), expected["amount"].to_numpy(), rtol=1e-12)
    # Amounts in EUR at the warehouse's rates, checked on a payment in each foreign currency.
    foreign = 0
    for tid, currency, amount in zip(
        *(data.transactions[c].to_pylist() for c in ("id", "currencyid", "amount")), strict=True
    ):
        if currency in EUR_PER_UNIT:
            row = t.table["transaction_id"].to_pylist().index(str(tid))
            got = t.table["amount"][row].as_py()
            assert got == pytest.approx(float(amount) * EUR_PER_UNIT[currency], rel=1e-12)
            foreign += 1
    assert foreign > 0
    # A period reads only its payments.
    start, end = dt.datetime(2025, 6, 1, tzinfo=UTC), dt.datetime(2025, 7, 1, tzinfo=UTC)
    june = load_platform_transactions(s, start=start, end=end, require_labels=False)
    stamps = data.transactions["datetime"].to_pylist()
    assert june.num_rows == sum(start <= x < end for x in stamps) > 0


def test_the_platform_loader_on_an_empty_database(settings, database):
    s = settings.model_copy(update={"pg_database": database})
    with pytest.raises(EmptyTransactions, match=f"PostgreSQL database '{database}'"):
        load_platform_transactions(s)


def test_contract_module_documents_every_canonical_column():
    for name in CANONICAL_SCHEMA.names:
        assert f"\n{name} " in contract.__doc__, name
