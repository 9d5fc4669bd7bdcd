"""The API's reads of customer and payment data, each behind the access policy (api/auth.py):

- ``GET /v1/customers/{id}``: the customer, masked (scope ``customers.read``): every field the
  classification catalog does not class non_personal reads ``***MASKED***`` (null when empty),
  as the warehouse's masked marts do. Nothing restricted is even read from the database.
- ``GET /v1/customers/{id}/pii``: the same customer and their addresses in clear
  (``customers.read``, cleared for their classes, and a fresh second factor).
- ``GET /v1/payment-instruments/{id}``: a card with its PAN in clear (``payments.read``, cleared
  for PCI, second factor).
- ``GET /v1/exports/payments?since=&until=``: the payments of a period (``exports.run``; a bulk
  export: second factor), streamed as JSON lines or CSV, bounded in span and rows.

What each route reveals is declared once (its :class:`Column` lists) and classed by the catalog
(governance/classification.py, the one source): the classes a route asks clearance for are
derived from it, so a column reclassified there changes who may read it here. Encrypted columns
are decrypted by the database session (``pii_decrypt`` on a keyed connection of oltp/db.py), as
everywhere on the platform. Every read goes to the access log with what was revealed (ids,
fields, classes, rows), never the values.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import functools
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime, BaseModel, Field

from stripe_platform.api.auth import AUTH_RESPONSES, Principal, require_clear, require_scope
from stripe_platform.api.models import Problem
from stripe_platform.audit import access_log
from stripe_platform.governance.classification import DataClass, load_catalog
from stripe_platform.oltp import db

if TYPE_CHECKING:
    from stripe_platform.config import Settings

router = APIRouter(tags=["customers"])

MASK = "***MASKED***"  # what the warehouse's masked marts show too (dbt masking macros)
EXPORT_MAX_DAYS = 92  # one quarter a request
EXPORT_MAX_ROWS = 200_000  # beyond it, narrow the period (the answer says so before streaming)
EXPORT_BATCH = 2_000  # rows fetched a round trip while streaming


@dataclass(frozen=True)
class Column:
    """One field a route returns: where it comes from (``table.column`` as the catalog names it)
    and the SQL that reads it in clear (decrypting where the column is encrypted)."""

    field: str
    source: str
    sql: str
    stored: str | None = None  # the column as stored, when ``sql`` decrypts it
    text: bool = True  # masked as MASK (text) or null (other types)

    @property
    def data_class(self) -> DataClass:
        table, column = self.source.split(".")
        return _catalog().get("postgres", table, column).data_class


@functools.cache
def _catalog():
    return load_catalog()


def cleared_classes(columns: Sequence[Column]) -> tuple[str, ...]:
    """The data classes a caller must be cleared for to read ``columns`` in clear."""
    return tuple(sorted({c.data_class.value for c in columns} - {DataClass.NON_PERSONAL.value}))


CUSTOMER = (
    Column("id", "customer.id", "c.ID", text=False),
    Column("user_name", "customer.username", "c.UserName"),
    Column("email", "customer.email", "pii_decrypt(c.Email)", stored="c.Email"),
    Column("full_name", "customer.fullname", "pii_decrypt(c.FullName)", stored="c.FullName"),
    Column("phone", "customer.phone", "pii_decrypt(c.Phone)", stored="c.Phone"),
    Column("country_code", "customer.countrycode", "c.CountryCode"),
    Column("preferred_device", "customer.preferreddevice", "c.PreferredDevice"),
    Column("preferred_payment_method", "paymentmethod.name", "pm.Name"),
    Column("preferred_currency", "currency.code", "cur.Code"),
    Column("created_at", "customer.createdat", "c.CreatedAt", text=False),
    Column("updated_at", "customer.updatedat", "c.UpdatedAt", text=False),
)
CUSTOMER_FROM = """FROM Customer c
    LEFT JOIN PaymentMethod pm ON pm.ID = c.PreferredPaymentMethodID
    LEFT JOIN Currency cur ON cur.ID = c.PreferredCurrencyID
    WHERE c.ID = %s"""

ADDRESS = (
    Column("id", "address.id", "a.ID", text=False),
    Column("line1", "address.line1", "pii_decrypt(a.Line1)", stored="a.Line1"),
    Column("postal_code", "address.postalcode", "a.PostalCode"),
    Column("city", "location.city", "l.City"),
    Column("country_code", "location.countrycode", "l.CountryCode"),
    Column("is_billing", "address.isbilling", "a.IsBilling", text=False),
)
ADDRESS_FROM = """FROM Address a JOIN Location l ON l.ID = a.LocationID
    WHERE a.CustomerID = %s ORDER BY a.ID"""

PAYMENT_INSTRUMENT = (
    Column("id", "paymentinstrument.id", "pi.ID", text=False),
    Column("customer_id", "paymentinstrument.customerid", "pi.CustomerID", text=False),
    Column("payment_method", "paymentmethod.name", "pm.Name"),
    Column("brand", "paymentinstrument.brand", "pi.Brand"),
    Column("last4", "paymentinstrument.last4", "pi.Last4"),
    Column("pan", "paymentinstrument.pan", "pii_decrypt(pi.PAN)", stored="pi.PAN"),
    Column("expiry_month", "paymentinstrument.expirymonth", "pi.ExpiryMonth", text=False),
    Column("expiry_year", "paymentinstrument.expiryyear", "pi.ExpiryYear", text=False),
    Column("created_at", "paymentinstrument.createdat", "pi.CreatedAt", text=False),
)
PAYMENT_INSTRUMENT_FROM = """FROM PaymentInstrument pi
    JOIN PaymentMethod pm ON pm.ID = pi.PaymentMethodID
    WHERE pi.ID = %s"""

PAYMENTS_EXPORT = (
    Column("id", "transaction.id", "t.ID", text=False),
    Column("date_time", "transaction.datetime", "t.DateTime", text=False),
    Column("status", "transactionstatus.name", "ts.Name"),
    Column("amount", "transaction.amount", "t.Amount", text=False),
    Column("currency", "currency.code", "cur.Code"),
    Column("payment_method", "paymentmethod.name", "pm.Name"),
    Column("merchant_id", "transaction.merchantid", "t.MerchantID", text=False),
    Column("customer_id", "transaction.customerid", "t.CustomerID", text=False),
    Column(
        "payment_instrument_id",
        "transaction.paymentinstrumentid",
        "t.PaymentInstrumentID",
        text=False,
    ),
)
PAYMENTS_EXPORT_FROM = """FROM Transaction t
    JOIN TransactionStatus ts ON ts.ID = t.TransactionStatusID
    JOIN Currency cur ON cur.ID = t.CurrencyID
    JOIN PaymentMethod pm ON pm.ID = t.PaymentMethodID
    WHERE t.DateTime >= %(since)s AND t.DateTime < %(until)s"""

CUSTOMER_PII_CLASSES = cleared_classes(CUSTOMER + ADDRESS)
PAYMENT_INSTRUMENT_CLASSES = cleared_classes(PAYMENT_INSTRUMENT)
PAYMENTS_EXPORT_CLASSES = cleared_classes(PAYMENTS_EXPORT)


# -- response models ------------------------------------------------------------------------------
class CustomerMasked(BaseModel):
    """A customer with every restricted field masked (``***MASKED***``; null when empty)."""

    id: int
    user_name: str | None
    email: str | None
    full_name: str | None
    phone: str | None
    country_code: str | None
    preferred_device: str | None
    preferred_payment_method: str | None
    preferred_currency: str | None
    created_at: dt.datetime | None
    updated_at: dt.datetime | None
    masked: list[str] = Field(description="The fields masked, by their catalog class")


class Address(BaseModel):
    id: int
    line1: str | None
    postal_code: str | None
    city: str | None
    country_code: str | None
    is_billing: bool | None


class CustomerPii(BaseModel):
    """A customer and their addresses in clear."""

    id: int
    user_name: str | None
    email: str | None
    full_name: str | None
    phone: str | None
    country_code: str | None
    preferred_device: str | None
    preferred_payment_method: str | None
    preferred_currency: str | None
    created_at: dt.datetime | None
    updated_at: dt.datetime | None
    addresses: list[Address]


class PaymentInstrument(BaseModel):
    """A card or account with its PAN in clear."""

    id: int
    customer_id: int
    payment_method: str | None
    brand: str | None
    last4: str | None
    pan: str | None
    expiry_month: int | None
    expiry_year: int | None
    created_at: dt.datetime | None


NOT_FOUND = {404: {"model": Problem, "description": "No such record"}}


# -- helpers --------------------------------------------------------------------------------------
def _settings(request: Request) -> Settings:
    return request.app.state.services.settings


def _select(columns: Sequence[Column], *, masked: bool = False) -> str:
    """The select list; ``masked``: restricted columns only say whether they hold a value."""
    parts = []
    for c in columns:
        if masked and c.data_class != DataClass.NON_PERSONAL:
            parts.append(f"({c.stored or c.sql}) IS NOT NULL")
        else:
            parts.append(c.sql)
    return ", ".join(parts)


def _row(columns: Sequence[Column], values: Sequence[Any]) -> dict[str, Any]:
    return {c.field: v for c, v in zip(columns, values, strict=True)}


def _logged_read(
    request: Request,
    who: Principal,
    action: str,
    *,
    columns: Sequence[Column],
    ids: list[int],
    rows: int,
    clear: bool,
    extra: dict[str, Any] | None = None,
) -> None:
    """What was revealed, for the access log: the ids, fields and classes, never the values."""
    shown = [c for c in columns if clear or c.data_class == DataClass.NON_PERSONAL]
    access_log.record(
        _settings(request),
        kind="read",
        user=who.user,
        source=who.source_ip,
        resource=request.url.path,
        action=action,
        outcome="allow",
        via=who.via,
        detail={
            "ids": ids,
            "rows": rows,
            "fields_in_clear": [c.field for c in shown],
            "classes_in_clear": sorted({c.data_class.value for c in shown}),
            "masked": [] if clear else [c.field for c in columns if c not in shown],
            **(extra or {}),
        },
    )


def _not_found(what: str, ident: int) -> HTTPException:
    return HTTPException(404, f"no {what} {ident}")


CustomerId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The customer's id")]


# -- routes ---------------------------------------------------------------------------------------
@router.get(
    "/v1/customers/{customer_id}",
    summary="A customer, masked",
    description="Restricted fields (the catalog's pii, pii_quasi, pci, credential) read "
    "`***MASKED***`. For the personal data in clear: GET /v1/customers/{id}/pii.",
    responses={**AUTH_RESPONSES, **NOT_FOUND},
)
def customer_masked(
    request: Request,
    customer_id: CustomerId,
    who: Annotated[Principal, Depends(require_scope("customers.read"))],
) -> CustomerMasked:
    # Unkeyed: this route never decrypts anything; restricted columns are read as "present?".
    with db.connect(_settings(request), with_key=False, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT {_select(CUSTOMER, masked=True)} {CUSTOMER_FROM}", (customer_id,)
        ).fetchone()
    _logged_read(
        request,
        who,
        "read_customer_masked",
        columns=CUSTOMER,
        ids=[customer_id],
        rows=0 if row is None else 1,
        clear=False,
    )
    if row is None:
        raise _not_found("customer", customer_id)
    values, masked = {}, []
    for column, value in zip(CUSTOMER, row, strict=True):
        if column.data_class == DataClass.NON_PERSONAL:
            values[column.field] = value
        else:
            masked.append(column.field)
            values[column.field] = (MASK if column.text else None) if value else None
    return CustomerMasked(**values, masked=masked)


@router.get(
    "/v1/customers/{customer_id}/pii",
    summary="A customer's personal data in clear (second factor)",
    description=f"Needs the scope customers.read, clearance for "
    f"{', '.join(CUSTOMER_PII_CLASSES)} and a second factor within the policy's step-up window "
    "(POST /v1/auth/mfa/verify). The read is logged.",
    responses={**AUTH_RESPONSES, **NOT_FOUND},
    dependencies=[Depends(require_scope("customers.read"))],
)
def customer_pii(
    request: Request,
    customer_id: CustomerId,
    who: Annotated[Principal, Depends(require_clear(*CUSTOMER_PII_CLASSES))],
) -> CustomerPii:
    with db.connect(_settings(request), autocommit=True) as conn:  # keyed: decrypts
        row = conn.execute(f"SELECT {_select(CUSTOMER)} {CUSTOMER_FROM}", (customer_id,)).fetchone()
        addresses = (
            []
            if row is None
            else conn.execute(
                f"SELECT {_select(ADDRESS)} {ADDRESS_FROM}", (customer_id,)
            ).fetchall()
        )
    _logged_read(
        request,
        who,
        "read_customer_pii",
        columns=CUSTOMER + ADDRESS if addresses else CUSTOMER,
        ids=[customer_id],
        rows=0 if row is None else 1 + len(addresses),
        clear=True,
        extra={"address_ids": [a[0] for a in addresses]},
    )
    if row is None:
        raise _not_found("customer", customer_id)
    return CustomerPii(
        **_row(CUSTOMER, row), addresses=[Address(**_row(ADDRESS, a)) for a in addresses]
    )


@router.get(
    "/v1/payment-instruments/{instrument_id}",
    summary="A payment instrument with its PAN in clear (second factor)",
    description=f"Needs the scope payments.read, clearance for "
    f"{', '.join(PAYMENT_INSTRUMENT_CLASSES)} and a second factor within the policy's step-up "
    "window. The read is logged.",
    responses={**AUTH_RESPONSES, **NOT_FOUND},
    dependencies=[Depends(require_scope("payments.read"))],
)
def payment_instrument(
    request: Request,
    instrument_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    who: Annotated[Principal, Depends(require_clear(*PAYMENT_INSTRUMENT_CLASSES))],
) -> PaymentInstrument:
    with db.connect(_settings(request), autocommit=True) as conn:  # keyed: decrypts the PAN
        row = conn.execute(
            f"SELECT {_select(PAYMENT_INSTRUMENT)} {PAYMENT_INSTRUMENT_FROM}", (instrument_id,)
        ).fetchone()
    _logged_read(
        request,
        who,
        "read_payment_instrument",
        columns=PAYMENT_INSTRUMENT,
        ids=[instrument_id],
        rows=0 if row is None else 1,
        clear=True,
    )
    if row is None:
        raise _not_found("payment instrument", instrument_id)
    return PaymentInstrument(**_row(PAYMENT_INSTRUMENT, row))


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)  # exact: an amount is never a binary float
    return value


def _export_rows(settings: Settings, since: dt.datetime, until: dt.datetime) -> Iterator[tuple]:
    """The period's payments in time order, fetched in batches on a server-side cursor (the
    memory of a request stays bounded whatever the period holds)."""
    with (
        db.connect(settings, with_key=False) as conn,
        conn.transaction(),
        conn.cursor(name="payments_export") as cursor,
    ):
        cursor.itersize = EXPORT_BATCH
        cursor.execute(
            f"SELECT {_select(PAYMENTS_EXPORT)} {PAYMENTS_EXPORT_FROM} ORDER BY t.DateTime, t.ID",
            {"since": since, "until": until},
        )
        yield from cursor


def _jsonl(rows: Iterator[tuple]) -> Iterator[str]:
    names = [c.field for c in PAYMENTS_EXPORT]
    for row in rows:
        yield json.dumps(dict(zip(names, map(_json_value, row), strict=True))) + "\n"


def _csv(rows: Iterator[tuple]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.field for c in PAYMENTS_EXPORT])
    for i, row in enumerate(rows, 1):
        writer.writerow([_json_value(v) for v in row])
        if i % EXPORT_BATCH == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


@router.get(
    "/v1/exports/payments",
    summary="Export the payments of a period (bulk: second factor)",
    description=f"The payments with `since` <= DateTime < `until` (at most {EXPORT_MAX_DAYS} days "
    f"and {EXPORT_MAX_ROWS:,} rows a request), in time order, as JSON lines (default) or CSV. "
    "Needs the scope exports.run and, a bulk export, a second factor within the policy's "
    "step-up window. The export is logged.",
    responses={
        **AUTH_RESPONSES,
        200: {"content": {"application/x-ndjson": {}, "text/csv": {}}},
        400: {"model": Problem, "description": "A period that is empty, reversed or too long"},
        413: {"model": Problem, "description": "More rows than one export may hold"},
    },
    response_class=StreamingResponse,
    dependencies=[Depends(require_scope("exports.run"))],
)
def export_payments(
    request: Request,
    since: Annotated[AwareDatetime, Query(description="Start, inclusive (with its zone)")],
    until: Annotated[AwareDatetime, Query(description="End, exclusive (with its zone)")],
    who: Annotated[Principal, Depends(require_clear(*PAYMENTS_EXPORT_CLASSES, bulk=True))],
    format: Annotated[Literal["jsonl", "csv"], Query(description="jsonl or csv")] = "jsonl",
) -> StreamingResponse:
    if until <= since:
        raise HTTPException(400, f"until ({until.isoformat()}) must be after since")
    if until - since > dt.timedelta(days=EXPORT_MAX_DAYS):
        raise HTTPException(
            400, f"a period of at most {EXPORT_MAX_DAYS} days a request: split the export"
        )
    settings = _settings(request)
    with db.connect(settings, with_key=False, autocommit=True) as conn:
        (rows,) = conn.execute(
            f"SELECT count(*) FROM (SELECT 1 {PAYMENTS_EXPORT_FROM} LIMIT %(limit)s) bounded",
            {"since": since, "until": until, "limit": EXPORT_MAX_ROWS + 1},
        ).fetchone()
    if rows > EXPORT_MAX_ROWS:
        raise HTTPException(413, f"more than {EXPORT_MAX_ROWS:,} payments in the period: narrow it")
    _logged_read(
        request,
        who,
        "export_payments",
        columns=PAYMENTS_EXPORT,
        ids=[],
        rows=rows,
        clear=True,
        extra={"since": since.isoformat(), "until": until.isoformat(), "format": format},
    )
    stream = _export_rows(settings, since, until)
    name = f"payments_{since:%Y%m%dT%H%M%S}_{until:%Y%m%dT%H%M%S}"
    if format == "csv":
        body, media, suffix = _csv(stream), "text/csv", "csv"
    else:
        body, media, suffix = _jsonl(stream), "application/x-ndjson", "jsonl"
    return StreamingResponse(
        body,
        media_type=media,
        headers={
            "Content-Disposition": f'attachment; filename="{name}.{suffix}"',
            "Cache-Control": "no-store",
            "X-Row-Count": str(rows),
        },
    )
