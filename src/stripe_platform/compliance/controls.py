"""The daily compliance controls (issue 23 §5, docs/compliance.md): each checks one requirement on
the platform's real state and records pass/fail with its evidence in ``privacy.control_result``
(sql/oltp/0026_breach_controls.sql); a failure raises an incident (audit/incidents.py), so the
alert goes the existing way. The compliance dashboard reads :func:`latest` and :func:`history`.

Evidence holds counts and names (stores, datasets, fields, principals, files), never a value read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import yaml

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError

log = logging.getLogger("stripe_platform.compliance.controls")

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

    return db.connect_to_table(
        settings,
        "privacy.control_result",
        what="control results table",
        migration=26,
        error=ControlError,
    )


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
    failure; returns the results in CONTROLS order. A control that cannot run (a store out of
    reach) is recorded failed, the error in its evidence: an unchecked control is not a pass."""
    names = list(CONTROLS) if not only else list(dict.fromkeys(only))
    unknown = [n for n in names if n not in CONTROLS]
    if unknown:
        raise ControlError(f"unknown control(s) {', '.join(unknown)}; known: {', '.join(CONTROLS)}")
    now = now or dt.datetime.now(dt.UTC)
    shared = _Shared(settings)
    results = []
    for name in CONTROLS:
        if name not in names:
            continue
        try:
            result = _CHECKS[name](settings, now, shared)
        except Exception as exc:  # recorded as a failure with its reason, never skipped silently
            log.exception("compliance control %s could not run", name)
            result = ControlResult(
                name, False, 0, "error", {"error": f"{type(exc).__name__}: {exc}"}
            )
        results.append(replace(result, run_at=now))
    record(settings, results)
    raise_failures(settings, results)
    return results


def raise_failures(settings: Settings, results: list[ControlResult]) -> list[Any]:
    """An incident per failed control (one open incident per control: a failure on the next
    day's run is grouped into it, the alert goes once)."""
    from stripe_platform.audit import incidents
    from stripe_platform.audit.detect import Finding

    findings = [
        Finding(
            rule=f"control:{r.name}",
            severity=SEVERITY[r.name],
            title=f"compliance control {r.name} failed: {r.value:g} {r.unit}",
            user=None,
            source=None,
            at=r.run_at or dt.datetime.now(dt.UTC),
            evidence=(f"control:{r.name}:{(r.run_at or dt.datetime.now(dt.UTC)).isoformat()}",),
            dedup_key=f"control:{r.name}",
            detail={"value": r.value, "unit": r.unit, "violations": _violations(r.evidence)},
        )
        for r in results
        if not r.passed
    ]
    return incidents.raise_findings(settings, findings)


def _violations(evidence: dict[str, Any]) -> list[Any]:
    return list(evidence.get("violations", []))[:20]


# Incident severity of each control's failure: card data out of scope and personal data sent
# where it may not go are the brief's hard lines.
SEVERITY = {
    "encryption_coverage": "high",
    "access_policy_drift": "medium",
    "expired_access": "high",
    "retention": "medium",
    "pci_scope": "critical",
    "unauthorised_transfers": "critical",
}


