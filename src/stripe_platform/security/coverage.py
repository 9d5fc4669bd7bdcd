"""Encryption coverage (`stripe-platform keys coverage`, issue 20): the share of the catalog's
PROTECTED columns and fields (pci, pii, credential) that are encrypted, hashed or masked at rest,
per store, measured on the stores' real contents.

Each protected field of the catalog is sampled (up to ``sample`` non-empty values) and judged:
- encrypted: every value is ciphertext naming its key: the envelope format (``SPE1``, documents,
  lake, warehouse raw), PostgreSQL's pgcrypto with the key header (``SPK1``) or a legacy pgcrypto
  PGP message (the one-key ciphertext before issue 20, still encrypted);
- hashed: a credential held as a bcrypt hash (``$2a$``/``$2b$``/``$2y$``);
- masked (marts only): roles below admin cannot read it: the masked view hides it and, on
  PostgreSQL, no reader role may read the base mart; on Snowflake a masking policy is attached;
- empty or absent: no value (or no such column/dataset yet): listed, not counted against;
- in clear: any sampled value is none of the above: a failure, named in the report.

Per store: protected / total (encrypted + hashed + masked over those plus in-clear) and a percent;
a store that cannot be reached or is not built yet is reported so, never as 0 %. The JSON shape
(``CoverageReport.as_dict``) is stable: the compliance dashboard reads it. Reports carry counts and
names only, never a sampled value.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.governance.classification import (
    STORES,
    Catalog,
    DataClass,
    Entry,
    load_catalog,
)
from stripe_platform.governance.sampling import (
    StoreNotBuilt,
    StoreReader,
    StoreUnreachable,
    Warehouse,
    open_store,
)
from stripe_platform.security.envelope import Envelope

DEFAULT_SAMPLE = 200
MASKED = "***MASKED***"
PG_KEY_HEADER = b"SPK1"  # sql/oltp/0013_column_encryption.sql: 'SPK1' scope ':' version ':' PGP
_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")

Status = Literal["encrypted", "hashed", "masked", "empty", "absent", "in_clear"]
COVERED: frozenset[str] = frozenset({"encrypted", "hashed", "masked"})
StoreState = Literal["checked", "unreachable", "not_built"]


class CoverageError(PlatformError, ValueError):
    """Bad arguments to the coverage report (the message names them)."""


@dataclass(frozen=True)
class FieldCoverage:
    store: str
    dataset: str
    field: str
    data_class: str
    status: Status
    sampled: int = 0  # non-empty values looked at
    clear: int = 0  # of which in clear
    detail: str = ""

    @property
    def name(self) -> str:
        return f"{self.store} {self.dataset}.{self.field}"


@dataclass
class StoreCoverage:
    store: str
    state: StoreState = "checked"
    detail: str = ""
    fields: list[FieldCoverage] = field(default_factory=list)

    @property
    def protected(self) -> int:
        return sum(f.status in COVERED for f in self.fields)

    @property
    def total(self) -> int:
        return sum(f.status in COVERED or f.status == "in_clear" for f in self.fields)

    @property
    def percent(self) -> float | None:
        """None when nothing could be judged (store not checked, or every field empty)."""
        if self.state != "checked" or not self.total:
            return None
        return round(100.0 * self.protected / self.total, 1)

    @property
    def in_clear(self) -> list[FieldCoverage]:
        return [f for f in self.fields if f.status == "in_clear"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "state": self.state,
            "detail": self.detail,
            "protected": self.protected,
            "total": self.total,
            "percent": self.percent,
            "in_clear": [f.name for f in self.in_clear],
            "fields": [
                {
                    "dataset": f.dataset,
                    "field": f.field,
                    "class": f.data_class,
                    "status": f.status,
                    "sampled": f.sampled,
                    "clear": f.clear,
                    "detail": f.detail,
                }
                for f in self.fields
            ],
        }


@dataclass
class CoverageReport:
    sample: int
    stores: list[StoreCoverage] = field(default_factory=list)

    def store(self, name: str) -> StoreCoverage:
        for store in self.stores:
            if store.store == name:
                return store
        raise KeyError(name)

    @property
    def protected(self) -> int:
        return sum(s.protected for s in self.stores if s.state == "checked")

    @property
    def total(self) -> int:
        return sum(s.total for s in self.stores if s.state == "checked")

    @property
    def percent(self) -> float | None:
        return round(100.0 * self.protected / self.total, 1) if self.total else None

    @property
    def in_clear(self) -> list[FieldCoverage]:
        return [f for s in self.stores for f in s.in_clear]

    def as_dict(self) -> dict[str, Any]:
        return {
            "sample": self.sample,
            "protected": self.protected,
            "total": self.total,
            "percent": self.percent,
            "goal": 100.0,
            "in_clear": [f.name for f in self.in_clear],
            "stores": {s.store: s.as_dict() for s in self.stores},
        }

    def summary(self) -> str:
        """One line: the overall figure, each store's, and what is in clear."""
        parts = []
        for s in self.stores:
            if s.state != "checked":
                parts.append(f"{s.store} {s.state.replace('_', ' ')}")
            elif s.percent is None:
                parts.append(f"{s.store} no values")
            else:
                parts.append(f"{s.store} {_pct(s.percent)} ({s.protected}/{s.total})")
        overall = "n/a" if self.percent is None else _pct(self.percent)
        line = f"encryption coverage {overall} ({self.protected}/{self.total}): " + ", ".join(parts)
        if self.in_clear:
            line += "; IN CLEAR: " + ", ".join(f.name for f in self.in_clear)
        return line


