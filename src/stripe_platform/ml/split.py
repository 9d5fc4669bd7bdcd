"""The time split: a training period, a gap for the label delay, then a held-back test period.

Payments are split by time, never at random: a model is used on payments after those it learned
from, and a random split would let it learn from a fraud burst's other payments. Periods are whole
UTC days, half-open (``start <= timestamp < end``)::

    train_start ........ train_end | gap (gap_days) | test_start ........ test_end

The gap is the label delay: a fraud is reported days or weeks after the payment, so when the
model is trained (at ``test_start``, the moment it would go live) the labels of the last payments
before it are not known yet. The gap keeps the test period from starting before those labels
could have been used, and training uses only the labels known at ``test_start``: a fraud whose
label time is later counts as legitimate in training (as it would in production), and these are
reported (``labels_not_yet_known``). The test period is judged on every label the data holds.

:class:`SplitSpec` is what the user sets (all optional): the first day of training and its
length, the gap and the test length. Defaults: the test period is the last ``test_days`` (90) days
of the data, the gap 7 days, training everything before the gap. With a training start and a
length, the periods follow one another from that start; with a start only, training runs up to
the gap before the last ``test_days``; with a length only, training ends at the gap.

:func:`split` resolves a spec against a canonical table and refuses (:class:`SplitError`, naming
the period and the option to change) a period without data, a training period without a known
fraud, and a test period without a fraud or without a legitimate payment (no metric is defined).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stripe_platform.errors import PlatformError
from stripe_platform.ml.contract import Transactions

DAY = dt.timedelta(days=1)
DEFAULT_GAP_DAYS = 7
DEFAULT_TEST_DAYS = 90


class SplitError(PlatformError, ValueError):
    """The split cannot be made on these data; the message names the period and the option."""


class EmptyPeriod(SplitError):
    """A period holds no payment."""


class NoPositivesInPeriod(SplitError):
    """A period holds no fraud (or, for the test period, no legitimate payment)."""


@dataclass(frozen=True)
class SplitSpec:
    """The user's split: ``train_start`` (a UTC day) and ``train_days``, ``gap_days`` (the label
    delay), ``test_days``. None means "from the data" (see the module's docstring)."""

    train_start: dt.date | None = None
    train_days: int | None = None
    gap_days: int = DEFAULT_GAP_DAYS
    test_days: int = DEFAULT_TEST_DAYS

    def __post_init__(self) -> None:
        if self.train_days is not None and self.train_days < 1:
            raise SplitError(f"--train-days {self.train_days}: at least 1 day of training")
        if self.gap_days < 0:
            raise SplitError(f"--gap-days {self.gap_days}: the gap cannot be negative")
        if self.test_days < 1:
            raise SplitError(f"--test-days {self.test_days}: at least 1 day of test")


@dataclass(frozen=True)
class Split:
    """A resolved split of one canonical table: the periods, and its rows in each.

    ``train_rows`` and ``test_rows`` are row positions in the table (sorted by time);
    ``train_labels`` are the labels known at ``test_start`` (0 for a fraud reported later),
    ``test_labels`` every label the data holds."""

    train_start: dt.datetime
    train_end: dt.datetime
    test_start: dt.datetime
    test_end: dt.datetime
    gap_days: int
    train_rows: np.ndarray
    test_rows: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray
    labels_not_yet_known: int

    @property
    def history_end(self) -> dt.datetime:
        """Rows before this are all the split's features read (later payments are not needed)."""
        return self.test_end

    def as_dict(self) -> dict[str, object]:
        return {
            "train_start": self.train_start.date().isoformat(),
            "train_end": self.train_end.date().isoformat(),
            "gap_days": self.gap_days,
            "test_start": self.test_start.date().isoformat(),
            "test_end": self.test_end.date().isoformat(),
            "train_rows": len(self.train_rows),
            "train_positives": int(self.train_labels.sum()),
            "labels_not_yet_known": self.labels_not_yet_known,
            "test_rows": len(self.test_rows),
            "test_positives": int(self.test_labels.sum()),
        }


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def _days(a: dt.datetime, b: dt.datetime) -> str:
    return f"{a.date()} .. {b.date()} (end excluded)"


def split(transactions: Transactions, spec: SplitSpec | None = None) -> Split:
    """Resolve ``spec`` (default :class:`SplitSpec`) on canonical, labelled ``transactions``."""
    spec = spec or SplitSpec()
    table = transactions.table
    ts = table["timestamp"]
    first = pc.min(ts).as_py()
    last = pc.max(ts).as_py()
    data_start, data_end = _midnight(first.date()), _midnight(last.date()) + DAY
    spans = f"the data runs from {first.date()} to {last.date()}"
    gap = spec.gap_days * DAY
    test = spec.test_days * DAY

    if spec.train_start is not None and spec.train_days is not None:
        train_start = _midnight(spec.train_start)
        train_end = train_start + spec.train_days * DAY
        test_start = train_end + gap
        test_end = test_start + test
    else:
        test_end = data_end
        test_start = test_end - test
        train_end = test_start - gap
        if spec.train_start is not None:
            train_start = _midnight(spec.train_start)
        elif spec.train_days is not None:
            train_start = train_end - spec.train_days * DAY
        else:
            train_start = data_start
    if train_end <= train_start:
        raise EmptyPeriod(
            f"no training period: training would be {_days(train_start, train_end)} "
            f"({spans}); shorten --test-days ({spec.test_days}) or --gap-days ({spec.gap_days}), "
            "or move --train-start earlier"
        )

    micros = ts.cast(pa.int64()).to_numpy()

    def rows(start: dt.datetime, end: dt.datetime) -> np.ndarray:
        lo, hi = _epoch_us(start), _epoch_us(end)
        return np.arange(np.searchsorted(micros, lo), np.searchsorted(micros, hi))

    train_rows, test_rows = rows(train_start, train_end), rows(test_start, test_end)
    for name, period_rows, start, end, option in (
        ("training", train_rows, train_start, train_end, "--train-start/--train-days"),
        ("test", test_rows, test_start, test_end, "--test-days/--train-start/--train-days"),
    ):
        if not len(period_rows):
            raise EmptyPeriod(
                f"the {name} period {_days(start, end)} holds no transaction ({spans}); "
                f"change {option}"
            )

    labels = table["label"].fill_null(0).to_numpy().astype(np.int8)
    known_at = pc.fill_null(table["label_time"].cast(pa.int64()), 0).to_numpy()
    train_all = labels[train_rows]
    # A fraud reported after the model would go live is not known when it is trained.
    train_labels = np.where(known_at[train_rows] < _epoch_us(test_start), train_all, 0)
    train_labels = train_labels.astype(np.int8)
    test_labels = labels[test_rows]
    if not train_labels.any():
        later = int(train_all.sum())
        why = f" ({later} reported only after {test_start.date()})" if later else ""
        raise NoPositivesInPeriod(
            f"the training period {_days(train_start, train_end)} holds no fraud known at "
            f"{test_start.date()}{why}: nothing to learn; lengthen --train-days or move "
            "--train-start",
        )
    if not test_labels.any():
        raise NoPositivesInPeriod(
            f"the test period {_days(test_start, test_end)} holds no fraud in "
            f"{len(test_rows)} transactions: no metric can be measured; lengthen --test-days"
        )
    if test_labels.all():
        raise NoPositivesInPeriod(
            f"the test period {_days(test_start, test_end)} holds only frauds: no metric can "
            "be measured; lengthen --test-days"
        )
    return Split(
        train_start=train_start,
        train_end=train_end,
        test_start=test_start,
        test_end=test_end,
        gap_days=spec.gap_days,
        train_rows=train_rows,
        test_rows=test_rows,
        train_labels=train_labels,
        test_labels=test_labels,
        labels_not_yet_known=int(train_all.sum() - train_labels.sum()),
    )


def _epoch_us(moment: dt.datetime) -> int:
    return (moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
