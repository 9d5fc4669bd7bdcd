"""The transactions contract: what a fraud model reads, from a user's file or from the platform.

Every source of transactions becomes one canonical **Arrow table** with ``CANONICAL_SCHEMA``:

==================  ===========================  =====================================================
column              canonical type               meaning
==================  ===========================  =====================================================
transaction_id      string, required, unique     the payment's id (integers become their decimal text)
timestamp           timestamp[us, UTC], required when it happened (a file's timestamp without a time
                                                 zone is read as UTC; nanoseconds are truncated)
customer_id         string, required             the paying customer (or card)
merchant_id         string, required             the merchant; a file may name it ``terminal_id``
amount              float64, required, finite,   one currency per source (the platform's: EUR)
                    below 1e12 in absolute value
label               int8 0/1, nullable           1 = fraud; required without nulls for training,
                                                 optional when scoring (null = not known)
label_time          timestamp[us, UTC], nullable when the fraud became known (positives only);
                                                 null = known one label delay after the payment
device_id           string, nullable             the device used
ip                  string, nullable             the client IP address
country             string, nullable             where the payment happened (country code)
billing_country     string, nullable             the customer's billing country
==================  ===========================  =====================================================

Rows are sorted by (timestamp, transaction_id). Ids and country codes are compared as text: an
empty string counts as missing, country codes are upper-cased and trimmed.

Why Arrow and not pandas: the schema is exact and checkable in one comparison (nullable int8
labels, UTC microsecond timestamps, strings), where pandas would make nullable integers floats or
objects; parquet files and the PostgreSQL COPY reader (``ingestion.postgres.pgcopy``) produce Arrow
natively; DuckDB (the batch feature engine) scans it without a copy. ``Transactions.to_pandas()``
is one call for those who want a DataFrame.

Sources:

- :func:`read_transactions` reads a user's parquet file (``stripe-platform ml train
  --transactions FILE``). Other columns are ignored and reported (``Transactions.ignored_columns``).
- :func:`load_platform_transactions` reads the platform's OLTP PostgreSQL with one query
  (:data:`PLATFORM_QUERY`): amounts converted to EUR with the warehouse's rates
  (``dbt_project/seeds/currency_rates.csv``), the transaction country from its location, the
  billing country from its billing address's location, and the label: **a fraud report**, i.e. a
  status change to ``disputed`` whose reason names fraud (``seed.lifecycle.FRAUD_DISPUTE_REASONS``),
  known from that change's time. The report is the label whatever the dispute's outcome, as card
  networks' fraud reports are: a merchant can win a dispute on liability, not on whether the card
  was stolen. Fraud that is never disputed (declined card tests, for instance) is unlabelled, as
  it is in a real payments database. The session connects without the PII key: no encrypted
  column is read or needed.
- :func:`canonicalize` makes an Arrow table from anywhere else canonical, with the same checks.

Every problem raises a :class:`TransactionsError` (a ``PlatformError``) that names the source and
the column: :class:`MissingColumn`, :class:`MistypedColumn` (type found and expected),
:class:`NullValues`, :class:`InvalidValues`, :class:`DuplicateTransactionIds`,
:class:`NoPositiveLabels` (training only), :class:`EmptyTransactions`, :class:`AmbiguousColumns`,
:class:`UnreadableFile`.

For the stream, one payment is a :class:`TransactionRecord` (the canonical row without its label,
which arrives later as a label event); :func:`records` turns a canonical table into records.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stripe_platform.errors import PlatformError

if TYPE_CHECKING:
    import pandas as pd

    from stripe_platform.config import Settings

UTC_US = pa.timestamp("us", tz="UTC")

CANONICAL_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("timestamp", UTC_US, nullable=False),
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field("merchant_id", pa.string(), nullable=False),
        pa.field("amount", pa.float64(), nullable=False),
        pa.field("label", pa.int8()),
        pa.field("label_time", UTC_US),
        pa.field("device_id", pa.string()),
        pa.field("ip", pa.string()),
        pa.field("country", pa.string()),
        pa.field("billing_country", pa.string()),
    ]
)

Kind = Literal["id", "timestamp", "amount", "label", "country"]
EXPECTED: dict[Kind, str] = {
    "id": "a string or an integer",
    "timestamp": "a timestamp (UTC, or without a time zone)",
    "amount": "a number (integer, floating point or decimal)",
    "label": "an integer 0/1 or a boolean",
    "country": "a string (country code)",
}


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    required: bool  # label: required when training only


COLUMNS: tuple[Column, ...] = (
    Column("transaction_id", "id", True),
    Column("timestamp", "timestamp", True),
    Column("customer_id", "id", True),
    Column("merchant_id", "id", True),
    Column("amount", "amount", True),
    Column("label", "label", True),
    Column("label_time", "timestamp", False),
    Column("device_id", "id", False),
    Column("ip", "id", False),
    Column("country", "country", False),
    Column("billing_country", "country", False),
)
MERCHANT_ALIAS = "terminal_id"  # accepted in place of merchant_id
# No payment is this large; the bound keeps feature sums exact in integer units (features.py).
AMOUNT_LIMIT = 1e12


# -- errors ----------------------------------------------------------------------------------------
class TransactionsError(PlatformError, ValueError):
    """Transactions that do not meet the contract; the message names the source and the column.
    Nothing is trained or scored from them."""

    def __init__(self, message: str, *, source: str, column: str | None = None) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.column = column


class UnreadableFile(TransactionsError):
    """The file does not exist or is not parquet."""


class EmptyTransactions(TransactionsError):
    """The source holds no transaction."""


class MissingColumn(TransactionsError):
    """A required column is absent."""


class AmbiguousColumns(TransactionsError):
    """Two columns would fill the same canonical column (merchant_id and terminal_id, or a name
    written twice)."""


class MistypedColumn(TransactionsError):
    """A column has a type the contract does not accept."""

    def __init__(self, message: str, *, source: str, column: str, found: str, expected: str):
        super().__init__(message, source=source, column=column)
        self.found = found
        self.expected = expected


class NullValues(TransactionsError):
    """A required column has missing values (null, NaN or an empty string)."""


class InvalidValues(TransactionsError):
    """A column has values outside its domain (a label other than 0/1, an infinite amount, a
    label time before its payment)."""


class DuplicateTransactionIds(TransactionsError):
    """transaction_id is not unique."""


class NoPositiveLabels(TransactionsError):
    """Training data without a single fraud: there is nothing to learn."""


# -- the canonical table ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Transactions:
    """Canonical transactions (``table`` has ``CANONICAL_SCHEMA``) and what loading them found."""

    table: pa.Table
    source: str
    ignored_columns: tuple[str, ...] = ()
    merchant_column: str = "merchant_id"  # the source's name for it ("terminal_id" in some files)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def positives(self) -> int:
        return int(pc.sum(self.table["label"]).as_py() or 0)

    def notes(self) -> list[str]:
        """What the user should know about how their data was read (for the CLI to print)."""
        notes = []
        if self.ignored_columns:
            notes.append(f"ignored columns: {', '.join(self.ignored_columns)}")
        if self.merchant_column != "merchant_id":
            notes.append(f"{self.merchant_column} used as merchant_id")
        return notes

    def to_pandas(self) -> pd.DataFrame:
        return self.table.to_pandas()


def _as_text(array: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strings with empty (or blank) values made null: an empty id identifies nothing."""
    blank = pc.equal(pc.utf8_trim_whitespace(array), "")
    return pc.if_else(blank, pa.scalar(None, pa.string()), array)