def _pct(value: float) -> str:
    return f"{value:g} %"


# --- judging values ------------------------------------------------------------------------------


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview)):  # bson.Binary is a bytes
        return bytes(value)
    return None


def _is_pgp_message(data: bytes) -> bool:
    """A pgcrypto pgp_sym_encrypt message: a symmetric-key session key packet (tag 3) first."""
    return len(data) > 3 and (data[0] == 0xC3 or data[0] & 0xFC == 0x8C)


def _is_ciphertext(data: bytes) -> bool:
    if Envelope.is_ciphertext(data):
        return True
    if data.startswith(PG_KEY_HEADER):  # 'SPK1' scope ':' version ':' PGP message
        parts = data[len(PG_KEY_HEADER) :].split(b":", 2)
        return len(parts) == 3 and parts[1].isdigit() and _is_pgp_message(parts[2])
    return _is_pgp_message(data)


def judge(value: Any, data_class: DataClass) -> Literal["encrypted", "hashed", "clear", "empty"]:
    """What one stored value is. Text is clear unless it is a bcrypt hash (credentials) or the
    base64 text of a ciphertext (a store whose column is text)."""
    if value is None:
        return "empty"
    data = _as_bytes(value)
    if data is not None:
        if not data:
            return "empty"
        return "encrypted" if _is_ciphertext(data) else "clear"
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return "empty"
        if data_class == DataClass.CREDENTIAL and _BCRYPT.fullmatch(text):
            return "hashed"
        try:
            decoded = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return "clear"
        return "encrypted" if decoded and _is_ciphertext(decoded) else "clear"
    if isinstance(value, (list, tuple)) and not value:
        return "empty"
    return "clear"  # numbers, dates, JSON objects: a protected field in clear


def judge_field(entry: Entry, values: Iterable[Any]) -> FieldCoverage:
    counts = {"encrypted": 0, "hashed": 0, "clear": 0}
    for value in values:
        verdict = judge(value, entry.data_class)
        if verdict != "empty":
            counts[verdict] += 1
    sampled = sum(counts.values())
    status: Status
    if not sampled:
        status = "empty"
    elif counts["clear"]:
        status = "in_clear"
    elif counts["hashed"] and not counts["encrypted"]:
        status = "hashed"
    else:
        status = "encrypted"
    return FieldCoverage(
        entry.store,
        entry.dataset,
        entry.field,
        entry.data_class.value,
        status,
        sampled,
        counts["clear"],
        f"{counts['clear']} of {sampled} sampled values in clear" if counts["clear"] else "",
    )


