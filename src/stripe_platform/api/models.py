"""The API's request and response schemas (pydantic): what the OpenAPI document shows, with examples.

Requests are validated strictly where JSON has the type (a number is a number, not a string that
looks like one) so the schema says exactly what is accepted: anything else is a 422 naming the
field. Ids are the contract's text (``ml.contract``); the platform's integer ids are accepted and
become their decimal text, as ``load_platform_transactions`` reads them.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)

from stripe_platform.ml.contract import AMOUNT_LIMIT, TransactionRecord, eur_rates


@functools.cache
def rates() -> dict[str, float]:
    """Euros per unit of each currency, read once (the warehouse's seed)."""
    return eur_rates()


def currencies() -> tuple[str, ...]:
    """The currency codes a payment may be in: those with a EUR rate."""
    return tuple(sorted(rates()))


def _integral(value: object) -> object:
    # JSON has one number type: 18.0 is the integer 18 to a JSON Schema validator, and to us.
    if isinstance(value, bool):
        raise ValueError("must be a string or an integer, not a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


IdText = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"\S")]
IdNumber = Annotated[StrictInt, Field(ge=0, le=10**18)]  # 10**18: exact as a JSON double too
Id = Annotated[
    IdText | IdNumber,
    BeforeValidator(_integral),
    Field(
        description="Text (1-128 characters, not blank) or an integer from 0 to 10^18 (made its decimal text)"
    ),
]


IpAddress = Annotated[
    str, WithJsonSchema({"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]})
]

EXAMPLE_REQUEST: dict[str, Any] = {
    "transaction_id": "84512",
    "timestamp": "2025-12-31T18:42:07Z",
    "customer_id": "1207",
    "merchant_id": "311",
    "amount": 249.90,
    "currency": "USD",
    "device_id": "5521",
    "ip": "203.0.113.47",
    "country": "US",
    "billing_country": "GB",
}


class ScoreRequest(BaseModel):
    """One payment to score. Its features are computed against the platform's recent payments
    (the online feature state the stream keeps); the payment itself is not remembered."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_REQUEST]})

    transaction_id: Id
    timestamp: dt.datetime = Field(
        description="When the payment happened (ISO 8601; without a time zone it is UTC)"
    )
    customer_id: Id
    merchant_id: Id
    amount: StrictFloat = Field(
        ge=0, lt=AMOUNT_LIMIT, description="The amount in `currency` (converted to EUR)"
    )
    currency: str = Field(
        description="ISO 4217 code: one of the platform's currencies with a EUR rate",
        json_schema_extra={"enum": list(currencies())},
    )
    device_id: Id | None = None
    ip: IpAddress | None = Field(None, description="The client's IPv4 or IPv6 address")
    country: str | None = Field(
        None, pattern=r"^[A-Za-z]{2}$", description="Where the payment happened (ISO 3166 alpha-2)"
    )
    billing_country: str | None = Field(
        None, pattern=r"^[A-Za-z]{2}$", description="The customer's billing country (alpha-2)"
    )

    @field_validator("timestamp", mode="before")
    @classmethod
    def _iso_text(cls, value: object) -> object:
        # pydantic would also take a number as Unix time: the schema says a date-time string.
        if not isinstance(value, str | dt.datetime):
            raise ValueError("must be an ISO 8601 date-time string")
        return value

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        try:
            return value.astimezone(dt.UTC)
        except OverflowError:
            raise ValueError("is out of range once converted to UTC") from None

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        if value not in currencies():
            raise ValueError(f"unknown currency {value!r}: one of {', '.join(currencies())}")
        return value

    @field_validator("ip")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            # PostgreSQL's text form of an inet host (what the features were trained on).
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError("is not an IPv4 or IPv6 address") from None

    @field_validator("country", "billing_country")
    @classmethod
    def _upper(cls, value: str | None) -> str | None:
        return None if value is None else value.upper()

    def record(self) -> TransactionRecord:
        """The payment as the feature state reads it: the contract's record, amount in EUR."""
        return TransactionRecord(
            transaction_id=str(self.transaction_id),
            timestamp=self.timestamp,
            customer_id=str(self.customer_id),
            merchant_id=str(self.merchant_id),
            amount=float(self.amount) * rates()[self.currency],
            device_id=None if self.device_id is None else str(self.device_id),
            ip=self.ip,
            country=self.country,
            billing_country=self.billing_country,
        )


class ModelInfo(BaseModel):
    name: str = Field(description="The registered model (models:/<name>@champion)")
    version: str = Field(description="Its registered version")
    feature_version: str = Field(description="The feature definition it was trained with")
    threshold: float = Field(description="Scores at or above it are decided fraud")


class Contribution(BaseModel):
    feature: str
    value: float | None = Field(description="The feature's value (null: unknown)")
    contribution: float = Field(
        description="What the feature added to the score in log-odds (LightGBM's SHAP values)"
    )


EXAMPLE_RESPONSE: dict[str, Any] = {
    "transaction_id": "84512",
    "score": 0.0312,
    "is_fraud": False,
    "model": {
        "name": "fraud",
        "version": "3",
        "feature_version": "fv1-0123456789ab",
        "threshold": 0.41,
    },
    "contributions": [
        {"feature": "customer_amount_ratio_30d", "value": 4.2, "contribution": 0.91},
        {"feature": "country_mismatch", "value": 1.0, "contribution": 0.44},
    ],
    "features": {"amount": 229.91, "hour_of_day": 18.0, "new_device_90d": None},
}


class ScoreResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_RESPONSE]})

    transaction_id: str
    score: float = Field(ge=0, le=1, description="The champion's fraud probability")
    is_fraud: bool = Field(description="The decision: score >= the model's threshold")
    model: ModelInfo
    contributions: list[Contribution] | None = Field(
        description="The features that moved the score most, largest first (null: the model's "
        "kind gives no per-feature contributions)"
    )
    features: dict[str, float | None] = Field(
        description="Every feature the model read, by name (null: unknown, e.g. no device)"
    )


class Problem(BaseModel):
    """Why a request could not be served (not a validation error: those are 422s)."""

    detail: str


class Component(BaseModel):
    ready: bool
    detail: str
    error: str | None = Field(None, description="The last failure, when one happened")
    checked_at: dt.datetime | None = None


class Readiness(BaseModel):
    ready: bool = Field(description="Scores can be served: a model and warm features")
    model: ModelInfo | None = Field(description="The model serving now")
    components: dict[str, Component]


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"
