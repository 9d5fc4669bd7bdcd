"""The classification catalog: what every column and field of every store holds (issue 20 §1).

ONE source of truth, gathered from where each schema is declared:
- OLTP columns: the migrations' ``COMMENT ON COLUMN`` labels in sql/oltp (``PCI:``, ``PII:``, ...);
- document fields: the ``classification`` map of each spec in mongo/collections;
- raw/lake streams: derived from the source column or field each stream selects (airbyte/catalog.yaml);
- mart columns: dbt ``meta.classification`` in dbt_project/models/marts/*.yml.

Readers (encryption, masking, coverage, privacy requests, retention, the compliance dashboard) call
:func:`load_catalog` and never parse those files themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from stripe_platform.errors import PlatformError

Store = Literal["postgres", "documents", "lake", "warehouse_raw", "marts"]
STORES: tuple[Store, ...] = ("postgres", "documents", "lake", "warehouse_raw", "marts")


class DataClass(StrEnum):
    PCI = "pci"  # card data (PAN, ...): PCI-DSS scope
    PII = "pii"  # direct identifier: names, e-mail, phone, street address
    PII_QUASI = "pii_quasi"  # quasi-identifier or pseudonym: IP, postal code, keyed hashes, handles
    CREDENTIAL = "credential"  # passwords (one-way hashes), tokens, secrets
    NON_PERSONAL = "non_personal"


# Classes that must be encrypted (or hashed, for credentials) at rest in every store, or masked in
# the warehouse for every role below admin: what `keys coverage` measures.
PROTECTED = frozenset({DataClass.PCI, DataClass.PII, DataClass.CREDENTIAL})
# Classes hidden from roles below admin (RBAC, masking).
RESTRICTED = frozenset({DataClass.PCI, DataClass.PII, DataClass.PII_QUASI, DataClass.CREDENTIAL})


class CatalogError(PlatformError, ValueError):
    """A declaration is missing, unknown or contradicts the schema; the message says where."""


@dataclass(frozen=True)
class Entry:
    store: Store
    dataset: str  # OLTP table, collection, stream, or mart model, as the store names it
    field: str  # column, or dotted document path ("preferences.device", "lines.message")
    data_class: DataClass
    category: str | None = None  # fideslang data category, e.g. "user.contact.email"
    subject: str | None = None  # the field naming the data subject (customer id) of this dataset
    declared_at: str = ""  # "sql/oltp/0003_parties.sql:21", for error messages and reviewers
