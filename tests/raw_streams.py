"""The stream and batch helper the raw-writer tests share (tests/test_raw_layer.py, the contract
every writer keeps, and the per-backend files)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from stripe_platform.rawlayer import Column, RawStream

MERCHANT = RawStream(
    namespace="raw_postgres",
    name="merchant",
    columns=(Column("id", "integer"), Column("name", "string"), Column("rating", "number")),
    primary_key=("id",),
    mode="append_dedup",
    cdc="postgres",
)


def batch(**columns: Any) -> pa.Table:
    return pa.table(columns)
