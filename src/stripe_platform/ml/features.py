"""The one feature definition, and the two engines that compute it with the same numbers.

The definition is declarative: :data:`FEATURES` is a tuple of :class:`FeatureSpec`; their names,
in that fixed order, are :data:`FEATURE_NAMES`, and :data:`FEATURE_VERSION` is a hash of the
specs (and of how they are interpreted, :data:`ENGINE_REVISION`). A model records the version it
was trained with; a scorer calls :func:`check_compatible` and refuses a mismatch.

Feature kinds (all values float64; NaN where a value cannot be known):

- ``amount``: the payment's amount.
- ``window`` (entity = customer | merchant | device | ip; aggregate = count | sum | mean |
  ratio): over the entity's payments with ``t - window <= timestamp < t``, where ``t`` is this
  payment's timestamp: their count, the sum or mean of their amounts, or this amount divided by
  that mean. Payments at the same instant as this one (and this one) are never included: only
  what happened strictly before is known. NaN when the payment has no such entity (no device, no
  IP); a mean or ratio over no payment is NaN, a count or sum 0.
- ``merchant_risk`` (window W, label delay d): the share of frauds among the merchant's payments
  with ``t - d - W <= timestamp < t - d``. Labels arrive late, so the window ends a delay before
  the payment; a fraud counts only once its label is known (``label_time < t``; a fraud without
  a label time is taken as known at ``timestamp + d``). This payment's own label is never used.
  NaN when the merchant had no payment in the window.
- ``hour_of_day`` (0-23, UTC), ``is_weekend`` (Saturday or Sunday, UTC).
- ``country_mismatch``: 1 when the billing country differs from the payment's country, 0 when
  they are equal, NaN when either is unknown.
- ``new_device`` (lookback L): 1 when the customer had not used this device in
  ``[t - L, t)``, 0 when they had, NaN without a device. "Seen in the lookback", not "ever seen",
  so online memory stays bounded by the longest window.

Amounts are summed exactly as integers in units of 1/10,000 (``AMOUNT_SCALE``), so both engines
add the same integers and apply the same final float operations (:func:`_finalize`, shared).

Engines:

- **Batch** (:func:`batch_features`): point in time from history, for training and batch
  scoring. DuckDB window functions over the canonical table (RANGE frames on the timestamp in
  microseconds: ``BETWEEN w PRECEDING AND 1 PRECEDING``), one ASOF join per merchant risk over
  the label events. Returns a DataFrame with columns ``FEATURE_NAMES``, row ``i`` for the table's
  row ``i``.
- **Online** (:class:`OnlineFeatureState`): ingests payments (:meth:`~OnlineFeatureState.ingest`)
  and label events (:meth:`~OnlineFeatureState.add_label`: transaction id, when the label became
  known) one at a time and returns the same vector for a new payment
  (:meth:`~OnlineFeatureState.features`, or :meth:`~OnlineFeatureState.update` = features then
  ingest). Memory is bounded by the longest window (plus ``allowed_lateness``): older entries are
  evicted as time advances. :meth:`~OnlineFeatureState.ingest_history` warms it from a canonical
  table; :func:`online_features` replays a canonical table through it (the proof that both
  engines agree).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from stripe_platform.errors import PlatformError
from stripe_platform.ml.contract import TransactionRecord, Transactions

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
AMOUNT_SCALE = 10_000  # amounts are summed as integers of 1/10,000: exact in both engines
ENGINE_REVISION = 1  # bump when the meaning of a spec changes without the specs changing

Entity = Literal["customer", "merchant", "device", "ip"]
Kind = Literal[
    "amount",
    "window",
    "merchant_risk",
    "hour_of_day",
    "weekend",
    "country_mismatch",
    "new_device",
]
Aggregate = Literal["count", "sum", "mean", "ratio"]

# The canonical columns that identify each entity. customer_device serves new_device only.
ENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "customer": ("customer_id",),
    "merchant": ("merchant_id",),
    "device": ("device_id",),
    "ip": ("ip",),
    "customer_device": ("customer_id", "device_id"),
}
ENTITIES = ("customer", "merchant", "device", "ip")
AGGREGATES = ("count", "sum", "mean", "ratio")


def _span(us: int) -> str:
    """A window's length as names show it: 1h, 24h, 7d, 90m."""
    if us % DAY_US == 0 and us >= 2 * DAY_US:
        return f"{us // DAY_US}d"
    if us % HOUR_US == 0:
        return f"{us // HOUR_US}h"
    if us % 60_000_000 == 0:
        return f"{us // 60_000_000}m"
    return f"{us / 1_000_000:g}s"