def _convert(array: pa.ChunkedArray, column: Column, source: str, source_name: str) -> pa.Array:
    """``array`` as its canonical type, or MistypedColumn."""
    type_ = array.type
    if pa.types.is_dictionary(type_):
        array = array.cast(type_.value_type)
        type_ = array.type

    def mistyped() -> MistypedColumn:
        return MistypedColumn(
            f"column {source_name!r} is {type_!s}, expected {EXPECTED[column.kind]}",
            source=source,
            column=source_name,
            found=str(type_),
            expected=EXPECTED[column.kind],
        )

    stringy = pa.types.is_string(type_) or pa.types.is_large_string(type_)
    stringy = stringy or pa.types.is_string_view(type_)
    if pa.types.is_null(type_):  # a column written with no value at all
        target = CANONICAL_SCHEMA.field(column.name).type
        return pa.chunked_array([pa.nulls(len(array), target)])
    if column.kind == "id":
        if stringy:
            return _as_text(array.cast(pa.string()))
        if pa.types.is_integer(type_):
            return array.cast(pa.string())
        raise mistyped()
    if column.kind == "country":
        if stringy:
            return _as_text(pc.utf8_upper(pc.utf8_trim_whitespace(array.cast(pa.string()))))
        raise mistyped()
    if column.kind == "timestamp":
        if not pa.types.is_timestamp(type_):
            raise mistyped()
        # A naive timestamp is taken as UTC (the contract); nanoseconds are truncated to the
        # microseconds PostgreSQL and DuckDB keep.
        return array.cast(UTC_US, safe=type_.unit != "ns")
    if column.kind == "amount":
        if pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_):
            return array.cast(pa.float64())
        raise mistyped()
    # label
    if pa.types.is_boolean(type_):
        return array.cast(pa.int8())
    if pa.types.is_integer(type_):
        bad = pc.invert(pc.is_in(array, pa.array([0, 1], type_)))
        bad = pc.and_kleene(bad, pc.is_valid(array))
        if pc.any(bad).as_py():
            examples = sorted(set(array.filter(bad).to_pylist()))[:5]
            raise InvalidValues(
                f"column {source_name!r} must be 0 or 1; found {examples}",
                source=source,
                column=source_name,
            )
        return array.cast(pa.int8())
    raise mistyped()


