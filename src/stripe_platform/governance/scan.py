"""`catalog scan`: sample real values of every store and report what contradicts the catalog.

Pattern recognizers (e-mail, phone, IBAN with its mod-97 check, IPv4/IPv6, card numbers with a
Luhn check, both from python-stdnum) look at up to ``limit`` values of each column or field. A
column whose values are more sensitive than its declared class is a contradiction (a non_personal
column holding e-mails); a pii/pci column holding text where ciphertext is expected is reported as
information ("in clear"). Binary values (ciphertext, hashes) are counted and skipped. Reports
carry counts only, never a sampled value: they are printed and shipped to CI logs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import psycopg
from pymongo.errors import PyMongoError
from stdnum import iban, luhn

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.governance.classification import (
    EXTRA_COLUMN,
    PROTECTED,
    SENSITIVITY,
    STORES,
    Catalog,
    CatalogError,
    DataClass,
    Entry,
    Store,
    load_catalog,
)

DEFAULT_LIMIT = 1000
# What a store out of reach raises (server down, file locked or missing): reported, not fatal.
UNREACHABLE = (PlatformError, psycopg.Error, PyMongoError, OSError)
_ADDRESSES = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
)

# --- recognizers: value -> is it one? ------------------------------------------------------------

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+?[\d\s().-]+?(?:\s*(?:x|ext\.?)\s*\d{1,5})?")
_PHONE_SEPARATORS = re.compile(r"[\s().-]+")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_CARD = re.compile(r"[\d -]{13,23}")
_IBAN = re.compile(r"[A-Z]{2}\d{2}[A-Z0-9 ]{11,36}")


def is_email(value: str) -> bool:
    return _EMAIL.fullmatch(value.strip()) is not None


def is_phone(value: str) -> bool:
    """8 to 15 digits written as a phone number: a leading + or at least three groups (a bare
    run of digits is an id or an amount; an ISO date a date; 203.0.113.45 an IP address)."""
    text = value.strip()
    if not _PHONE.fullmatch(text) or _DATE.match(text) or is_ip_address(text):
        return False
    number = re.split(r"\s*(?:x|ext\.?)\s*\d", text)[0]
    digits = sum(c.isdigit() for c in number)
    groups = len([g for g in _PHONE_SEPARATORS.split(number.strip("+")) if g])
    return 8 <= digits <= 15 and (number.startswith("+") or groups >= 3)


def is_card_number(value: str) -> bool:
    """13-19 digits (spaces or dashes allowed), a card network's first digit, Luhn-valid."""
    text = value.strip()
    if not _CARD.fullmatch(text):
        return False
    digits = re.sub(r"[ -]", "", text)
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn.is_valid(digits)


def is_iban(value: str) -> bool:
    """An IBAN whose country format and mod-97 check digits hold."""
    text = value.strip().upper()
    return _IBAN.fullmatch(text) is not None and iban.is_valid(text)


def is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip().split("/")[0])
    except ValueError:
        return False
    return True


# What each recognizer's match says a value is.
RECOGNIZERS: Mapping[str, tuple[Callable[[str], bool], DataClass]] = {
    "email": (is_email, DataClass.PII),
    "phone": (is_phone, DataClass.PII),
    "iban": (is_iban, DataClass.PII),
    "card_number": (is_card_number, DataClass.PCI),
    "ip_address": (is_ip_address, DataClass.PII_QUASI),
}


def recognize(value: str) -> list[str]:
    """The recognizers a value matches."""
    return [name for name, (test, _) in RECOGNIZERS.items() if test(value)]


# --- findings --------------------------------------------------------------------------------------

Level = Literal["contradiction", "unclassified", "info"]


@dataclass(frozen=True)
class Finding:
    level: Level
    store: str
    dataset: str
    field: str
    declared: str | None  # the catalog's class; None when the catalog does not know the field
    found: str  # a recognizer's name, "clear text" or "not in the catalog"
    matches: int
    sampled: int

    def __str__(self) -> str:
        declared = self.declared or "unclassified"
        return (
            f"{self.level}: {self.store} {self.dataset}.{self.field} ({declared}): {self.found} in "
            f"{self.matches} of {self.sampled} sampled values"
        )