def _us(delta: dt.timedelta) -> int:
    return delta // dt.timedelta(microseconds=1)


@dataclass(frozen=True)
class FeatureSpec:
    """One feature. Build them with :func:`window`, :func:`merchant_risk`, :func:`new_device`
    and the constants (``AMOUNT``, ``HOUR_OF_DAY``, ``IS_WEEKEND``, ``COUNTRY_MISMATCH``)."""

    kind: Kind
    entity: Entity | None = None
    aggregate: Aggregate | None = None
    window: dt.timedelta | None = None
    delay: dt.timedelta | None = None

    def __post_init__(self) -> None:
        needs_window = self.kind in ("window", "merchant_risk", "new_device")
        if needs_window != (self.window is not None):
            raise ValueError(f"{self.kind}: a window is {'required' if needs_window else 'unused'}")
        if self.window is not None and (self.window <= dt.timedelta(0) or _us(self.window) < 1):
            raise ValueError(f"{self.kind}: the window must be positive")
        if (self.kind == "window") != (self.entity is not None and self.aggregate is not None):
            raise ValueError("entity and aggregate belong to window features only")
        if self.entity is not None and self.entity not in ENTITIES:
            raise ValueError(f"unknown entity {self.entity!r}; one of {ENTITIES}")
        if self.aggregate is not None and self.aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {self.aggregate!r}; one of {AGGREGATES}")
        if (self.kind == "merchant_risk") != (self.delay is not None):
            raise ValueError("a label delay belongs to merchant_risk only")
        if self.delay is not None and self.delay < dt.timedelta(0):
            raise ValueError("merchant_risk: the label delay cannot be negative")

    @property
    def window_us(self) -> int:
        assert self.window is not None
        return _us(self.window)

    @property
    def delay_us(self) -> int:
        assert self.delay is not None
        return _us(self.delay)

    @property
    def name(self) -> str:
        if self.kind == "window":
            what = "count" if self.aggregate == "count" else f"amount_{self.aggregate}"
            return f"{self.entity}_{what}_{_span(self.window_us)}"
        if self.kind == "merchant_risk":
            return f"merchant_fraud_rate_{_span(self.window_us)}_delay_{_span(self.delay_us)}"
        if self.kind == "new_device":
            return f"new_device_{_span(self.window_us)}"
        return {"weekend": "is_weekend"}.get(self.kind, self.kind)

    def as_dict(self) -> dict[str, object]:
        """What the version hashes: everything that changes the feature's value."""
        return {
            "name": self.name,
            "kind": self.kind,
            "entity": self.entity,
            "aggregate": self.aggregate,
            "window_us": self.window_us if self.window is not None else None,
            "delay_us": self.delay_us if self.delay is not None else None,
        }


def window(
    entity: Entity, aggregate: Aggregate, *, hours: float = 0, days: float = 0
) -> FeatureSpec:
    return FeatureSpec("window", entity, aggregate, window=dt.timedelta(hours=hours, days=days))


def merchant_risk(*, days: float, delay_days: float) -> FeatureSpec:
    return FeatureSpec(
        "merchant_risk", window=dt.timedelta(days=days), delay=dt.timedelta(days=delay_days)
    )


def new_device(*, days: float) -> FeatureSpec:
    return FeatureSpec("new_device", window=dt.timedelta(days=days))


AMOUNT = FeatureSpec("amount")
HOUR_OF_DAY = FeatureSpec("hour_of_day")
IS_WEEKEND = FeatureSpec("weekend")
COUNTRY_MISMATCH = FeatureSpec("country_mismatch")

