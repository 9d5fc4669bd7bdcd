"""Where a data subject's personal data is held, and how each store answers a data-subject request
(issue 23 §1, docs/compliance.md).

One protocol (:class:`SubjectStore`), one ordered registry. compliance/requests.py runs a request's
steps in :data:`ORDER`: the sources first (PostgreSQL, the documents), then what is derived from
them (the warehouse's raw layer and marts, the lake, the logs) and the subject's key last
(``keys``: crypto-shredding makes every copy that could not be rewritten in place unreadable, the
request's own encrypted copy of the subject's identifiers among them).

Every step is idempotent (a second run changes nothing and says so in its counts): a failed
request re-runs from its failed step. Which datasets and fields a store reads or changes comes from
the catalog (governance/classification.py: the entries of a dataset with a ``subject`` field, and
the classes pii/pii_quasi/pci/credential), never from a hand list here.
"""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.governance.classification import Catalog

# The order a request's steps run in; every registered store has one of these names.
ORDER: tuple[str, ...] = (
    "postgres",
    "documents",
    "warehouse_raw",
    "marts",
    "lake",
    "logs",
    "keys",
)
# Stores whose step the erasure needs before it may be called done (the sources): a store of ORDER
# that is not registered in this installation is reported as missing by requests.plan().
SOURCES: tuple[str, ...] = ("postgres", "documents")


class StoreError(PlatformError, RuntimeError):
    """A store could not complete its step; the message names the store, the dataset and why. The
    request is left `failed` at this step and `privacy request run ID` re-runs it."""


@dataclass(frozen=True)
class Identifiers:
    """What identifies the subject outside the rows keyed by their customer id: the values the
    downstream steps look for (log lines, documents keyed by e-mail). Gathered from the sources
    BEFORE any erase step; kept in the request only encrypted under the subject's own key."""

    emails: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    usernames: tuple[str, ...] = ()
    email_hashes: tuple[str, ...] = ()  # the keyed hashes (Customer.EmailHash, documents' *_hash)

    def values(self) -> tuple[str, ...]:
        """Every identifier value, once each (what an erasure proof searches for)."""
        return tuple(
            dict.fromkeys(
                v
                for v in (
                    *self.emails,
                    *self.names,
                    *self.phones,
                    *self.ips,
                    *self.usernames,
                    *self.email_hashes,
                )
                if v
            )
        )

    def to_json(self) -> dict[str, list[str]]:
        return {
            "emails": list(self.emails),
            "names": list(self.names),
            "phones": list(self.phones),
            "ips": list(self.ips),
            "usernames": list(self.usernames),
            "email_hashes": list(self.email_hashes),
        }

    @classmethod
    def from_json(cls, data: dict[str, Iterable[str]]) -> Identifiers:
        return cls(**{k: tuple(sorted(set(v))) for k, v in data.items()})

    def merged(self, other: Identifiers) -> Identifiers:
        return Identifiers.from_json(
            {k: [*v, *other.to_json()[k]] for k, v in self.to_json().items()}
        )


@dataclass(frozen=True)
class SubjectContext:
    """What a store step is given: who, under which request, with which catalog."""

    settings: Settings
    customer_id: int
    request_id: int
    identifiers: Identifiers
    catalog: Catalog
    now: dt.datetime


@dataclass(frozen=True)
class HeldItem:
    """One thing held about the subject, for the access export: a row, a document, a file's
    record. ``where`` says where it came from so the subject (and a reviewer) can find it, e.g.
    "postgres public.customer id=42" or "documents Customer _id=...". ``fields`` holds readable
    values (decrypted where the platform can decrypt them), JSON-serialisable."""

    store: str
    dataset: str
    key: str
    fields: dict[str, Any]
    where: str


@dataclass(frozen=True)
class StepOutcome:
    """What a step did: counts per dataset and action (e.g. {"customer.anonymised": 1,
    "transaction.kept_without_identity": 12}); all zero on a re-run that had nothing left to do."""

    store: str
    counts: dict[str, int] = field(default_factory=dict)
    detail: str = ""

    @property
    def changed(self) -> int:
        return sum(self.counts.values())


@runtime_checkable
class SubjectStore(Protocol):
    """One store's answer to data-subject requests."""

    name: str  # one of ORDER

    def plan(self, catalog: Catalog) -> dict[str, Any]:
        """What this store's steps read or change, from the catalog (JSON-serialisable: datasets
        -> fields), recorded in the request so a re-run later runs the same plan."""
        ...

    def access(self, ctx: SubjectContext) -> list[HeldItem]:
        """Everything this store holds about the subject, each item with where it came from."""
        ...

    def rectify(self, ctx: SubjectContext, changes: dict[str, Any]) -> StepOutcome:
        """Correct the subject's data (a source corrects it; a derived store gets it from the
        normal pipelines and returns an outcome saying so)."""
        ...

    def identifiers(self, ctx: SubjectContext) -> Identifiers:
        """The subject's identifiers this store holds (sources; a derived store returns
        ``Identifiers()``): gathered before any erase step."""
        ...

    def erase(self, ctx: SubjectContext) -> StepOutcome:
        """Delete, anonymise or make unreadable the subject's personal data here; financial
        records the law keeps are kept stripped of identity. Idempotent."""
        ...


_registry: dict[str, SubjectStore] = {}


def register(store: SubjectStore) -> SubjectStore:
    """Add (or replace, by name) a store step. Returns it, so it can decorate an instance."""
    if store.name not in ORDER:
        raise StoreError(
            f"privacy store {store.name!r}: not a known step (known, in order: {', '.join(ORDER)})"
        )
    if not isinstance(store, SubjectStore):
        raise StoreError(
            f"privacy store {store.name!r}: does not implement SubjectStore (plan, access, "
            "rectify, identifiers, erase)"
        )
    _registry[store.name] = store
    return store


# Modules that register store steps when imported: the sources below, then the downstream stores.
_PROVIDERS = ("stripe_platform.compliance.stores_downstream",)


def registered() -> list[SubjectStore]:
    """Every registered store step, in ORDER (importing the modules that provide them)."""
    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the provider exists but something it needs is missing
                raise
    return [_registry[name] for name in ORDER if name in _registry]


def get_store(name: str) -> SubjectStore:
    for store in registered():
        if store.name == name:
            return store
    raise StoreError(
        f"privacy store {name!r}: not registered (registered: "
        f"{', '.join(s.name for s in registered())})"
    )
