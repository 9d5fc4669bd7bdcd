"""Change rows to what the features read: payments (:class:`TransactionRecord`) and fraud labels
(:class:`LabelEvent`), with exactly the meaning of ``ml.contract.PLATFORM_QUERY``.

The training data and the stream must agree value for value (the model's features depend on it),
so every rule here mirrors that query:

- a payment is a ``transaction`` row: its id, ``DateTime``, customer and merchant ids as text,
  ``Amount`` converted to EUR as ``float8(Amount) * eur_per_unit`` with ``ml.contract.eur_rates()``
  (the warehouse's rates), device id and IP address as text, the country code of its
  ``TransactionLocationID`` and the billing country of its ``BillingAddressID``'s location
  (either ``None`` when not set or not found, as the query's LEFT JOINs), country codes trimmed
  and upper-cased, empty text as ``None`` (as ``contract.canonicalize`` does);
- a fraud label is a ``transactionstatechanges`` row to ``DISPUTED`` whose reason is one of
  ``FRAUD_DISPUTE_REASONS``, known from its ``UpdatedAt``.

Rows come from two sources (``changes.RowEvent``): the embedded CDC with Python values (Decimal,
aware datetime, int) and Debezium with JSON values (numerics as strings under
``decimal.handling.mode=string``, timestamptz as ISO-8601 text, bigint as int). Both give the same
records. Reference data (currency codes, location countries, billing addresses) is read from
PostgreSQL once, again on a cache miss, and refreshed every ``max_age`` seconds (an address can
move). A row that cannot be read is a :class:`~stripe_platform.streaming.changes.Rejected`
(``unknown_table``, ``missing_column``, ``bad_value``; ``deleted`` for a deleted payment, which
has nothing to score), never an exception.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import psycopg

from stripe_platform.ingestion.postgres.pgoutput import format_lsn
from stripe_platform.ml.contract import AMOUNT_LIMIT, TransactionRecord, eur_rates
from stripe_platform.streaming.changes import TABLES, Rejected, RowEvent

if TYPE_CHECKING:
    from stripe_platform.config import Settings

PAYMENTS, STATE_CHANGES = TABLES
PAYMENT_COLUMNS = (
    "id",
    "datetime",
    "customerid",
    "merchantid",
    "amount",
    "currencyid",
    "deviceid",
    "ipaddress",
    "transactionlocationid",
    "billingaddressid",
)
LABEL_COLUMNS = ("transactionid", "tostatusid", "reason", "updatedat")


@dataclass(frozen=True, slots=True)
class LabelEvent:
    """A payment was reported as fraud: the label is known from ``known_at`` (aware, UTC)."""

    transaction_id: str
    known_at: dt.datetime


class _BadValue(ValueError):
    """A column's value cannot be read (the message names the column)."""