FEATURES: tuple[FeatureSpec, ...] = (
    AMOUNT,
    HOUR_OF_DAY,
    IS_WEEKEND,
    COUNTRY_MISMATCH,
    new_device(days=90),
    # The customer (card): velocity bursts (card testing), spend against their habit.
    window("customer", "count", hours=1),
    window("customer", "count", hours=24),
    window("customer", "count", days=7),
    window("customer", "count", days=30),
    window("customer", "sum", hours=1),
    window("customer", "sum", hours=24),
    window("customer", "mean", days=30),
    window("customer", "ratio", days=30),
    # The merchant (or terminal): its volume, its usual ticket, its recent fraud.
    window("merchant", "count", hours=1),
    window("merchant", "count", hours=24),
    window("merchant", "count", days=7),
    window("merchant", "mean", days=7),
    merchant_risk(days=7, delay_days=7),
    merchant_risk(days=28, delay_days=7),
    # The device and the IP: shared by many cards, bursts.
    window("device", "count", hours=1),
    window("device", "count", hours=24),
    window("device", "count", days=7),
    window("device", "sum", hours=24),
    window("ip", "count", hours=1),
    window("ip", "count", hours=24),
    window("ip", "count", days=7),
    window("ip", "sum", hours=24),
)


class FeatureMismatch(PlatformError, ValueError):
    """A model was trained with another feature definition than the one this code computes."""


def feature_version(specs: Sequence[FeatureSpec] = FEATURES) -> str:
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"feature names must be unique: {twice}")
    payload = json.dumps(
        {
            "revision": ENGINE_REVISION,
            "amount_scale": AMOUNT_SCALE,
            "features": [s.as_dict() for s in specs],
        },
        sort_keys=True,
    )
    return f"fv{ENGINE_REVISION}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


FEATURE_NAMES: tuple[str, ...] = tuple(s.name for s in FEATURES)
FEATURE_VERSION: str = feature_version(FEATURES)


def check_compatible(version: str, names: Sequence[str] | None = None) -> None:
    """Refuse a model whose recorded feature version (and names, when given) differ from the
    features this code computes."""
    if version != FEATURE_VERSION or (names is not None and tuple(names) != FEATURE_NAMES):
        detail = ""
        if names is not None and tuple(names) != FEATURE_NAMES:
            missing = [n for n in FEATURE_NAMES if n not in names]
            extra = [n for n in names if n not in FEATURE_NAMES]
            detail = f" (features missing from the model: {missing}, unknown here: {extra})"
        raise FeatureMismatch(
            f"the model was trained with features {version}, this code computes "
            f"{FEATURE_VERSION}{detail}: retrain it (stripe-platform ml train)"
        )


# -- what both engines compute: raw point-in-time quantities, then the shared finishing -------------
def _count_key(entity: str, window_us: int) -> str:
    return f"count__{entity}__{window_us}"


def _sum_key(entity: str, window_us: int) -> str:
    return f"sum__{entity}__{window_us}"


def _risk_keys(window_us: int, delay_us: int) -> tuple[str, str]:
    return f"risk_frauds__{window_us}__{delay_us}", f"risk_payments__{window_us}__{delay_us}"


def _windows(specs: Iterable[FeatureSpec]) -> list[tuple[str, int, bool]]:
    """The (entity, window, needs its amount sum) aggregates the specs read, each once."""
    found: dict[tuple[str, int], bool] = {}
    for s in specs:
        if s.kind == "window":
            key = (str(s.entity), s.window_us)
            found[key] = found.get(key, False) or s.aggregate != "count"
        elif s.kind == "new_device":
            found.setdefault(("customer_device", s.window_us), False)
    return [(e, w, needs_sum) for (e, w), needs_sum in found.items()]


def _risks(specs: Iterable[FeatureSpec]) -> list[tuple[int, int]]:
    return list(
        dict.fromkeys((s.window_us, s.delay_us) for s in specs if s.kind == "merchant_risk")
    )


def amount_units(amount: np.ndarray | float) -> np.ndarray:
    """Amounts as integers of 1/AMOUNT_SCALE (half to even), as both engines sum them."""
    return np.rint(np.asarray(amount, np.float64) * AMOUNT_SCALE).astype(np.int64)