class _Shared:
    """What two controls read: the catalog, the declarations, one coverage report, one scan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._coverage: Any = None
        self._scan: Any = None

    @functools.cached_property
    def catalog(self) -> Any:
        from stripe_platform.governance.classification import load_catalog

        return load_catalog()

    @functools.cached_property
    def declarations(self) -> dict[str, Any]:
        return load_declarations()

    @functools.cached_property
    def coverage(self) -> Any:
        from stripe_platform.security.coverage import coverage_report

        return coverage_report(self.settings, catalog=self.catalog)

    @functools.cached_property
    def scan(self) -> Any:
        """The recognizers (e-mail, phone, IBAN, card numbers with Luhn, IPs) over every store's
        sampled values; the marts too (governance/scan.py leaves them out of its own scan)."""
        from stripe_platform.governance import scan as scanning
        from stripe_platform.governance.sampling import StoreNotBuilt, StoreUnreachable, open_store
        from stripe_platform.transform.dbt import MARTS_SCHEMA

        report = scanning.scan(self.settings, catalog=self.catalog, stores=scanning.SCANNED)
        try:
            with open_store(self.settings, "marts") as reader:
                for dataset in self.catalog.datasets("marts"):
                    entries = self.catalog.dataset("marts", dataset)
                    rows = reader.rows(
                        f"{MARTS_SCHEMA}.{dataset.lower()}",
                        report.limit,
                        names=[e.field for e in entries],
                    )
                    if rows is None:
                        continue
                    scanning.scan_rows(report, "marts", dataset, entries, rows)
                    report.datasets["marts"] = report.datasets.get("marts", 0) + 1
        except StoreNotBuilt as exc:
            report.skipped.append(f"marts: {exc}")
        except StoreUnreachable as exc:
            report.skipped.append(f"marts: not scanned ({exc})")
        return report


# -- the controls --------------------------------------------------------------------------------
def _encryption_coverage(settings: Settings, now: dt.datetime, shared: _Shared) -> ControlResult:
    """security/coverage.py's report (never recomputed): passes when no protected field is in
    clear in any store it could check."""
    report = shared.coverage
    data = report.as_dict()
    unchecked = [s.store for s in report.stores if s.state != "checked"]
    evidence = {
        "violations": data["in_clear"],
        "protected": data["protected"],
        "total": data["total"],
        "stores": {
            name: {k: v for k, v in store.items() if k != "fields"}
            for name, store in data["stores"].items()
        },
        "not_checked": unchecked,
    }
    percent = report.percent if report.percent is not None else 0.0
    return ControlResult(
        "encryption_coverage", not report.in_clear and report.total > 0, percent, "%", evidence
    )


def _policy(settings: Settings) -> Any:
    from stripe_platform.security.policy import load_policy

    return load_policy(settings)


def _access_policy_drift(settings: Settings, now: dt.datetime, shared: _Shared) -> ControlResult:
    """security/access.py's plan: every difference between the access policy and what the stores
    grant (an extra GRANT, a missing revoke) is drift."""
    from stripe_platform.security.access import load_targets, plan_all

    changes = plan_all(settings, _policy(settings), now)
    _, notes = load_targets()
    evidence = {"violations": [c.public() for c in changes], "notes": notes}
    return ControlResult("access_policy_drift", not changes, len(changes), "changes", evidence)


def _expired_access(settings: Settings, now: dt.datetime, shared: _Shared) -> ControlResult:
    """security/access.py's expiry: access still usable past its end date."""
    from stripe_platform.security.access import expired_all

    found = expired_all(settings, _policy(settings), now)
    evidence = {"violations": [e.public() for e in found]}
    return ControlResult("expired_access", not found, len(found), "grants", evidence)