def _int(row: Mapping[str, Any], column: str, *, nullable: bool = False) -> int | None:
    value = row[column]
    if value is None:
        if nullable:
            return None
        raise _BadValue(f"{column} is null")
    if isinstance(value, bool):  # bool is an int to Python, never an id
        raise _BadValue(f"{column} is a boolean: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _BadValue(f"{column} is not an integer: {value!r}")


def _id_text(row: Mapping[str, Any], column: str, *, nullable: bool = False) -> str | None:
    value = _int(row, column, nullable=nullable)
    return None if value is None else str(value)


def _timestamp(row: Mapping[str, Any], column: str) -> dt.datetime:
    value = row[column]
    if isinstance(value, str):  # Debezium's ZonedTimestamp: 2026-12-07T13:00:00.123456Z
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise _BadValue(f"{column} is not an ISO-8601 timestamp: {value!r}") from None
    if not isinstance(value, dt.datetime):
        raise _BadValue(f"{column} is not a timestamp: {value!r}")
    if value.replace(tzinfo=None) in (dt.datetime.min, dt.datetime.max):  # pgoutput's ±infinity
        raise _BadValue(f"{column} is infinite")
    if value.tzinfo is None:  # naive = UTC, as in the contract
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise _BadValue(f"{column} is out of range: {value!r}") from None


def _number(row: Mapping[str, Any], column: str) -> float:
    """float8(value), as PostgreSQL casts numeric: the correctly rounded nearest double."""
    value = row[column]
    if isinstance(value, bool) or value is None:
        raise _BadValue(f"{column} is not a number: {value!r}")
    if isinstance(value, str):
        try:
            value = Decimal(value.strip())
        except InvalidOperation:
            raise _BadValue(f"{column} is not a number: {value!r}") from None
    if not isinstance(value, int | float | Decimal):
        raise _BadValue(f"{column} is not a number: {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise _BadValue(f"{column} is not finite: {value!r}")
    return number


def _text(row: Mapping[str, Any], column: str) -> str | None:
    value = row[column]
    if value is None:
        return None
    if not isinstance(value, str):
        raise _BadValue(f"{column} is not text: {value!r}")
    return value if value.strip() else None  # an empty id identifies nothing


def _country(code: str | None) -> str | None:
    if code is None:
        return None
    code = code.strip().upper()
    return code or None


class Normalizer:
    """RowEvents to payments and labels (see the module). One PostgreSQL connection (without the
    PII key: nothing here is encrypted), opened on first use; safe to share between threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        rates: Mapping[str, float] | None = None,
        max_age: float = 600.0,
    ) -> None:
        from stripe_platform.seed.lifecycle import DISPUTED, FRAUD_DISPUTE_REASONS

        self.settings = settings
        self.rates = dict(eur_rates() if rates is None else rates)
        self.max_age = max_age
        self._disputed = int(DISPUTED)
        self._fraud_reasons = frozenset(str(r) for r in FRAUD_DISPUTE_REASONS)
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._loaded_at: float | None = None
        self._currencies: dict[int, str] = {}
        self._countries: dict[int, str | None] = {}  # Location.ID -> CountryCode
        self._billing: dict[int, str | None] = {}  # Address.ID -> its location's CountryCode

    # -- public API ----------------------------------------------------------------------------
    def normalize(self, event: RowEvent) -> TransactionRecord | LabelEvent | Rejected | None:
        """A payment, a fraud label, ``None`` (a state change that reports no fraud), or why the
        event cannot be used."""
        if event.table == STATE_CHANGES:
            return self.label(event)
        return self.payment(event)

    def payment(self, event: RowEvent) -> TransactionRecord | Rejected:
        """The payment a ``transaction`` insert, update or snapshot row describes."""
        if event.table != PAYMENTS:
            return self._unknown_table(event)
        if event.op == "delete":
            return self._rejected(event, "deleted", "a deleted payment has nothing to score")
        missing = [c for c in PAYMENT_COLUMNS if c not in event.row]
        if missing:
            return self._rejected(event, "missing_column", f"no column {', '.join(missing)}")
        row = event.row
        try:
            transaction_id = _id_text(row, "id")
            timestamp = _timestamp(row, "datetime")
            customer_id = _id_text(row, "customerid")
            merchant_id = _id_text(row, "merchantid")
            amount = _number(row, "amount")
            currency_id = _int(row, "currencyid")
            device_id = _id_text(row, "deviceid", nullable=True)
            ip = _text(row, "ipaddress")
            location_id = _int(row, "transactionlocationid", nullable=True)
            address_id = _int(row, "billingaddressid", nullable=True)
            assert currency_id is not None
            rate = self._rate(currency_id)
            # numeric * float8 in the query is float8(Amount) * rate: the same two doubles here.
            eur = amount * rate
            if not abs(eur) < AMOUNT_LIMIT:
                raise _BadValue(f"amount {amount!r} is beyond {AMOUNT_LIMIT:,.0f} EUR")
            country = None if location_id is None else self._location_country(location_id)
            billing = None if address_id is None else self._billing_country(address_id)
        except _BadValue as exc:
            return self._rejected(event, "bad_value", str(exc))
        assert transaction_id is not None and customer_id is not None and merchant_id is not None
        return TransactionRecord(
            transaction_id=transaction_id,
            timestamp=timestamp,
            customer_id=customer_id,
            merchant_id=merchant_id,
            amount=eur,
            device_id=device_id,
            ip=ip,
            country=country,
            billing_country=billing,
        )

    def label(self, event: RowEvent) -> LabelEvent | Rejected | None:
        """The fraud label a ``transactionstatechanges`` row reports, or ``None`` when it reports
        none (another status, another reason; a deleted row)."""
        if event.table != STATE_CHANGES:
            return self._unknown_table(event)
        if event.op == "delete":
            return None
        missing = [c for c in LABEL_COLUMNS if c not in event.row]
        if missing:
            return self._rejected(event, "missing_column", f"no column {', '.join(missing)}")
        row = event.row
        try:
            if _int(row, "tostatusid") != self._disputed:
                return None
            reason = row["reason"]
            if reason is not None and not isinstance(reason, str):
                raise _BadValue(f"reason is not text: {reason!r}")
            if reason not in self._fraud_reasons:
                return None
            transaction_id = _id_text(row, "transactionid")
            known_at = _timestamp(row, "updatedat")
        except _BadValue as exc:
            return self._rejected(event, "bad_value", str(exc))
        assert transaction_id is not None
        return LabelEvent(transaction_id, known_at)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- reference data ------------------------------------------------------------------------
    def _rate(self, currency_id: int) -> float:
        code = self._lookup(self._currencies, currency_id, self._fetch_currency)
        if code is None:
            raise _BadValue(f"currencyid {currency_id} names no currency")
        rate = self.rates.get(code)
        if rate is None:
            raise _BadValue(
                f"no EUR rate for currency {code!r} in dbt_project/seeds/currency_rates.csv"
            )
        return rate

    def _location_country(self, location_id: int) -> str | None:
        return self._lookup(self._countries, location_id, self._fetch_location)

    def _billing_country(self, address_id: int) -> str | None:
        return self._lookup(self._billing, address_id, self._fetch_address)

    def _lookup(self, cache: dict[int, Any], key: int, fetch: Any) -> Any:
        with self._lock:
            if self._loaded_at is None or time.monotonic() - self._loaded_at > self.max_age:
                self._load_all()
            if key in cache:
                return cache[key]
            value, found = fetch(key)
            if found:  # a row not found is not cached: it may be committed later
                cache[key] = value
            return value

    def _rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a reference-data query, reconnecting once if the connection was lost (a server
        restart): reference data is read again, never a reason to fail."""
        from stripe_platform.oltp import db

        for attempt in (1, 2):
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = db.connect(self.settings, autocommit=True, with_key=False)
            try:
                return self._conn.execute(query, params).fetchall()
            except psycopg.OperationalError:
                if attempt == 2 or not (self._conn.closed or self._conn.broken):
                    raise
        raise AssertionError("unreachable")

    def _load_all(self) -> None:
        self._currencies = dict(self._rows("SELECT ID, Code FROM Currency"))  # type: ignore[arg-type]
        self._countries = {
            i: _country(code) for i, code in self._rows("SELECT ID, CountryCode FROM Location")
        }
        self._billing = {
            i: _country(code)
            for i, code in self._rows(
                "SELECT a.ID, l.CountryCode FROM Address a LEFT JOIN Location l "
                "ON l.ID = a.LocationID"
            )
        }
        self._loaded_at = time.monotonic()

    def _fetch_currency(self, key: int) -> tuple[str | None, bool]:
        rows = self._rows("SELECT Code FROM Currency WHERE ID = %s", (key,))
        return (rows[0][0], True) if rows else (None, False)

    def _fetch_location(self, key: int) -> tuple[str | None, bool]:
        rows = self._rows("SELECT CountryCode FROM Location WHERE ID = %s", (key,))
        return (_country(rows[0][0]), True) if rows else (None, False)

    def _fetch_address(self, key: int) -> tuple[str | None, bool]:
        rows = self._rows(
            "SELECT l.CountryCode FROM Address a LEFT JOIN Location l ON l.ID = a.LocationID "
            "WHERE a.ID = %s",
            (key,),
        )
        return (_country(rows[0][0]), True) if rows else (None, False)

    # -- rejections ----------------------------------------------------------------------------
    def _unknown_table(self, event: RowEvent) -> Rejected:
        return self._rejected(
            event, "unknown_table", f"the stream follows {', '.join(TABLES)}, not {event.table!r}"
        )

    @staticmethod
    def _rejected(event: RowEvent, reason: str, detail: str) -> Rejected:
        where = f"{event.table}@{format_lsn(event.lsn) if event.lsn >= 0 else event.lsn}"
        return Rejected(event.source, where, reason, detail)