def _finalize(specs: Sequence[FeatureSpec], raw: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """Feature values (n x len(specs), float64) from the engines' raw quantities: the same
    arithmetic, in the same order, for both engines."""
    out = np.empty((n, len(specs)), np.float64)
    nan = np.float64("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        for j, s in enumerate(specs):
            if s.kind == "amount":
                out[:, j] = raw["units"] / AMOUNT_SCALE
            elif s.kind == "hour_of_day":
                out[:, j] = (raw["ts"] // HOUR_US) % 24
            elif s.kind == "weekend":
                # Day 0 (1970-01-01) was a Thursday: +3 makes Monday 0, Saturday 5, Sunday 6.
                out[:, j] = (raw["ts"] // DAY_US + 3) % 7 >= 5
            elif s.kind == "country_mismatch":
                country, billing = raw["country"], raw["billing_country"]
                known = pd.notna(country) & pd.notna(billing)
                out[:, j] = np.where(known, country != billing, nan)
            elif s.kind == "new_device":
                seen = raw[_count_key("customer_device", s.window_us)]
                out[:, j] = np.where(np.isnan(seen), nan, seen == 0)
            elif s.kind == "merchant_risk":
                frauds, payments = (raw[k] for k in _risk_keys(s.window_us, s.delay_us))
                out[:, j] = np.where(payments > 0, frauds / payments, nan)
            else:
                count = raw[_count_key(str(s.entity), s.window_us)]
                if s.aggregate == "count":
                    out[:, j] = count
                    continue
                total = raw[_sum_key(str(s.entity), s.window_us)] / AMOUNT_SCALE
                if s.aggregate == "sum":
                    out[:, j] = total
                    continue
                mean = np.where(count > 0, total / count, nan)
                if s.aggregate == "mean":
                    out[:, j] = mean
                else:  # ratio: this amount over the entity's mean
                    amount = raw["units"] / AMOUNT_SCALE
                    out[:, j] = np.where(mean != 0, amount / mean, nan)
    return out


def _frame(values: np.ndarray, specs: Sequence[FeatureSpec]) -> pd.DataFrame:
    return pd.DataFrame(values, columns=[s.name for s in specs])


def _table(transactions: Transactions | pa.Table) -> pa.Table:
    return transactions.table if isinstance(transactions, Transactions) else transactions


# -- batch engine: DuckDB over the canonical table ------------------------------------------------
def _codes(column: pa.ChunkedArray) -> pa.Array:
    """Dense integer codes for an id column (null stays null): DuckDB partitions integers
    faster than strings."""
    return pc.dictionary_encode(column.combine_chunks()).indices


def _frame_sql(keys: Sequence[str], lo_us: int, hi_us: int) -> str:
    """A RANGE frame over the microsecond timestamp: payments with t - lo <= ts < t - hi + 1."""
    return (
        f"(PARTITION BY {', '.join(keys)} ORDER BY ts "
        f"RANGE BETWEEN {lo_us} PRECEDING AND {hi_us} PRECEDING)"
    )


def batch_sql(specs: Sequence[FeatureSpec] = FEATURES) -> str:
    """The DuckDB query over relation ``tx`` (row, ts, customer_id, merchant_id, device_id, ip
    as integer codes, units, label, label_ts) that returns the raw quantities, ordered by row."""
    columns = []
    for entity, w, needs_sum in _windows(specs):
        keys = ENTITY_KEYS[entity]
        frame = _frame_sql(keys, w, 1)
        absent = " OR ".join(f"{k} IS NULL" for k in keys)
        columns.append(
            f"CASE WHEN {absent} THEN NULL ELSE CAST(count(*) OVER {frame} AS DOUBLE) END"
            f" AS {_count_key(entity, w)}"
        )
        if needs_sum:
            columns.append(
                f"CASE WHEN {absent} THEN NULL "
                f"ELSE CAST(coalesce(sum(units) OVER {frame}, 0) AS DOUBLE) END"
                f" AS {_sum_key(entity, w)}"
            )
    ctes, joins, picks = [], [], []
    for i, (w, d) in enumerate(_risks(specs)):
        frauds, payments = _risk_keys(w, d)
        columns.append(
            f"CAST(count(*) OVER {_frame_sql(['merchant_id'], d + w, d + 1)} AS DOUBLE)"
            f" AS {payments}"
        )
        # A fraud counts for payments at t with start < t <= end: its label known before t
        # (start), its payment inside [t - d - w, t - d). A running sum of +1 at each start and
        # -1 at each end, read just before t, is the number counting at t.
        ctes.append(
            f"""risk{i} AS (
    SELECT merchant_id, moment, sum(step) OVER (PARTITION BY merchant_id ORDER BY moment
        RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS open
    FROM (
        SELECT merchant_id, unnest([start_us, end_us]) AS moment, unnest([1, -1]) AS step
        FROM (SELECT merchant_id, greatest(ts + {d}, coalesce(label_ts, ts + {d})) AS start_us,
                     ts + {d} + {w} AS end_us
              FROM tx WHERE label = 1)
        WHERE start_us < end_us
    )
)"""
        )
        joins.append(
            f"ASOF LEFT JOIN risk{i} ON risk{i}.merchant_id = base.merchant_id "
            f"AND base.ts > risk{i}.moment"
        )
        picks.append(f"CAST(coalesce(risk{i}.open, 0) AS DOUBLE) AS {frauds}")
    base = f"SELECT row, ts, merchant_id{''.join(', ' + c for c in columns)} FROM tx"
    with_ = ",\n".join([f"base AS ({base})", *ctes])
    return (
        f"WITH {with_}\nSELECT base.*{''.join(', ' + p for p in picks)} FROM base "
        f"{' '.join(joins)} ORDER BY row"
    )


def batch_features(
    transactions: Transactions | pa.Table,
    specs: Sequence[FeatureSpec] = FEATURES,
    *,
    threads: int | None = None,
) -> pd.DataFrame:
    """Point-in-time features of every payment of a canonical table, from the table's own
    history: a DataFrame with one float64 column per spec (``FEATURE_NAMES`` by default), row
    ``i`` for the table's row ``i``."""
    import duckdb

    table = _table(transactions)
    n = table.num_rows
    if n == 0:
        return _frame(np.empty((0, len(specs))), specs)
    ts = table["timestamp"].combine_chunks().cast(pa.int64())
    units = amount_units(table["amount"].to_numpy())
    tx = pa.table(
        {
            "row": pa.array(np.arange(n, dtype=np.int64)),
            "ts": ts,
            **{k: _codes(table[k]) for k in ("customer_id", "merchant_id", "device_id", "ip")},
            "units": pa.array(units),
            "label": table["label"],
            "label_ts": table["label_time"].cast(pa.int64()),
        }
    )
    raw: dict[str, np.ndarray] = {
        "units": units,
        "ts": ts.to_numpy(),
        "country": table["country"].to_numpy(),
        "billing_country": table["billing_country"].to_numpy(),
    }
    needs_sql = bool(_windows(specs) or _risks(specs))
    if needs_sql and n:
        con = duckdb.connect()
        try:
            if threads is not None:
                con.execute(f"SET threads = {int(threads)}")
            con.register("tx", tx)
            result = con.sql(batch_sql(specs)).to_arrow_table()
        finally:
            con.close()
        for name in result.column_names:
            if name.startswith(("count__", "sum__", "risk_")):
                raw[name] = result[name].to_numpy().astype(np.float64)  # NULL -> NaN
    return _frame(_finalize(specs, raw, n), specs)


# -- online engine -----------------------------------------------------------------------------------
class _Series:
    """One entity's payments within its horizon: sorted timestamps and running integer sums of
    their amount units (so any window's count and sum are two binary searches)."""

    __slots__ = ("cum", "start", "ts")

    def __init__(self) -> None:
        self.ts: list[int] = []
        self.cum: list[int] = [0]  # cum[i] = units of ts[:i] (plus what was evicted before)
        self.start = 0  # entries before it are evicted

    def add(self, t: int, units: int) -> None:
        ts, cum = self.ts, self.cum
        if not ts or t >= ts[-1]:
            ts.append(t)
            cum.append(cum[-1] + units)
            return
        i = bisect_right(ts, t, self.start)  # late arrival: keep the order, shift the sums
        ts.insert(i, t)
        cum.insert(i + 1, cum[i] + units)
        for k in range(i + 2, len(cum)):
            cum[k] += units

    def window(self, lo: int, hi: int) -> tuple[int, int]:
        """(count, units) of entries with lo <= ts < hi."""
        a = bisect_left(self.ts, lo, self.start)
        b = bisect_left(self.ts, hi, a)
        return b - a, self.cum[b] - self.cum[a]

    def evict(self, cutoff: int) -> None:
        self.start = bisect_left(self.ts, cutoff, self.start)
        if self.start > 64 and 2 * self.start > len(self.ts):
            del self.ts[: self.start]
            del self.cum[: self.start]
            self.start = 0

    def __len__(self) -> int:
        return len(self.ts) - self.start


@dataclass
class _Recent:
    merchant: str
    ts: int
    labelled: bool = False


@dataclass
class _EntityState:
    horizon: int
    series: dict[object, _Series] = field(default_factory=dict)
    order: deque[tuple[int, object]] = field(default_factory=deque)  # (ts, key), to evict


def _epoch_us(moment: dt.datetime) -> int:
    if moment.tzinfo is None:  # naive = UTC, as in the contract
        moment = moment.replace(tzinfo=dt.UTC)
    return (moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


class OnlineFeatureState:
    """Feature state fed one event at a time; gives the same vector as :func:`batch_features`
    for a payment once it has ingested everything before it (payments and label events).

    Events may arrive up to ``allowed_lateness`` out of order without changing any value; state
    is kept for the longest window (plus that lateness) behind the latest payment seen.
    """

    def __init__(
        self,
        specs: Sequence[FeatureSpec] = FEATURES,
        *,
        allowed_lateness: dt.timedelta = dt.timedelta(hours=1),
    ) -> None:
        self.specs = tuple(specs)
        self.names = tuple(s.name for s in self.specs)
        self._lateness = _us(allowed_lateness)
        self._windows = _windows(self.specs)
        self._risks = _risks(self.specs)
        horizons: dict[str, int] = {}
        for entity, w, _ in self._windows:
            horizons[entity] = max(horizons.get(entity, 0), w)
        risk_horizon = max((d + w for w, d in self._risks), default=0)
        if self._risks:
            horizons["merchant"] = max(horizons.get("merchant", 0), risk_horizon)
        self._entities = {e: _EntityState(h + self._lateness) for e, h in horizons.items()}
        self._risk_horizon = risk_horizon + self._lateness
        self._recent: dict[str, _Recent] = {}  # payments a label event may still name
        self._recent_order: deque[tuple[int, str]] = deque()
        # per risk spec: merchant -> [(start, end)] of frauds counting for start < t <= end
        self._frauds: list[dict[str, list[tuple[int, int]]]] = [{} for _ in self._risks]
        self._fraud_order: deque[tuple[int, int, str]] = deque()  # (end, spec, merchant)
        self._now: int | None = None

    # -- public API --------------------------------------------------------------------------
    def features(self, tx: TransactionRecord) -> np.ndarray:
        """This payment's feature vector (``FEATURE_NAMES`` order) from what was ingested; the
        payment itself is not ingested."""
        return self.finalize([self.record_raw(tx)])[0]

    def ingest(self, tx: TransactionRecord) -> None:
        """Remember a payment (for the features of those after it)."""
        self._ingest(
            tx.transaction_id,
            _epoch_us(tx.timestamp),
            int(amount_units(tx.amount)),
            tx.customer_id,
            tx.merchant_id,
            tx.device_id,
            tx.ip,
        )

    def update(self, tx: TransactionRecord) -> np.ndarray:
        """The stream's one call per payment: its features, then it is ingested."""
        values = self.features(tx)
        self.ingest(tx)
        return values

    def add_label(self, transaction_id: str, known_at: dt.datetime) -> bool:
        """A fraud label became known at ``known_at`` for an ingested payment. Returns False
        (and changes nothing) when the payment is unknown or already out of every window, or
        already labelled (the first label counts)."""
        return self._add_label(transaction_id, _epoch_us(known_at))

    def ingest_history(self, transactions: Transactions | pa.Table) -> None:
        """Warm the state from a canonical table (the recent history, e.g. the platform's last
        weeks): every payment in order, then every fraud label with the time it became known,
        which may be after later payments (a label counts only for payments after that time)."""
        table = _table(transactions)
        ts = table["timestamp"].cast(pa.int64()).to_pylist()
        units = amount_units(table["amount"].to_numpy()).tolist()
        cols = [
            table[k].to_pylist()
            for k in ("transaction_id", "customer_id", "merchant_id", "device_id", "ip")
        ]
        for tid, t, u, customer, merchant, device, ip in zip(
            cols[0], ts, units, *cols[1:], strict=True
        ):
            self._ingest(tid, t, u, customer, merchant, device, ip)
        label_rows, label_known = _label_events(table)
        for r, known in zip(label_rows.tolist(), label_known.tolist(), strict=True):
            self._add_label(cols[0][r], known)

    def retained(self) -> dict[str, int]:
        """Entries held per entity (and payments a label may still name): memory, for tests."""
        held = {e: sum(len(s) for s in st.series.values()) for e, st in self._entities.items()}
        held["recent_payments"] = len(self._recent)
        held["frauds"] = sum(len(v) for per in self._frauds for v in per.values())
        return held

    # -- internals ---------------------------------------------------------------------------
    def _key(
        self, entity: str, customer: str, merchant: str, device: str | None, ip: str | None
    ) -> object:
        if entity == "customer":
            return customer
        if entity == "merchant":
            return merchant
        if entity == "device":
            return device
        if entity == "ip":
            return ip
        return None if device is None else (customer, device)

    def raw(
        self,
        t: int,
        units: int,
        customer: str,
        merchant: str,
        device: str | None,
        ip: str | None,
        country: str | None,
        billing: str | None,
    ) -> dict[str, object]:
        """A payment's raw quantities (counts, sums, its own values) from the state as it is;
        :meth:`finalize` turns those of many payments into their feature rows at once. The
        stream takes each payment's raw quantities in order (ingesting between them) and
        finalizes a whole batch: numpy's cost per call is paid once per batch, not per payment."""
        raw: dict[str, object] = {
            "units": units,
            "ts": t,
            "country": country,
            "billing_country": billing,
        }
        nan = float("nan")
        for entity, w, needs_sum in self._windows:
            key = self._key(entity, customer, merchant, device, ip)
            if key is None:
                count, total = nan, nan
            else:
                series = self._entities[entity].series.get(key)
                count, total = series.window(t - w, t) if series is not None else (0, 0)
            raw[_count_key(entity, w)] = count
            if needs_sum:
                raw[_sum_key(entity, w)] = total
        merchants = self._entities["merchant"].series if self._risks else {}
        for i, (w, d) in enumerate(self._risks):
            frauds_key, payments_key = _risk_keys(w, d)
            series = merchants.get(merchant)
            payments = series.window(t - d - w, t - d)[0] if series is not None else 0
            frauds = sum(1 for a, b in self._frauds[i].get(merchant, ()) if a < t <= b)
            raw[frauds_key] = frauds
            raw[payments_key] = payments
        return raw

    def record_raw(self, tx: TransactionRecord) -> dict[str, object]:
        """:meth:`raw` of a payment record (nothing is ingested)."""
        return self.raw(
            _epoch_us(tx.timestamp),
            int(amount_units(tx.amount)),
            tx.customer_id,
            tx.merchant_id,
            tx.device_id,
            tx.ip,
            tx.country,
            tx.billing_country,
        )

    def finalize(self, raws: Sequence[Mapping[str, object]]) -> np.ndarray:
        """Feature rows (``len(raws)`` x ``len(specs)``) from :meth:`raw` quantities: the batch
        engine's own final arithmetic (:func:`_finalize`), so values are bit-identical."""
        n = len(raws)
        if n == 0:
            return np.empty((0, len(self.specs)), np.float64)
        columns: dict[str, np.ndarray] = {}
        for key in raws[0]:
            values = [r[key] for r in raws]
            if key in ("units", "ts"):
                columns[key] = np.array(values, np.int64)
            elif key in ("country", "billing_country"):
                columns[key] = np.array(values, object)
            else:
                columns[key] = np.array(values, np.float64)
        return _finalize(self.specs, columns, n)

    def _ingest(
        self,
        transaction_id: str,
        t: int,
        units: int,
        customer: str,
        merchant: str,
        device: str | None,
        ip: str | None,
    ) -> None:
        for entity, state in self._entities.items():
            key = self._key(entity, customer, merchant, device, ip)
            if key is None:
                continue
            series = state.series.get(key)
            if series is None:
                series = state.series[key] = _Series()
            series.add(t, units)
            state.order.append((t, key))
        if self._risks:
            self._recent[transaction_id] = _Recent(merchant, t)
            self._recent_order.append((t, transaction_id))
        if self._now is None or t > self._now:
            self._now = t
            self._evict()

    def _add_label(self, transaction_id: str, known: int) -> bool:
        recent = self._recent.get(transaction_id)
        if recent is None or recent.labelled:
            return False
        recent.labelled = True
        for i, (w, d) in enumerate(self._risks):
            start, end = max(recent.ts + d, known), recent.ts + d + w
            if start < end:
                self._frauds[i].setdefault(recent.merchant, []).append((start, end))
                self._fraud_order.append((end, i, recent.merchant))
        return True

    def _evict(self) -> None:
        now = self._now
        assert now is not None
        for state in self._entities.values():
            cutoff = now - state.horizon
            order, series = state.order, state.series
            while order and order[0][0] < cutoff:
                _, key = order.popleft()
                entry = series.get(key)
                if entry is not None:
                    entry.evict(cutoff)
                    if not len(entry):
                        del series[key]
        cutoff = now - self._risk_horizon
        while self._recent_order and self._recent_order[0][0] < cutoff:
            _, transaction_id = self._recent_order.popleft()
            recent = self._recent.get(transaction_id)
            if recent is not None and recent.ts < cutoff:
                del self._recent[transaction_id]
        # A fraud stops counting once every payment still to come is past its end.
        done = now - self._lateness
        while self._fraud_order and self._fraud_order[0][0] < done:
            _, i, merchant = self._fraud_order.popleft()
            kept = [(a, b) for a, b in self._frauds[i].get(merchant, ()) if b >= done]
            if kept:
                self._frauds[i][merchant] = kept
            else:
                self._frauds[i].pop(merchant, None)


def _label_events(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(rows, known_us) of the table's frauds: known at label_time, or at the payment when the
    label time is unknown (the merchant risk then counts it from timestamp + delay)."""
    positive = np.flatnonzero(pc.fill_null(pc.equal(table["label"], 1), False).to_numpy())
    ts = table["timestamp"].cast(pa.int64())
    known = pc.coalesce(table["label_time"].cast(pa.int64()), ts).to_numpy()
    return positive, np.maximum(known[positive], ts.to_numpy()[positive])


def online_features(
    transactions: Transactions | pa.Table,
    specs: Sequence[FeatureSpec] = FEATURES,
    *,
    state: OnlineFeatureState | None = None,
) -> pd.DataFrame:
    """Replay a canonical table through an :class:`OnlineFeatureState` (payments in order, each
    label event at the time it became known) and return every payment's features as computed
    online, in the table's row order: the same frame :func:`batch_features` returns."""
    table = _table(transactions)
    state = state or OnlineFeatureState(specs)
    n = table.num_rows
    ts = table["timestamp"].cast(pa.int64()).to_numpy()
    label_rows, label_known = _label_events(table)
    # Events in time order; at equal times payments first, so a label known at t is ingested
    # after the payment it names (it counts only for payments after t anyway).
    times = np.concatenate([ts, label_known])
    kinds = np.concatenate([np.zeros(n, np.int8), np.ones(len(label_rows), np.int8)])
    rows = np.concatenate([np.arange(n), label_rows])
    order = np.lexsort((rows, kinds, times))
    units = amount_units(table["amount"].to_numpy()).tolist()
    cols = {
        k: table[k].to_pylist()
        for k in (
            "transaction_id",
            "customer_id",
            "merchant_id",
            "device_id",
            "ip",
            "country",
            "billing_country",
        )
    }
    raws: list[dict[str, object]] = [{}] * n
    ids, customers, merchants = cols["transaction_id"], cols["customer_id"], cols["merchant_id"]
    devices, ips = cols["device_id"], cols["ip"]
    for k in order.tolist():
        r = rows[k]
        if kinds[k]:
            state._add_label(ids[r], int(times[k]))
            continue
        t = int(ts[r])
        raws[r] = state.raw(
            t,
            units[r],
            customers[r],
            merchants[r],
            devices[r],
            ips[r],
            cols["country"][r],
            cols["billing_country"][r],
        )
        state._ingest(ids[r], t, units[r], customers[r], merchants[r], devices[r], ips[r])
    return _frame(state.finalize(raws), state.specs)
