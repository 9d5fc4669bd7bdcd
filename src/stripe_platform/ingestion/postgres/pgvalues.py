"""PostgreSQL values as the raw layer's Arrow values: the one conversion every reader of a
PostgreSQL source goes through, so a value lands the same whichever way it was read.

Snapshots read COPY binary (:mod:`pgcopy`); change data arrives as the server's text (pgoutput,
decoded by :mod:`pgoutput` into Python values); full-refresh tables and TOAST read-backs are query
rows loaded as that same text. Per type:

- timestamp, timestamptz, date: PostgreSQL's own integer form (microseconds or days since
  2000-01-01, ±infinity its sentinels) becomes Arrow's by :func:`timestamps` / :func:`dates`;
  the server's text is parsed into that integer form first (:func:`parse_timestamp`,
  :func:`parse_date`, which BC dates and years past 9999 need: Python's datetime stops at
  years 1-9999). ±infinity become the raw layer's first and last instants (0001-01-01,
  9999-12-31 23:59:59.999999), as they always have; a value outside the raw layer's range (BC,
  year 10000 on) is kept as Arrow holds it and the writer nulls and records it
  (``raw.prepare``).
- numeric: the text ``numeric_out`` writes (the snapshot reader writes the same from the binary
  form), cast to the destination's decimal by the caller (engine ``_typed``, then the writer);
  ``NaN``, ``±Infinity`` and values with more digits than the decimal holds are nulled and
  recorded there.
- float4, float8: IEEE doubles, ``NaN`` and ``±Infinity`` included (every destination holds them).
- the rest as :func:`column` says.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stripe_platform.rawlayer import (
    ARROW,
    FIRST_DATE_DAYS,
    FIRST_TIMESTAMP_US,
    LAST_DATE_DAYS,
    LAST_TIMESTAMP_US,
    Column,
)

__all__ = [
    "DATE_INFINITY",
    "DATE_MINUS_INFINITY",
    "TIMESTAMP_INFINITY",
    "TIMESTAMP_MINUS_INFINITY",
    "column",
    "dates",
    "from_text",
    "parse_date",
    "parse_timestamp",
    "table",
    "timestamps",
]

# PostgreSQL counts from 2000-01-01, Arrow from 1970-01-01.
PG_EPOCH_US: Final = 946_684_800_000_000
PG_EPOCH_DAYS: Final = 10_957
# ±infinity in PostgreSQL's binary forms (int64 microseconds, int32 days).
TIMESTAMP_INFINITY: Final = 2**63 - 1
TIMESTAMP_MINUS_INFINITY: Final = -(2**63)
DATE_INFINITY: Final = 2**31 - 1
DATE_MINUS_INFINITY: Final = -(2**31)
# Past it, shifting to Arrow's epoch overflows int64: PostgreSQL's timestamps go to 294276 AD,
# Arrow's microseconds to 294247-01-10.
_LAST_SHIFTABLE_US: Final = 2**63 - 1 - PG_EPOCH_US
_ARROW_LAST_US: Final = 2**63 - 1


def _from_buffers(type_: pa.DataType, values: np.ndarray, valid: np.ndarray | None) -> pa.Array:
    mask = None
    if valid is not None and not valid.all():
        mask = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(type_, len(values), [mask, pa.py_buffer(values)])


def timestamps(pg_us: np.ndarray, valid: np.ndarray | None, type_: pa.DataType) -> pa.Array:
    """Timestamps in PostgreSQL's form (int64 microseconds since 2000-01-01, UTC for
    timestamptz) as an Arrow ``timestamp('us'[, 'UTC'])`` array. ``valid`` marks non-NULLs (None:
    all). ±infinity become the raw layer's last and first instants; an instant past Arrow's range
    becomes Arrow's last one, which is outside the raw layer's range as well: the writer nulls it
    and records it."""
    values = np.asarray(pg_us, np.int64)
    with np.errstate(over="ignore"):  # the wrapped values are replaced below
        out = values + PG_EPOCH_US
    out[values > _LAST_SHIFTABLE_US] = _ARROW_LAST_US
    out[values == TIMESTAMP_INFINITY] = LAST_TIMESTAMP_US
    out[values == TIMESTAMP_MINUS_INFINITY] = FIRST_TIMESTAMP_US
    return _from_buffers(type_, out, valid)


def dates(pg_days: np.ndarray, valid: np.ndarray | None) -> pa.Array:
    """Dates in PostgreSQL's form (days since 2000-01-01) as an Arrow ``date32`` array: every
    PostgreSQL date fits (4713 BC to 5874897 AD); ±infinity become the raw layer's last and first
    days."""
    values = np.asarray(pg_days, np.int64)
    out = (values + PG_EPOCH_DAYS).astype(np.int32)
    out[values == DATE_INFINITY] = LAST_DATE_DAYS
    out[values == DATE_MINUS_INFINITY] = FIRST_DATE_DAYS
    return _from_buffers(pa.date32(), out, valid)


# The server's ISO DateStyle output: year (4 digits or more), month, day, optional time with up to
# six fraction digits, optional UTC offset (+hh[:mm[:ss]]), " BC" for years before 1.
_ISO = re.compile(
    r"(\d{4,})-(\d\d)-(\d\d)"
    r"(?: (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?"
    r"(?:([+-])(\d\d)(?::(\d\d)(?::(\d\d))?)?)?"
    r"( BC)?"
)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (astronomical year: 0 is 1 BC)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def _parse(text: str) -> tuple[int, int]:
    """(days since 1970-01-01, microseconds into that day, offset applied) of ISO text."""
    match = _ISO.fullmatch(text)
    if match is None:
        raise ValueError(f"not a date or timestamp in the ISO DateStyle: {text!r}")
    year, month, day = int(match[1]), int(match[2]), int(match[3])
    if match[12]:
        year = 1 - year  # 1 BC is year 0
    us = 0
    if match[4] is not None:
        seconds = int(match[4]) * 3600 + int(match[5]) * 60 + int(match[6])
        us = seconds * 1_000_000 + int((match[7] or "").ljust(6, "0"))
    if match[8] is not None:
        offset = int(match[9]) * 3600 + int(match[10] or 0) * 60 + int(match[11] or 0)
        us -= (offset if match[8] == "+" else -offset) * 1_000_000
    return _days_from_civil(year, month, day), us


def parse_timestamp(text: str) -> int:
    """The server's text of a timestamp or timestamptz (ISO DateStyle) in PostgreSQL's binary
    form, microseconds since 2000-01-01 (UTC for a timestamptz): what COPY binary sends."""
    if text == "infinity":
        return TIMESTAMP_INFINITY
    if text == "-infinity":
        return TIMESTAMP_MINUS_INFINITY
    days, us = _parse(text)
    return days * 86_400_000_000 + us - PG_EPOCH_US


def parse_date(text: str) -> int:
    """The server's text of a date (ISO DateStyle) in PostgreSQL's binary form, days since
    2000-01-01."""
    if text == "infinity":
        return DATE_INFINITY
    if text == "-infinity":
        return DATE_MINUS_INFINITY
    days, us = _parse(text)
    if us:
        raise ValueError(f"not a date: {text!r}")
    return days - PG_EPOCH_DAYS


_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


def _temporal(values: Sequence[Any], type_: pa.DataType) -> pa.Array:
    """datetime/date values, and the server's text of those Python cannot hold (BC, year 10000
    on), as one Arrow array: the text goes through PostgreSQL's integer form, like the snapshot's
    binary values."""
    if not any(v.__class__ is str for v in values):
        return pa.array(values, type_)  # datetime -> microseconds is exact
    is_date = pa.types.is_date32(type_)
    valid = np.array([v is not None for v in values], np.bool_)
    pg = np.zeros(len(values), np.int64)
    for i, v in enumerate(values):
        if v is None:
            continue
        if v.__class__ is str:
            pg[i] = parse_date(v) if is_date else parse_timestamp(v)
        elif is_date:
            pg[i] = (v - dt.date(2000, 1, 1)).days
        else:
            delta = v - (_EPOCH_UTC if v.tzinfo is not None else _EPOCH)
            pg[i] = delta // _MICROSECOND - PG_EPOCH_US
    return dates(pg, valid) if is_date else timestamps(pg, valid, type_)


def _text(value: Any) -> str:
    if value.__class__ is Decimal:
        return format(value, "f")  # numeric_out's digits: no exponent, trailing zeros kept
    return str(value)


def column(values: Sequence[Any], kind: str) -> pa.Array:
    """One column of rows typed as :func:`pgoutput.convert_value` types the server's text (change
    rows, query rows) as the Arrow array the snapshot reader gives the same column, before the
    cast to the destination type: decimals as ``numeric_out`` text, dates and timestamps through
    PostgreSQL's integer form, JSON as text, UUIDs as text. A value that does not take the
    column's type is passed on as text, for the cast to null and record."""
    if kind == "decimal":
        return pa.array([None if v is None else _text(v) for v in values], pa.string())
    if kind in ("timestamp", "timestamp_tz", "date"):
        try:
            return _temporal(values, ARROW[kind])
        except (ValueError, TypeError, pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    elif kind in ("json", "string"):  # json: the server's text, like snapshot rows
        if any(v is not None and v.__class__ is not str for v in values):  # uuid, ...
            values = [v if v is None or v.__class__ is str else _text(v) for v in values]
        return pa.array(values, pa.string())
    else:
        try:
            return pa.array(values, ARROW[kind])
        except (ValueError, TypeError, OverflowError, pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    return pa.array([None if v is None else _text(v) for v in values], pa.string())


# Built-in types whose server text Arrow reads in bulk exactly as pgoutput's converters and
# column() read it value by value (oids of pg_type.dat), per raw-layer kind.
_FROM_TEXT: Final[dict[str, frozenset[int]]] = {
    "integer": frozenset({20, 21, 23, 26}),  # int8, int2, int4, oid
    "number": frozenset({700, 701}),  # float4, float8: shortest exact text (extra_float_digits)
    "boolean": frozenset({16}),
    "timestamp_tz": frozenset({1184}),  # ISO text in UTC (the decoding session's TimeZone)
    "timestamp": frozenset({1114}),
    "date": frozenset({1082}),
}
# Text that column() keeps as text: numeric_out's digits (a Decimal formatted back gives them
# unchanged), and the types pgoutput leaves as text or formats back as the server did (uuid).
_KEPT_TEXT: Final[dict[str, frozenset[int]]] = {
    "decimal": frozenset({1700}),
    "string": frozenset({18, 19, 25, 114, 650, 869, 1042, 1043, 2950, 3802}),
    "json": frozenset({114, 3802, 25, 1043}),
}


def from_text(text: pa.StringArray, oid: int, kind: str) -> pa.Array | None:
    """The array :func:`column` gives for a column of change rows, from the server's text of the
    same values (type ``oid``), converted by Arrow in bulk rather than value by value. None when
    that is not known to be the same: a type not listed above, or a value Arrow refuses
    (``infinity``, a BC date, year 10000 on), which the value-by-value path handles."""
    if oid in _KEPT_TEXT.get(kind, ()):
        return text
    if oid not in _FROM_TEXT.get(kind, ()):
        return None
    if kind == "boolean":
        return pc.equal(text, "t")  # boolout writes t or f
    try:
        return pc.cast(text, ARROW[kind])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def table(columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> pa.RecordBatch:
    """Rows (dicts by column name) as a record batch of :func:`column` arrays."""
    rows = list(rows)
    return pa.RecordBatch.from_arrays(
        [column([row.get(c.name) for row in rows], c.type) for c in columns],
        names=[c.name for c in columns],
    )
