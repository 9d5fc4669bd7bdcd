"""The daily compliance controls (issue 23 §5, docs/compliance.md): each checks one requirement on
the platform's real state and records pass/fail with its evidence in ``privacy.control_result``
(sql/oltp/0026_breach_controls.sql); a failure raises an incident (audit/incidents.py), so the
alert goes the existing way. The compliance dashboard reads :func:`latest` and :func:`history`.

Evidence holds counts and names (stores, datasets, fields, principals, files), never a value read.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg.rows import dict_row

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError

CONTROLS = (
    "encryption_coverage",
    "access_policy_drift",
    "expired_access",
    "retention",
    "pci_scope",
    "unauthorised_transfers",
)


DECLARATIONS = Path(__file__).with_name("declarations.yaml")
DESTINATION_MODES = ("clear", "encrypted", "none")


class ControlError(PlatformError, ValueError):
    """A control cannot be run or read as asked (the message says why)."""


def load_declarations(path: Path = DECLARATIONS) -> dict[str, Any]:
    """compliance/declarations.yaml, checked: the controller and DPO, the PCI scope, the allowed
    destinations per class."""
    where = path.name
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ControlError(f"{where}: cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ControlError(f"{where}: not a mapping")
    for key in ("controller", "dpo", "pci_allowed", "destinations"):
        if key not in data:
            raise ControlError(f"{where}: `{key}` is missing")
    for destination, classes in data["destinations"].items():
        for data_class, mode in (classes or {}).items():
            if mode not in DESTINATION_MODES:
                raise ControlError(
                    f"{where}: destinations.{destination}.{data_class}: {mode!r} is not one of "
                    f"{', '.join(DESTINATION_MODES)}"
                )
    return data


@dataclass(frozen=True)
class ControlResult:
    name: str  # one of CONTROLS
    passed: bool
    value: float  # the control's figure (a percentage, or a count of violations)
    unit: str  # "%" or what is counted ("changes", "grants", "items", "fields", "transfers")
    evidence: dict[str, Any] = field(default_factory=dict)
    run_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "value": self.value,
            "unit": self.unit,
            "evidence": self.evidence,
            "run_at": self.run_at.astimezone(dt.UTC).isoformat() if self.run_at else None,
        }


def _connect(settings: Settings) -> psycopg.Connection:
    from stripe_platform.oltp import db

    conn = db.connect(settings, with_key=False, autocommit=True)
    conn.row_factory = dict_row
    present = conn.execute(
        "SELECT to_regclass('privacy.control_result') IS NOT NULL AS p"
    ).fetchone()
    if not present["p"]:
        database = conn.info.dbname
        conn.close()
        raise ControlError(
            f"database {database} has no control results table (migration 0026): run "
            "`stripe-platform db migrate` first"
        )
    return conn


def _result(row: dict[str, Any]) -> ControlResult:
    return ControlResult(
        name=row["name"],
        passed=row["passed"],
        value=row["value"],
        unit=row["unit"],
        evidence=row["evidence"] or {},
        run_at=row["run_at"],
    )


def record(settings: Settings, results: list[ControlResult]) -> None:
    """Store results (one row each) in one transaction."""
    with _connect(settings) as conn, conn.transaction():
        for r in results:
            conn.execute(
                "INSERT INTO privacy.control_result (name, passed, value, unit, evidence, run_at) "
                "VALUES (%s, %s, %s, %s, %s::jsonb, %s)",
                (
                    r.name,
                    r.passed,
                    float(r.value),
                    r.unit,
                    json.dumps(r.evidence, default=str, sort_keys=True),
                    r.run_at,
                ),
            )


def latest(settings: Settings) -> list[ControlResult]:
    """The latest recorded result of each control, in CONTROLS order (a control never run is
    absent)."""
    with _connect(settings) as conn:
        rows = conn.execute(
            "SELECT DISTINCT ON (name) name, passed, value, unit, evidence, run_at "
            "FROM privacy.control_result ORDER BY name, run_at DESC, id DESC"
        ).fetchall()
    by_name = {row["name"]: _result(row) for row in rows}
    return [by_name[name] for name in CONTROLS if name in by_name]


def history(
    settings: Settings, days: int, *, name: str | None = None, now: dt.datetime | None = None
) -> list[ControlResult]:
    """Every result recorded in the last ``days`` days (of one control when ``name``), oldest
    first: the dashboard's trend."""
    if days < 1:
        raise ControlError(f"history: days must be at least 1, not {days}")
    if name is not None and name not in CONTROLS:
        raise ControlError(f"unknown control {name!r}; known: {', '.join(CONTROLS)}")
    now = now or dt.datetime.now(dt.UTC)
    since = now - dt.timedelta(days=days)
    with _connect(settings) as conn:
        rows = conn.execute(
            "SELECT name, passed, value, unit, evidence, run_at FROM privacy.control_result "
            "WHERE run_at > %s AND run_at <= %s AND (%s::text IS NULL OR name = %s) "
            "ORDER BY run_at, id",
            (since, now, name, name),
        ).fetchall()
    return [_result(row) for row in rows]


def run_controls(
    settings: Settings, *, now: dt.datetime | None = None, only: list[str] | None = None
) -> list[ControlResult]:
    """Run the controls (all, or ``only`` those), record each result, raise an incident per
    failure; returns the results in CONTROLS order."""
    raise NotImplementedError("compliance controls: being built (issue 23, P4)")