def _absent(entry: Entry, detail: str) -> FieldCoverage:
    return FieldCoverage(
        entry.store, entry.dataset, entry.field, entry.data_class.value, "absent", detail=detail
    )


def _by_dataset(entries: Iterable[Entry]) -> dict[str, list[Entry]]:
    grouped: dict[str, list[Entry]] = {}
    for entry in entries:
        grouped.setdefault(entry.dataset, []).append(entry)
    return grouped


# --- stores (read through governance/sampling.py) -------------------------------------------------


def _check_sampled(store: StoreReader, entries: list[Entry], sample: int) -> list[FieldCoverage]:
    """Each entry judged on its sampled values; absent (with why) where the store lacks it."""
    results = []
    for dataset, group in _by_dataset(entries).items():
        values = store.values(dataset, [e.field for e in group], sample)
        for entry in group:
            if entry.field in values.missing:
                results.append(_absent(entry, values.missing[entry.field]))
            else:
                results.append(judge_field(entry, values.found[entry.field]))
    return results


def masking_vars(settings: Settings) -> dict[str, Any]:
    """The masking settings: the dbt project's vars (masked schema) and, from the access policy,
    the roles reading the marts in clear (``clear_roles``) and those reading only the masked
    views (``masked_roles``)."""
    from stripe_platform.security.access_warehouse import layout
    from stripe_platform.security.policy import load_policy
    from stripe_platform.transform.dbt import DBT_PROJECT_DIR

    project = yaml.safe_load((DBT_PROJECT_DIR / "dbt_project.yml").read_text())
    readers = layout(settings, load_policy(settings)).readers
    clear = list(readers["marts"])
    masked = [r for r in readers["marts_masked"] if r not in clear]
    return {**project["vars"], "clear_roles": clear, "masked_roles": masked}


def _check_marts(settings: Settings, entries: list[Entry], sample: int) -> list[FieldCoverage]:
    from stripe_platform.governance.sampling import WarehouseReader
    from stripe_platform.transform.dbt import MARTS_SCHEMA

    config = masking_vars(settings)
    masked_schema = config["masked_schema"]
    with open_store(settings, "marts") as store:
        assert isinstance(store, WarehouseReader)
        warehouse = store.warehouse
        views = warehouse.columns(masked_schema) if warehouse.backend != "snowflake" else {}
        readers = _pg_readers(warehouse, config) if warehouse.backend == "postgres" else []
        results = []
        for dataset, group in _by_dataset(entries).items():
            table = dataset.lower()
            values = store.values(f"{MARTS_SCHEMA}.{table}", [e.field for e in group], sample)
            for entry in group:
                if entry.field in values.missing:
                    results.append(_absent(entry, "not built"))
                    continue
                stored = judge_field(entry, values.found[entry.field])
                if stored.status in {"encrypted", "hashed"}:
                    results.append(stored)
                    continue
                hidden = _mart_hidden(
                    warehouse, entry, table, masked_schema, views, readers, config, sample
                )
                if hidden is None:  # in clear, or empty (nothing to hide today)
                    results.append(stored)
                else:
                    results.append(
                        FieldCoverage(
                            entry.store,
                            entry.dataset,
                            entry.field,
                            entry.data_class.value,
                            "masked",
                            stored.sampled,
                            0,
                            hidden,
                        )
                    )
        return results


def _pg_readers(warehouse: Warehouse, config: Mapping[str, Any]) -> list[str]:
    wanted = [r.lower() for r in config["masked_roles"]]
    return [r[0] for r in warehouse.rows("SELECT rolname FROM pg_roles") if r[0] in wanted]