def _retention(settings: Settings, now: dt.datetime, shared: _Shared) -> ControlResult:
    """No data past its declared period in any store; each store checked is listed with its
    period and where the period is declared."""
    checked: list[dict[str, Any]] = []
    violations: list[dict[str, Any]] = []

    def check(store: str, period: str, declared: str, found: list[dict[str, Any]]) -> None:
        checked.append(
            {"store": store, "period": period, "declared": declared, "violations": len(found)}
        )
        violations.extend({"store": store, **f} for f in found)

    # 1. OLTP transactions: partitions past the retention stay attached only until the nightly
    #    maintenance detaches them to `archive`; rows in the default partition never move.
    months = settings.partition_retention_months
    from stripe_platform.oltp import db
    from stripe_platform.oltp.partitions import add_months, existing_partitions, month_start

    oldest_kept = add_months(month_start(now.date()), -months)
    cutoff = dt.datetime.combine(oldest_kept, dt.time(), dt.UTC)
    with db.connect(settings, with_key=False, autocommit=True) as conn:
        found = [
            {"what": f"partition {name}", "month": month.isoformat()}
            for month, name in sorted(existing_partitions(conn).items())
            if month < oldest_kept
        ]
        (old_rows,) = conn.execute(
            "SELECT count(*) FROM transaction_default WHERE datetime < %s", (cutoff,)
        ).fetchone()
        if old_rows:
            found.append(
                {
                    "what": "transaction_default rows",
                    "count": old_rows,
                    "before": cutoff.isoformat(),
                }
            )
        check(
            "postgres transaction",
            f"{months} months live (then `archive`)",
            "partition_retention_months",
            found,
        )
        # 2. The audit trail's hot part: records older than audit_hot_days leave PostgreSQL with
        #    the daily retention job (a day's slack for the job itself).
        hot_cutoff = now - dt.timedelta(days=settings.audit_hot_days + 1)
        rows = conn.execute(
            "SELECT stream, count(*), min(at) FROM audit.trail_record WHERE at < %s "
            "GROUP BY stream ORDER BY stream",
            (hot_cutoff,),
        ).fetchall()
        check(
            "postgres audit.trail_record",
            f"{settings.audit_hot_days} days",
            "audit_hot_days",
            [
                {"what": f"stream {s}", "count": n, "oldest": oldest.isoformat()}
                for s, n, oldest in rows
            ],
        )
    # 3. The Log collection: audit records, kept for the audit retention.
    from stripe_platform.audit.collector import COLLECTION
    from stripe_platform.docstore import client as docstore

    log_cutoff = now - dt.timedelta(days=settings.audit_retention_days + 1)
    database = docstore.connect(settings)
    try:
        old_logs = database[COLLECTION].count_documents({"session_start": {"$lt": log_cutoff}})
    finally:
        database.client.close()
    check(
        f"documents {COLLECTION}",
        f"{settings.audit_retention_days} days",
        "audit_retention_days",
        [{"what": "documents", "count": old_logs, "before": log_cutoff.isoformat()}]
        if old_logs
        else [],
    )
    # 4. The audit lake: days older than the retention are removed by the same job.
    check(
        "lake audit/",
        f"{settings.audit_retention_days} days",
        "audit_retention_days",
        _old_audit_lake_days(
            settings, (now - dt.timedelta(days=settings.audit_retention_days + 1)).date()
        ),
    )
    # 5. Privacy access exports: the subject's data, kept only while the request may be read.
    days = int(shared.declarations["retention"]["privacy_exports_days"])
    check(
        "home privacy/exports",
        f"{days} days",
        "compliance/declarations.yaml retention.privacy_exports_days",
        _old_files(_export_dir(settings), now - dt.timedelta(days=days)),
    )
    evidence = {"violations": violations, "checked": checked}
    compliant = sum(1 for c in checked if not c["violations"])
    return ControlResult(
        "retention", not violations, round(100.0 * compliant / len(checked), 1), "%", evidence
    )


def _export_dir(settings: Settings) -> Path:
    from stripe_platform.compliance.requests import export_dir

    return export_dir(settings)


def _old_files(directory: Path, before: dt.datetime) -> list[dict[str, Any]]:
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
            if mtime < before:
                found.append({"what": f"file {path.name}", "modified": mtime.isoformat()})
    return found


def _old_audit_lake_days(settings: Settings, before: dt.date) -> list[dict[str, Any]]:
    import pyarrow.fs as pafs

    from stripe_platform.audit import trail

    writer = trail._lake_writer(settings)
    top = f"{writer.base}/audit"
    with writer.reaching(top, "read"):
        if writer.filesystem.get_file_info(top).type == pafs.FileType.NotFound:
            return []
        infos = writer.filesystem.get_file_info(pafs.FileSelector(top, recursive=True))
    found = []
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("date="):
            continue
        with contextlib.suppress(ValueError):  # a directory not named by a date: not a day
            day = dt.date.fromisoformat(info.base_name.removeprefix("date="))
            if day < before:
                found.append({"what": f"day {writer.uri(info.path)}", "date": day.isoformat()})
    return found


def _pci_scope(settings: Settings, now: dt.datetime, shared: _Shared) -> ControlResult:
    """Card data only where declared (declarations.yaml `pci_allowed`): every catalog entry of
    class pci must be declared there, no sampled value anywhere else may be a card number (Luhn),
    and a declared place must hold it encrypted (the coverage report)."""
    allowed = set(shared.declarations["pci_allowed"])
    violations: list[dict[str, Any]] = []
    pci_entries = [e for e in shared.catalog.entries if e.data_class.value == "pci"]
    for entry in pci_entries:
        where = f"{entry.store} {entry.dataset}.{entry.field}"
        if where not in allowed:
            violations.append(
                {
                    "where": where,
                    "why": "catalog class pci outside the PCI scope",
                    "declared_at": entry.declared_at,
                }
            )
    for f in shared.scan.findings:
        where = f"{f.store} {f.dataset}.{f.field}"
        if f.found == "card_number" or (f.declared == "pci" and f.found == "clear text"):
            violations.append(
                {
                    "where": where,
                    "why": f"{f.found} in {f.matches} of {f.sampled} sampled values",
                    "in_scope": where in allowed,
                }
            )
    for f in shared.coverage.in_clear:
        if f.data_class == "pci":
            violations.append({"where": f.name, "why": "card data in clear"})
    evidence = {
        "violations": violations,
        "allowed": sorted(allowed),
        "pci_fields": [f"{e.store} {e.dataset}.{e.field}" for e in pci_entries],
        "scanned": shared.scan.sampled,
        "skipped": shared.scan.skipped,
    }
    return ControlResult("pci_scope", not violations, len(violations), "places", evidence)