@dataclass
class ScanReport:
    limit: int
    findings: list[Finding] = field(default_factory=list)
    sampled: dict[str, int] = field(default_factory=dict)  # store -> values looked at
    datasets: dict[str, int] = field(default_factory=dict)  # store -> datasets read
    skipped: list[str] = field(default_factory=list)  # store or dataset not read, and why

    @property
    def contradictions(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "contradiction"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "sampled": self.sampled,
            "datasets": self.datasets,
            "skipped": self.skipped,
            "contradictions": len(self.contradictions),
            "findings": [asdict(f) for f in self.findings],
        }


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, scalar) of a value; arrays keep their path (``lines.message``); JSON text
    (raw-layer object columns, ``_extra``) is opened."""
    if isinstance(value, str) and value[:1] in "{[":
        with contextlib.suppress(ValueError):  # text that only looks like JSON stays text
            value = json.loads(value)
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _leaves(sub, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for sub in value:
            yield from _leaves(sub, path)
    else:
        yield path, value


def scan_rows(
    report: ScanReport,
    store: Store,
    dataset: str,
    entries: Iterable[Entry],
    rows: Iterable[Mapping[str, Any]],
) -> None:
    """Run the recognizers over sampled rows (column or top-level field -> value) of one dataset
    and add what contradicts its catalog entries to ``report``."""
    declared = {e.field: e for e in entries}
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        for column, value in row.items():
            for path, leaf in _leaves(value, column):
                if leaf is None:
                    continue
                tally = counts.setdefault(path, {"sampled": 0, "text": 0})
                tally["sampled"] += 1
                if isinstance(leaf, (bytes, bytearray, memoryview)):
                    continue  # ciphertext or a hash: nothing to recognize
                text = str(leaf) if isinstance(leaf, _ADDRESSES) else leaf  # PostgreSQL inet
                if not isinstance(text, str):
                    continue
                tally["text"] += 1
                for name in recognize(text):
                    tally[name] = tally.get(name, 0) + 1
    report.sampled[store] = report.sampled.get(store, 0) + sum(
        t["sampled"] for t in counts.values()
    )
    for path, tally in counts.items():
        entry = _entry_for(declared, path)
        if entry is None:
            report.findings.append(
                Finding(
                    "unclassified",
                    store,
                    dataset,
                    path,
                    None,
                    "not in the catalog",
                    tally["sampled"],
                    tally["sampled"],
                )
            )
            continue
        for name, (_, implied) in RECOGNIZERS.items():
            matches = tally.get(name, 0)
            if matches and SENSITIVITY[implied] > SENSITIVITY[entry.data_class]:
                report.findings.append(
                    Finding(
                        "contradiction",
                        store,
                        dataset,
                        path,
                        entry.data_class.value,
                        name,
                        matches,
                        tally["sampled"],
                    )
                )
        # Expected: ciphertext (binary). Credentials are one-way hashes, text by design.
        clear = entry.data_class in PROTECTED - {DataClass.CREDENTIAL} and tally["text"]
        if entry.field == path and clear:
            report.findings.append(
                Finding(
                    "info",
                    store,
                    dataset,
                    path,
                    entry.data_class.value,
                    "clear text",
                    tally["text"],
                    tally["sampled"],
                )
            )


def _entry_for(declared: Mapping[str, Entry], path: str) -> Entry | None:
    """The entry of a path, or of the nearest enclosing column (a raw JSON object column)."""
    while True:
        if path in declared:
            return declared[path]
        if "." not in path:
            return None
        path = path.rsplit(".", 1)[0]


# --- samplers, one per store ----------------------------------------------------------------------


def _sample_postgres(settings: Settings, catalog: Catalog, report: ScanReport) -> None:
    from psycopg import sql
    from psycopg.rows import dict_row

    from stripe_platform.oltp import db

    with db.connect(settings, autocommit=True) as conn:
        conn.row_factory = dict_row  # type: ignore[assignment]
        for dataset in catalog.datasets("postgres"):
            entries = catalog.dataset("postgres", dataset)
            query = sql.SQL("SELECT {} FROM {} LIMIT %s").format(
                sql.SQL(", ").join(sql.Identifier(e.field) for e in entries),
                sql.Identifier(dataset),
            )
            rows = conn.execute(query, (report.limit,)).fetchall()
            scan_rows(report, "postgres", dataset, entries, rows)
            report.datasets["postgres"] = report.datasets.get("postgres", 0) + 1


def _sample_documents(settings: Settings, catalog: Catalog, report: ScanReport) -> None:
    from stripe_platform.docstore import client as docstore

    database = docstore.connect(settings)
    try:
        for dataset in catalog.datasets("documents"):
            documents = list(database[dataset].find({}, limit=report.limit))
            entries = catalog.dataset("documents", dataset)
            scan_rows(report, "documents", dataset, entries, documents)
            report.datasets["documents"] = report.datasets.get("documents", 0) + 1
    finally:
        database.client.close()


def _sample_warehouse_raw(settings: Settings, catalog: Catalog, report: ScanReport) -> None:
    if settings.warehouse_backend != "duckdb":
        report.skipped.append(
            f"warehouse_raw: the {settings.warehouse_backend} warehouse is not scanned (DuckDB only)"
        )
        return
    if not settings.warehouse_file.exists():
        report.skipped.append(f"warehouse_raw: no DuckDB warehouse at {settings.warehouse_file}")
        return
    import duckdb

    try:
        conn = duckdb.connect(str(settings.warehouse_file), read_only=True)
    except duckdb.Error as exc:  # held by a writer, or not a DuckDB file
        report.skipped.append(f"warehouse_raw: cannot open {settings.warehouse_file}: {exc}")
        return
    with conn:
        tables = {
            f"{schema}.{name}".lower()
            for schema, name in conn.execute(
                "SELECT table_schema, table_name FROM information_schema.tables"
            ).fetchall()
        }
        for dataset in catalog.datasets("warehouse_raw"):
            if dataset not in tables:
                continue  # not synced yet
            schema, name = dataset.split(".", 1)
            cursor = conn.execute(f'SELECT * FROM "{schema}"."{name}" LIMIT ?', [report.limit])
            columns = [d[0] for d in cursor.description]
            rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
            entries = catalog.dataset("warehouse_raw", dataset)
            scan_rows(report, "warehouse_raw", dataset, entries, rows)
            report.datasets["warehouse_raw"] = report.datasets.get("warehouse_raw", 0) + 1


def _sample_lake(settings: Settings, catalog: Catalog, report: ScanReport) -> None:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from stripe_platform.lake.writer import LakeWriter

    lake = LakeWriter.from_settings(settings)
    for dataset in catalog.datasets("lake"):
        source, stream = dataset.split(".", 1)
        directory = lake.stream_dir(source, stream)
        try:
            infos = lake.filesystem.get_file_info(pafs.FileSelector(directory, recursive=True))
        except (OSError, FileNotFoundError):
            continue  # not synced yet
        files = sorted(i.path for i in infos if i.path.endswith(".parquet"))
        rows: list[dict[str, Any]] = []
        for path in files:
            try:
                with lake.filesystem.open_input_file(path) as handle:
                    batches = pq.ParquetFile(handle).iter_batches(batch_size=report.limit)
                    batch = next(batches, None)
            except (OSError, ValueError) as exc:  # an encrypted file without its keys, or damage
                report.skipped.append(f"lake {dataset}: {lake.uri(path)} not readable ({exc})")
                break
            if batch is not None:
                rows += batch.slice(0, report.limit - len(rows)).to_pylist()
            if len(rows) >= report.limit:
                break
        if rows:
            scan_rows(report, "lake", dataset, catalog.dataset("lake", dataset), rows)
            report.datasets["lake"] = report.datasets.get("lake", 0) + 1
    if not report.datasets.get("lake"):
        report.skipped.append(f"lake: no stream synced under {lake.uri(lake.base)}")


SAMPLERS: Mapping[str, Callable[[Settings, Catalog, ScanReport], None]] = {
    "postgres": _sample_postgres,
    "documents": _sample_documents,
    "warehouse_raw": _sample_warehouse_raw,
    "lake": _sample_lake,
}


def scan(
    settings: Settings,
    *,
    catalog: Catalog | None = None,
    stores: Iterable[str] = STORES,
    limit: int = DEFAULT_LIMIT,
) -> ScanReport:
    """Sample up to ``limit`` rows of each dataset of each store and report contradictions. A store
    out of reach is reported in ``skipped``, not an error: the scan says what it could not see."""
    if limit < 1:
        raise CatalogError(f"scan: limit must be at least 1, got {limit}")
    catalog = catalog or load_catalog()
    report = ScanReport(limit=limit)
    for store in stores:
        sampler = SAMPLERS.get(store)
        if sampler is None:
            if store == "marts":
                report.skipped.append("marts: built from the raw layer; not scanned")
                continue
            raise CatalogError(f"scan: unknown store {store!r}; known: {', '.join(STORES)}")
        try:
            sampler(settings, catalog, report)
        except UNREACHABLE as exc:  # a store out of reach must not hide the others
            report.skipped.append(f"{store}: not scanned ({type(exc).__name__}: {exc})")
    return report


__all__ = [
    "DEFAULT_LIMIT",
    "EXTRA_COLUMN",
    "RECOGNIZERS",
    "Finding",
    "ScanReport",
    "is_card_number",
    "is_email",
    "is_iban",
    "is_ip_address",
    "is_phone",
    "recognize",
    "scan",
    "scan_rows",
]