def _mart_hidden(
    warehouse: Warehouse,
    entry: Entry,
    table: str,
    masked_schema: str,
    views: Mapping[str, Mapping[str, str]],
    readers: list[str],
    config: Mapping[str, Any],
    sample: int,
) -> str | None:
    """How the column is hidden below admin, or None when it is not."""
    from stripe_platform.transform.dbt import MARTS_SCHEMA

    if warehouse.backend == "snowflake":
        policies = warehouse.rows(
            "SELECT policy_name FROM TABLE(information_schema.policy_references("
            f"ref_entity_name => '{MARTS_SCHEMA.upper()}.{table.upper()}', "
            "ref_entity_domain => 'table')) "
            f"WHERE policy_kind = 'MASKING_POLICY' AND upper(ref_column_name) = {warehouse.param}",
            (entry.field.upper(),),
        )
        return f"masking policy {policies[0][0]}" if policies else None
    view_column = views.get(table, {}).get(entry.field.lower())
    if view_column is None:
        return None
    shown = warehouse.sample(warehouse.table_name(masked_schema, table), view_column, sample)
    if any(v not in (None, MASKED) for v in shown):
        return None
    if warehouse.backend == "duckdb":
        return f"view {masked_schema}.{table} (DuckDB: no roles; the file's mode guards the base)"
    relation = f"{MARTS_SCHEMA}.{table}"
    for role in ["public", *readers]:
        if warehouse.rows("SELECT has_table_privilege(%s, %s, 'SELECT')", (role, relation))[0][0]:
            return None  # a reader role reads the base mart: the view hides nothing
    clear = ", ".join(config["clear_roles"]) or "no policy role"
    return f"view {masked_schema}.{table}; base readable by {clear} only"


def _check(
    settings: Settings, store: str, entries: list[Entry], sample: int
) -> list[FieldCoverage]:
    if store == "marts":
        return _check_marts(settings, entries, sample)
    with open_store(settings, store) as reader:
        return _check_sampled(reader, entries, sample)


def coverage_report(
    settings: Settings,
    *,
    catalog: Catalog | None = None,
    stores: Iterable[str] = STORES,
    sample: int = DEFAULT_SAMPLE,
) -> CoverageReport:
    """Check every PROTECTED field of the catalog in each store (see the module docstring)."""
    if sample < 1:
        raise CoverageError(f"coverage: sample must be at least 1, got {sample}")
    unknown = [s for s in stores if s not in STORES]
    if unknown:
        raise CoverageError(f"coverage: unknown store(s) {unknown}; known: {', '.join(STORES)}")
    catalog = catalog or load_catalog()
    report = CoverageReport(sample=sample)
    for store in stores:
        entries = list(catalog.protected(store))  # type: ignore[arg-type]
        result = StoreCoverage(store)
        if not entries:
            result.detail = "no protected field in the catalog"
        else:
            try:
                result.fields = _check(settings, store, entries, sample)
            except StoreNotBuilt as exc:
                result.state, result.detail = "not_built", str(exc)
            except StoreUnreachable as exc:
                result.state, result.detail = "unreachable", str(exc)
        report.stores.append(result)
    return report


def render_coverage(report: CoverageReport, console: Any) -> None:
    """A table per store for `keys coverage` (rich console), then the one-line summary."""
    from rich.table import Table

    table = Table(title=f"Encryption coverage (sample {report.sample} values a field)")
    for column in ("store", "state", "protected", "total", "coverage", "in clear"):
        table.add_column(column, justify="right" if column in {"protected", "total"} else "left")
    for s in report.stores:
        coverage = "-" if s.percent is None else _pct(s.percent)
        table.add_row(
            s.store,
            f"{s.state}: {s.detail}" if s.detail else s.state,
            str(s.protected),
            str(s.total),
            coverage,
            ", ".join(f"{f.dataset}.{f.field}" for f in s.in_clear) or "-",
        )
    console.print(table)
    for f in report.in_clear:
        console.print(f"[red]IN CLEAR[/red] {f.name} ({f.data_class}): {f.detail}")
    console.print(report.summary())
