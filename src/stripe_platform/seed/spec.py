"""What a seed run generates: validated before anything is written."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stripe_platform.errors import PlatformError

TRANSACTIONS_AT_SCALE_1 = 1_000_000
CUSTOMERS_AT_SCALE_1 = 20_000
MERCHANTS_AT_SCALE_1 = 2_000
LOGS_AT_SCALE_1 = 5_000


class SeedError(PlatformError, ValueError):
    """The seed cannot run as asked; nothing was written."""


class SeedSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float = Field(0.05, gt=0, le=20, description="1 = 1,000,000 transactions")
    seed: int = Field(42, ge=0, description="Same seed, same data")
    fraud_rate: float = Field(0.005, ge=0.001, le=0.01, description="Planted fraud share (0.1-1%)")
    end: dt.date = Field(
        default_factory=lambda: dt.datetime.now(dt.UTC).date(),
        description="Data runs up to this day (exclusive), UTC",
    )
    days: int = Field(730, ge=60, le=3650, description="Length of history in days")
    max_documents: int | None = Field(
        None,
        ge=100,
        description="Cap per large document collection; None (the default) writes them in full",
    )

    @field_validator("end")
    @classmethod
    def _not_far_future(cls, value: dt.date) -> dt.date:
        if value > dt.date.today() + dt.timedelta(days=366):
            raise ValueError("end must not be more than a year ahead")
        return value

    @property
    def start(self) -> dt.date:
        return self.end - dt.timedelta(days=self.days)

    @property
    def n_transactions(self) -> int:
        return max(1_000, round(TRANSACTIONS_AT_SCALE_1 * self.scale))

    @property
    def n_customers(self) -> int:
        return max(100, round(CUSTOMERS_AT_SCALE_1 * self.scale))

    @property
    def n_merchants(self) -> int:
        return max(40, round(MERCHANTS_AT_SCALE_1 * self.scale))

    @property
    def n_logs(self) -> int:
        return max(300, round(LOGS_AT_SCALE_1 * self.scale))

    def cap(self, n: int) -> int:
        return n if self.max_documents is None else min(n, self.max_documents)

    @property
    def run_key(self) -> str:
        """Identifies the data this spec produces (and so which batches a re-run may skip)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_spec(**values: object) -> SeedSpec:
    try:
        return SeedSpec(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            field = ".".join(str(p) for p in e["loc"]) or "seed"
            problems.append(f"--{field.replace('_', '-')}={e.get('input')!r}: {e['msg']}")
        raise SeedError("; ".join(problems)) from None
