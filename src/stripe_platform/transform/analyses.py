"""The brief's analytics queries, kept as dbt analyses (dbt_project/analyses) exactly as the brief
writes them, run against the marts of the configured warehouse."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.transform.dbt import DBT_PROJECT_DIR, MARTS_SCHEMA
from stripe_platform.warehouse import open_marts_connection

ANALYSES_DIR = DBT_PROJECT_DIR / "analyses"


class AnalysisError(PlatformError, LookupError):
    """An unknown query name, or marts that are not built yet."""


@dataclass
class QueryResult:
    name: str
    sql: str
    columns: list[str]
    rows: list[tuple[Any, ...]]
    seconds: float


def available() -> dict[str, Path]:
    """Query name (the file name with dashes) -> analysis file."""
    return {p.stem.replace("_", "-"): p for p in sorted(ANALYSES_DIR.glob("*.sql"))}


def query_sql(name: str) -> str:
    queries = available()
    if name not in queries:
        raise AnalysisError(f"unknown query {name!r}; known: {', '.join(queries)}")
    # The statement without the leading comment lines and the final semicolon.
    lines = [ln for ln in queries[name].read_text().splitlines() if not ln.startswith("--")]
    return "\n".join(lines).strip().rstrip(";")


def _not_built(settings: Settings, name: str, exc: Exception) -> AnalysisError:
    return AnalysisError(
        f"{name}: the marts are not built on the {settings.warehouse_backend} warehouse yet "
        f"(run `stripe-platform transform`): {exc}"
    )


def _missing(exc: Exception) -> bool:
    text = str(exc).lower()
    return "does not exist" in text or "not found" in text or "no catalog" in text


def run_analysis(settings: Settings, name: str) -> QueryResult:
    sql = query_sql(name)
    try:
        conn = open_marts_connection(settings, MARTS_SCHEMA)
    except Exception as exc:
        if _missing(exc):
            raise _not_built(settings, name, exc) from exc
        raise
    try:
        started = time.perf_counter()
        try:
            # DuckDB's and psycopg's connections execute directly (a DuckDB cursor() would be a new
            # session without the schema setting); Snowflake's only through a cursor.
            cursor = conn.execute(sql) if hasattr(conn, "execute") else conn.cursor().execute(sql)
        except Exception as exc:
            if _missing(exc):
                raise _not_built(settings, name, exc) from exc
            raise
        rows = [tuple(r) for r in cursor.fetchall()]
        elapsed = time.perf_counter() - started
        columns = [d[0] for d in cursor.description]
    finally:
        conn.close()
    return QueryResult(name, sql, columns, rows, elapsed)