def _first_row(mask: pa.ChunkedArray) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0]) + 1


def canonicalize(
    table: pa.Table,
    *,
    source: str,
    require_labels: bool = True,
    ignored_columns: Sequence[str] = (),
    renamed: dict[str, str] | None = None,
) -> Transactions:
    """Check ``table`` (columns named as in the contract; ``renamed`` maps a canonical name to
    the source's, for messages) and return it canonical: converted types, sorted rows.

    ``require_labels`` (training): label present, no nulls, at least one 1.
    """
    renamed = renamed or {}
    if table.num_rows == 0:
        raise EmptyTransactions("no transactions (the table has no rows)", source=source)
    arrays: dict[str, pa.ChunkedArray] = {}
    for column in COLUMNS:
        name = renamed.get(column.name, column.name)
        if column.name not in table.column_names:
            if column.required and (column.name != "label" or require_labels):
                raise MissingColumn(
                    f"required column {name!r} is missing", source=source, column=name
                )
            arrays[column.name] = pa.chunked_array(
                [pa.nulls(table.num_rows, CANONICAL_SCHEMA.field(column.name).type)]
            )
            continue
        values = _convert(table[column.name], column, source, name)
        must_have = column.required and (column.name != "label" or require_labels)
        missing = pc.is_null(values, nan_is_null=True)
        if must_have and pc.any(missing).as_py():
            count = pc.sum(missing).as_py()
            raise NullValues(
                f"column {name!r} has {count} missing value(s) (first in row {_first_row(missing)},"
                " counting from 1); every row needs one",
                source=source,
                column=name,
            )
        arrays[column.name] = values

    huge = pc.greater_equal(pc.abs(arrays["amount"]), AMOUNT_LIMIT)  # infinities too
    if pc.any(huge).as_py():
        name = renamed.get("amount", "amount")
        raise InvalidValues(
            f"column {name!r} has {pc.sum(huge).as_py()} value(s) that are infinite or beyond "
            f"{AMOUNT_LIMIT:,.0f} (first in row {_first_row(huge)}, counting from 1)",
            source=source,
            column=name,
        )

    # A label time matters for frauds only; one before its own payment is a data error.
    positive = pc.fill_null(pc.equal(arrays["label"], 1), False)
    label_time = pc.if_else(positive, arrays["label_time"], pa.scalar(None, UTC_US))
    early = pc.fill_null(pc.less(label_time, arrays["timestamp"]), False)
    if pc.any(early).as_py():
        name = renamed.get("label_time", "label_time")
        raise InvalidValues(
            f"column {name!r} is before the payment's timestamp in {pc.sum(early).as_py()} "
            f"row(s) (first in row {_first_row(early)}, counting from 1)",
            source=source,
            column=name,
        )
    arrays["label_time"] = label_time

    ids = arrays["transaction_id"]
    if len(pc.unique(ids)) != len(ids):
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        examples = [v.as_py() for v in repeated.field("values")[:3]]
        name = renamed.get("transaction_id", "transaction_id")
        raise DuplicateTransactionIds(
            f"column {name!r} has {len(repeated)} id(s) on more than one row, e.g. {examples}",
            source=source,
            column=name,
        )

    if require_labels and not pc.any(positive).as_py():
        name = renamed.get("label", "label")
        raise NoPositiveLabels(
            f"column {name!r} has no 1 (no fraud) in {table.num_rows} rows: a model cannot "
            "learn fraud without examples of it",
            source=source,
            column=name,
        )

    canonical = pa.table(
        [arrays[f.name] for f in CANONICAL_SCHEMA], schema=CANONICAL_SCHEMA.remove_metadata()
    )
    canonical = canonical.sort_by([("timestamp", "ascending"), ("transaction_id", "ascending")])
    return Transactions(
        table=canonical.combine_chunks(),
        source=source,
        ignored_columns=tuple(ignored_columns),
        merchant_column=renamed.get("merchant_id", "merchant_id"),
    )


