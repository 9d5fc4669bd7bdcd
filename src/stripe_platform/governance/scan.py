"""`catalog scan`: sample real values of every store and report what contradicts the catalog.

Pattern recognizers (e-mail, phone, IBAN with its mod-97 check, IPv4/IPv6, card numbers with a
Luhn check, both from python-stdnum) look at up to ``limit`` values of each column or field. A
column whose values are more sensitive than its declared class is a contradiction (a non_personal
column holding e-mails); a pii/pci column holding text where ciphertext is expected is reported as
information ("in clear"). Binary values (ciphertext, hashes) are counted and skipped. Reports
carry counts only, never a sampled value: they are printed and shipped to CI logs. The stores are
read through governance/sampling.py (the warehouse raw layer on DuckDB, PostgreSQL or Snowflake).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from stdnum import iban, luhn

from stripe_platform.config import Settings
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
from stripe_platform.governance.sampling import (
    DatasetUnreadable,
    StoreNotBuilt,
    StoreUnreachable,
    open_store,
)

DEFAULT_LIMIT = 1000
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


# --- sampling every store ------------------------------------------------------------------------

SCANNED: tuple[Store, ...] = ("postgres", "documents", "warehouse_raw", "lake")


def _sample(settings: Settings, store: Store, catalog: Catalog, report: ScanReport) -> None:
    with open_store(settings, store) as reader:
        for dataset in catalog.datasets(store):
            entries = catalog.dataset(store, dataset)
            try:
                rows = reader.rows(dataset, report.limit, names=[e.field for e in entries])
            except DatasetUnreadable as exc:  # one stream's file: the others may be readable
                report.skipped.append(f"{store} {dataset}: {exc}")
                continue
            if rows is None:
                continue  # not synced yet
            scan_rows(report, store, dataset, entries, rows)
            report.datasets[store] = report.datasets.get(store, 0) + 1


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
        if store not in SCANNED:
            if store == "marts":
                report.skipped.append("marts: built from the raw layer; not scanned")
                continue
            raise CatalogError(f"scan: unknown store {store!r}; known: {', '.join(STORES)}")
        try:
            _sample(settings, store, catalog, report)  # type: ignore[arg-type]
        except StoreNotBuilt as exc:
            report.skipped.append(f"{store}: {exc}")
        except StoreUnreachable as exc:  # a store out of reach must not hide the others
            report.skipped.append(f"{store}: not scanned ({exc})")
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