def _unauthorised_transfers(settings: Settings, now: dt.datetime, shared: _Shared) -> ControlResult:
    """Classified data sent where its class may not go (declarations.yaml `destinations`):
    - syncs: each connection's destination is declared, and each class its streams carry may go
      there (airbyte/connections.yaml through the stream catalog);
    - what arrived: a class found in clear (coverage, recognizers) where only `encrypted` or
      `none` is allowed, e.g. PII in clear in the exploration lake;
    - files in the lake outside the declared streams' directories (an export or sync to an
      undeclared destination);
    - marts shared with third parties: the classes their columns carry, and what the recognizers
      find in them, must be allowed for `third_parties`;
    - API exports (the access log, the last day): a class read in clear that `api_export` does
      not allow."""
    destinations: dict[str, dict[str, str]] = shared.declarations["destinations"]
    violations: list[dict[str, Any]] = []

    def allowed(destination: str, data_class: str) -> str:
        return destinations.get(destination, {}).get(data_class, "none")

    # Syncs, as configured.
    from stripe_platform.ingestion.catalog import load_catalog as load_airbyte

    airbyte = load_airbyte()
    syncs = []
    for connection in airbyte.connections:
        resolved = airbyte.resolve(connection.name)
        target = "lake" if resolved.to_lake else "warehouse_raw"
        syncs.append(f"{connection.name} -> {target}")
        if target not in destinations:
            violations.append(
                {
                    "transfer": f"sync {connection.name}",
                    "to": target,
                    "why": "destination not declared",
                }
            )
            continue
        for entry in shared.catalog.for_store(target):  # type: ignore[arg-type]
            if _source_of(target, entry.dataset) != resolved.source.kind:
                continue
            cls = entry.data_class.value
            if cls != "non_personal" and allowed(target, cls) == "none":
                violations.append(
                    {
                        "transfer": f"sync {connection.name}",
                        "to": target,
                        "field": f"{entry.dataset}.{entry.field}",
                        "class": cls,
                        "why": f"{cls} may not go to {target}",
                    }
                )
    # What arrived in clear.
    for f in shared.coverage.in_clear:
        if f.store in destinations and allowed(f.store, f.data_class) != "clear":
            violations.append(
                {
                    "transfer": f"data in {f.store}",
                    "to": f.store,
                    "field": f.name,
                    "class": f.data_class,
                    "why": f"{f.data_class} in clear ({f.clear} of {f.sampled})",
                }
            )
    for f in shared.scan.findings:
        if f.level != "contradiction" or f.store not in destinations:
            continue
        implied = _RECOGNIZED_CLASS.get(f.found)
        if implied and allowed(f.store, implied) != "clear":
            violations.append(
                {
                    "transfer": f"data in {f.store}",
                    "to": f.store,
                    "field": f"{f.dataset}.{f.field}",
                    "class": implied,
                    "why": f"{f.found} in clear in {f.matches} of {f.sampled} "
                    f"sampled values of a {f.declared} field",
                }
            )
    # Marts shared with third parties (meta shared_with_third_parties, compliance/consent.py):
    # the partner receives what their columns carry, so each class must be allowed there.
    from stripe_platform.compliance.consent import shared_marts

    third_party = sorted(shared_marts())
    for mart in third_party:
        for entry in shared.catalog.dataset("marts", mart):
            cls = entry.data_class.value
            if cls != "non_personal" and allowed("third_parties", cls) != "clear":
                violations.append(
                    {
                        "transfer": f"shared mart {mart}",
                        "to": "third_parties",
                        "field": f"{mart}.{entry.field}",
                        "class": cls,
                        "why": f"{cls} shared with third parties",
                    }
                )
    for f in shared.scan.findings:
        implied = _RECOGNIZED_CLASS.get(f.found)
        if (
            f.store == "marts"
            and f.dataset in third_party
            and implied
            and allowed("third_parties", implied) != "clear"
        ):
            violations.append(
                {
                    "transfer": f"shared mart {f.dataset}",
                    "to": "third_parties",
                    "field": f"{f.dataset}.{f.field}",
                    "class": implied,
                    "why": f"{f.found} in {f.matches} of {f.sampled} sampled "
                    "values shared with third parties",
                }
            )
    # Files in the lake no declared stream explains.
    stray = _stray_lake_files(settings, shared.catalog)
    violations.extend(
        {
            "transfer": "lake file",
            "to": "lake",
            "file": p,
            "why": "not under a declared stream (raw/ or superseded/) nor audit/",
        }
        for p in stray
    )
    # API exports in the last day.
    exports = _api_exports(settings, now - dt.timedelta(days=1), now)
    for event in exports:
        for cls in event["classes_in_clear"]:
            if allowed("api_export", cls) != "clear":
                violations.append(
                    {
                        "transfer": f"API {event['action']}",
                        "to": "api_export",
                        "user": event["user"],
                        "class": cls,
                        "at": event["time"],
                        "why": f"{cls} exported in clear",
                    }
                )
    evidence = {
        "violations": violations,
        "syncs": syncs,
        "shared_with_third_parties": third_party,
        "api_exports": len(exports),
        "destinations": sorted(destinations),
    }
    return ControlResult(
        "unauthorised_transfers", not violations, len(violations), "transfers", evidence
    )