# -- a user's file ---------------------------------------------------------------------------------
def read_transactions(path: str | Path, *, require_labels: bool = True) -> Transactions:
    """A user's parquet file as canonical transactions (see the module's contract).

    ``require_labels=True`` for training (label required, no nulls, at least one fraud);
    ``False`` for scoring (label optional). Raises a :class:`TransactionsError` naming the file
    and the column.
    """
    source = str(path)
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise UnreadableFile("no such file", source=source) from None
    except IsADirectoryError:
        raise UnreadableFile("is a directory, expected one parquet file", source=source) from None
    except (pa.ArrowException, OSError) as exc:
        raise UnreadableFile(f"not a readable parquet file ({exc})", source=source) from None
    names = parquet.schema_arrow.names
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AmbiguousColumns(f"column(s) {twice} appear more than once", source=source)
    if parquet.metadata.num_rows == 0:
        raise EmptyTransactions("the file holds no rows", source=source)

    renamed: dict[str, str] = {}
    if MERCHANT_ALIAS in names:
        if "merchant_id" in names:
            raise AmbiguousColumns(
                f"both 'merchant_id' and {MERCHANT_ALIAS!r}: keep the one that identifies where "
                "payments are made",
                source=source,
                column=MERCHANT_ALIAS,
            )
        renamed["merchant_id"] = MERCHANT_ALIAS
    wanted = {renamed.get(c.name, c.name): c.name for c in COLUMNS}
    for column in COLUMNS:
        name = renamed.get(column.name, column.name)
        required = column.required and (column.name != "label" or require_labels)
        if required and name not in names:
            near = [n for n in names if n.strip().lower() == name]
            hint = f" (found {near[0]!r}: names must match exactly)" if near else ""
            if column.name == "merchant_id" and not near:
                hint = f" (or {MERCHANT_ALIAS!r})"
            raise MissingColumn(
                f"required column {name!r} is missing{hint}", source=source, column=name
            )
    present = [n for n in names if n in wanted]
    ignored = [n for n in names if n not in wanted]
    try:
        table = parquet.read(columns=present)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadableFile(f"cannot be read ({exc})", source=source) from None
    table = table.rename_columns([wanted[n] for n in table.column_names])
    return canonicalize(
        table,
        source=source,
        require_labels=require_labels,
        ignored_columns=ignored,
        renamed=renamed,
    )


# -- the platform's own data -----------------------------------------------------------------------
def eur_rates() -> dict[str, float]:
    """Euros per unit of each currency: the warehouse's reference rates (one source for both)."""
    from stripe_platform.transform.dbt import DBT_PROJECT_DIR

    with (DBT_PROJECT_DIR / "seeds" / "currency_rates.csv").open(newline="") as f:
        return {row["currency_code"]: float(row["eur_per_unit"]) for row in csv.DictReader(f)}