def _source_of(store: str, dataset: str) -> str:
    """The source a raw dataset came from: lake "postgres.customer", raw "raw.postgres_customer"."""
    if store == "lake":
        return dataset.split(".", 1)[0]
    return dataset.split(".", 1)[1].split("_", 1)[0]


_RECOGNIZED_CLASS = {
    "email": "pii",
    "phone": "pii",
    "iban": "pii",
    "card_number": "pci",
    "ip_address": "pii_quasi",
}


def _stray_lake_files(settings: Settings, catalog: Any) -> list[str]:
    import pyarrow.fs as pafs

    from stripe_platform.lake.writer import HISTORY, LIVE, LakeWriter

    lake = LakeWriter.from_settings(settings)
    declared = [f"{lake.base}/audit/"]
    for dataset in catalog.datasets("lake"):
        source, stream = dataset.split(".", 1)
        declared += [
            f"{lake.base}/{LIVE}/{source}/{stream}/",
            f"{lake.base}/{HISTORY}/{source}/{stream}/",
        ]
    with lake.reaching(lake.base, "read"):
        if lake.filesystem.get_file_info(lake.base).type == pafs.FileType.NotFound:
            return []
        infos = lake.filesystem.get_file_info(pafs.FileSelector(lake.base, recursive=True))
    return sorted(
        lake.uri(i.path)
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and not any(i.path.startswith(d) for d in declared)
    )


def _api_exports(
    settings: Settings, since: dt.datetime, until: dt.datetime
) -> list[dict[str, Any]]:
    """The API's allowed export reads (kind read, action export_*) between the two times, from
    the access log files."""
    from stripe_platform.audit import access_log

    directory = Path(access_log._directory(settings))
    found = []
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("*.jsonl")):
        with path.open() as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("kind") != "read" or event.get("outcome") != "allow":
                        continue
                    if not str(event.get("action", "")).startswith("export"):
                        continue
                    at = dt.datetime.fromisoformat(event["time"])
                    if since <= at <= until:
                        detail = event.get("detail") or {}
                        found.append(
                            {
                                "action": event["action"],
                                "user": event.get("user"),
                                "time": event["time"],
                                "classes_in_clear": detail.get("classes_in_clear", []),
                            }
                        )
    return found


_CHECKS = {
    "encryption_coverage": _encryption_coverage,
    "access_policy_drift": _access_policy_drift,
    "expired_access": _expired_access,
    "retention": _retention,
    "pci_scope": _pci_scope,
    "unauthorised_transfers": _unauthorised_transfers,
}