# The one query that reads the platform's transactions in the contract's shape. {rates} are
# (code, eur_per_unit) rows, {disputed} the disputed status id, {fraud_reasons} the reasons that
# report fraud, {period} a condition on t.DateTime. No encrypted column is read.
PLATFORM_QUERY = """
SELECT t.ID AS transaction_id,
       t.DateTime AS timestamp,
       t.CustomerID AS customer_id,
       t.MerchantID AS merchant_id,
       (t.Amount * rate.eur_per_unit)::float8 AS amount,
       fraud.reported_at IS NOT NULL AS label,
       fraud.reported_at AS label_time,
       t.DeviceID AS device_id,
       t.IPAddress AS ip,
       place.CountryCode AS country,
       billing.CountryCode AS billing_country,
       currency.Code AS currency
FROM Transaction t
JOIN Currency currency ON currency.ID = t.CurrencyID
LEFT JOIN (VALUES {rates}) AS rate (code, eur_per_unit) ON rate.code = currency.Code
LEFT JOIN Location place ON place.ID = t.TransactionLocationID
LEFT JOIN Address address ON address.ID = t.BillingAddressID
LEFT JOIN Location billing ON billing.ID = address.LocationID
LEFT JOIN (
    SELECT TransactionID, TransactionDateTime, min(UpdatedAt) AS reported_at
    FROM TransactionStateChanges
    WHERE ToStatusID = {disputed} AND Reason = ANY({fraud_reasons})
    GROUP BY TransactionID, TransactionDateTime
) AS fraud ON fraud.TransactionID = t.ID AND fraud.TransactionDateTime = t.DateTime
WHERE {period}
"""


def load_platform_transactions(
    settings: Settings,
    *,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    require_labels: bool = True,
    purpose: str | None = None,
) -> Transactions:
    """The platform's transactions (OLTP PostgreSQL of ``settings``) with ``start <= DateTime <
    end`` (either bound optional) as canonical transactions; labels are fraud reports (see the
    module's docstring). Read with COPY binary straight into Arrow. ``purpose`` (e.g.
    ``ml_training``): only the payments of customers who consent to it now (issue 23,
    compliance/consent.py)."""
    import psycopg
    from psycopg import sql

    from stripe_platform.ingestion.postgres import pgcopy
    from stripe_platform.oltp import db
    from stripe_platform.seed.lifecycle import DISPUTED, FRAUD_DISPUTE_REASONS

    rates = eur_rates()
    source = f"PostgreSQL database {settings.pg_database!r}"
    period = [sql.SQL("true")]
    if start is not None:
        period.append(sql.SQL("t.DateTime >= {}").format(sql.Literal(start)))
    if end is not None:
        period.append(sql.SQL("t.DateTime < {}").format(sql.Literal(end)))
    if purpose is not None:
        from stripe_platform.compliance import consent

        period.append(consent.allowed_sql(purpose, sql.SQL("t.CustomerID")))
    query = sql.SQL(PLATFORM_QUERY).format(
        rates=sql.SQL(", ").join(
            sql.SQL("({}, {}::float8)").format(sql.Literal(code), sql.Literal(rate))
            for code, rate in sorted(rates.items())
        ),
        disputed=sql.Literal(DISPUTED),
        fraud_reasons=sql.Literal([str(r) for r in FRAUD_DISPUTE_REASONS]),
        period=sql.SQL(" AND ").join(period),
    )
    # Without the PII key: nothing here decrypts, and this session could not if it tried.
    with psycopg.connect(db.conninfo(settings, with_key=False), autocommit=True) as conn:
        batches = list(pgcopy.read_arrow(conn, query.as_string(conn)))
    if not batches:
        raise EmptyTransactions("holds no transactions in the period read", source=source)
    table = pa.Table.from_batches(batches)
    no_rate = pc.is_null(table["amount"])
    if pc.any(no_rate).as_py():
        codes = sorted(set(table["currency"].filter(no_rate).to_pylist()))
        raise InvalidValues(
            f"no EUR rate for currency {codes} in dbt_project/seeds/currency_rates.csv: add it",
            source=source,
            column="amount",
        )
    return canonicalize(
        table.drop_columns(["currency"]), source=source, require_labels=require_labels
    )


# -- one payment at a time (the stream) --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TransactionRecord:
    """One payment as the online feature state receives it: a canonical row without its label
    (labels arrive later, as label events). ``timestamp`` is aware (UTC) or naive UTC."""

    transaction_id: str
    timestamp: dt.datetime
    customer_id: str
    merchant_id: str
    amount: float
    device_id: str | None = None
    ip: str | None = None
    country: str | None = None
    billing_country: str | None = None


RECORD_FIELDS = (
    "transaction_id",
    "timestamp",
    "customer_id",
    "merchant_id",
    "amount",
    "device_id",
    "ip",
    "country",
    "billing_country",
)


def records(table: pa.Table) -> Iterator[TransactionRecord]:
    """The rows of a canonical table as records, in its order."""
    for batch in table.select(list(RECORD_FIELDS)).to_batches(max_chunksize=65_536):
        columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for values in zip(*columns, strict=True):
            yield TransactionRecord(*values)
