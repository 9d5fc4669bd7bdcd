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
import decimal
import functools
import hashlib
import importlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import psycopg
import psycopg.rows
from bson import ObjectId
from psycopg import sql

from stripe_platform.config import Settings
from stripe_platform.docstore import client as docstore
from stripe_platform.docstore.fields import (
    EMAIL_CATEGORY,
    HASH_SUFFIX,
    DocumentFields,
    protected_fields,
)
from stripe_platform.errors import PlatformError
from stripe_platform.governance.classification import (
    RESTRICTED,
    Catalog,
    DataClass,
    Entry,
    load_catalog,
)
from stripe_platform.oltp import db

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


# -- what the sources keep, and how identifiers are recognised ----------------------------------

# Financial records the law requires to be kept (bookkeeping and anti-money-laundering retention:
# e.g. 10 years in France, Code de commerce L123-22; 5 years AMLD5 Art. 40): an erasure keeps their
# rows and strips them of identity (their restricted fields emptied, their links to the subject's
# deleted addresses, devices and cards cut) instead of deleting them. Everything else bound to the
# subject is deleted, except the subject's own root record (the customer row), which the kept
# records reference: it stays as a tombstone with every restricted field erased.
RETAINED: dict[tuple[str, str], str] = {
    ("postgres", "transaction"): "financial record kept by law, stripped of identity",
    ("documents", "Transaction"): "copy of a financial record kept by law, stripped of identity",
}

# The catalog categories that identify a person wherever their rows are not keyed by customer id
# (logs, copies keyed by e-mail): what Identifiers holds. A field whose name ends in "hash" holds
# the keyed hash of its category's value.
IDENTIFIER_CATEGORIES: dict[str, str] = {
    "user.contact.email": "emails",
    "user.name": "names",
    "user.contact.phone_number": "phones",
    "user.device.ip_address": "ips",
    "user.account.username": "usernames",
}


def _identifier_kind(field: str, category: str | None) -> str | None:
    kind = IDENTIFIER_CATEGORIES.get(category or "")
    if kind == "emails" and field.lower().endswith("hash"):
        return "email_hashes"
    return kind


@functools.cache
def catalog() -> Catalog:
    """The classification catalog, loaded once a process (as the API's routes do): every step of
    a request reads the same one."""
    return load_catalog()


def catalog_digest(catalog: Catalog) -> str:
    """A digest of the catalog's entries: a request's plan names the catalog it was made from."""
    return hashlib.sha256(repr(catalog.entries).encode()).hexdigest()


def _json_value(value: Any) -> Any:
    """A value as the access export writes it (JSON, exact)."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


# -- PostgreSQL ------------------------------------------------------------------------------------

# What the export says instead of a value it must not carry: a password's hash is no use to the
# subject and a risk in a file; a full card number outside the card data environment breaks
# PCI-DSS 3.4 (the export shows the card's brand, last four digits and expiry instead).
NOT_EXPORTED = {
    DataClass.CREDENTIAL: "(held: a one-way hash; not exported)",
    DataClass.PCI: "(held encrypted: the full card number; not exported, see last4)",
}


@dataclass(frozen=True)
class _Table:
    name: str
    subject: str
    entries: tuple[Entry, ...]
    action: str  # "anonymise" (the root), "keep_without_identity" (RETAINED), "delete"

    @property
    def restricted(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.data_class in RESTRICTED)


class PostgresStore:
    """The OLTP database: every table the catalog gives a subject field (customer, address, device,
    paymentinstrument, transaction). Encrypted columns are read through the keyed session's
    ``pii_decrypt`` and written through ``pii_encrypt``, as everywhere on the platform."""

    name = "postgres"

    def tables(self, catalog: Catalog) -> list[_Table]:
        tables = []
        for dataset in catalog.datasets("postgres"):
            subject = catalog.subject("postgres", dataset)
            if subject is None:
                continue
            if subject == "id":  # the subject's own record: every other row references it
                action = "anonymise"
            elif ("postgres", dataset) in RETAINED:
                action = "keep_without_identity"
            else:
                action = "delete"
            tables.append(_Table(dataset, subject, catalog.dataset("postgres", dataset), action))
        roots = [t.name for t in tables if t.action == "anonymise"]
        if len(roots) != 1:
            raise StoreError(
                f"postgres: expected one table whose subject field is its id (the customer), "
                f"found {roots or 'none'} in the catalog"
            )
        return tables

    def plan(self, catalog: Catalog) -> dict[str, Any]:
        return {
            t.name: {
                "subject": t.subject,
                "action": t.action,
                "restricted": [e.field for e in t.restricted],
            }
            for t in self.tables(catalog)
        }

    @staticmethod
    def _select(table: _Table) -> sql.Composed:
        encrypted = set(db.ENCRYPTED_COLUMNS.get(table.name, ()))
        return sql.SQL(", ").join(
            sql.SQL("pii_decrypt({c}) AS {c}").format(c=sql.Identifier(e.field))
            if e.field in encrypted
            else sql.Identifier(e.field)
            for e in table.entries
        )

    def _rows(self, conn: psycopg.Connection, table: _Table, customer_id: int) -> list[dict]:
        query = sql.SQL("SELECT {cols} FROM {t} WHERE {s} = %s ORDER BY 1").format(
            cols=self._select(table), t=sql.Identifier(table.name), s=sql.Identifier(table.subject)
        )
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            return cur.execute(query, (customer_id,)).fetchall()

    def exists(self, settings: Settings, catalog: Catalog, customer_id: int) -> bool:
        (root,) = [t for t in self.tables(catalog) if t.action == "anonymise"]
        query = sql.SQL("SELECT EXISTS (SELECT FROM {t} WHERE {s} = %s)").format(
            t=sql.Identifier(root.name), s=sql.Identifier(root.subject)
        )
        with db.connect(settings, with_key=False, autocommit=True) as conn:
            return bool(conn.execute(query, (customer_id,)).fetchone()[0])

    def access(self, ctx: SubjectContext) -> list[HeldItem]:
        items = []
        with db.connect(ctx.settings, autocommit=True) as conn:  # keyed: decrypts
            for table in self.tables(ctx.catalog):
                classes = {e.field: e.data_class for e in table.entries}
                for row in self._rows(conn, table, ctx.customer_id):
                    key = f"id={row['id']}" if "id" in row else f"{table.subject}={ctx.customer_id}"
                    fields = {
                        k: NOT_EXPORTED[classes[k]]
                        if classes[k] in NOT_EXPORTED and v is not None
                        else _json_value(v)
                        for k, v in row.items()
                    }
                    items.append(
                        HeldItem(
                            "postgres",
                            table.name,
                            key,
                            fields,
                            f"postgres public.{table.name} {key}",
                        )
                    )
        return items

    def identifiers(self, ctx: SubjectContext) -> Identifiers:
        found: dict[str, set[str]] = {}
        with db.connect(ctx.settings, autocommit=True) as conn:
            for table in self.tables(ctx.catalog):
                wanted = {
                    e.field: kind
                    for e in table.entries
                    if (kind := _identifier_kind(e.field, e.category))
                }
                if not wanted:
                    continue
                for row in self._rows(conn, table, ctx.customer_id):
                    for field_name, kind in wanted.items():
                        value = row[field_name]
                        if value is None:
                            continue
                        if isinstance(value, bytes | memoryview):
                            value = bytes(value).hex()
                        found.setdefault(kind, set()).add(str(value))
        return Identifiers.from_json(found)

    # -- rectify -------------------------------------------------------------------------------
    def rectifiable(self, catalog: Catalog) -> dict[str, Entry]:
        """The fields a rectification may correct, by the name `--set` uses: what the subject
        told us about themselves (catalog categories user.name, user.contact.*, user.account.*):
        the root table's by column ("email", "fullname"), other tables' as "table.column", then
        addressed to one row ("address:ID.line1"). Never credentials, keyed hashes, card data or
        what the platform observed (IP addresses, device fingerprints)."""
        fields = {}
        for table in self.tables(catalog):
            for e in table.restricted:
                category = e.category or ""
                told = category == "user.name" or category.startswith(
                    ("user.contact.", "user.account.")
                )
                if not told or e.data_class == DataClass.CREDENTIAL:
                    continue
                if e.field.lower().endswith("hash"):
                    continue
                fields[e.field if table.action == "anonymise" else f"{table.name}.{e.field}"] = e
        return fields

    def parse_change(self, catalog: Catalog, name: str) -> tuple[Entry, int | None]:
        """(the catalog entry, the row id for a non-root table) of a `--set` name, or raise."""
        match = _CHANGE.match(name)
        allowed = self.rectifiable(catalog)
        key = name if match is None else f"{match['table']}.{match['column']}"
        if key not in allowed:
            raise StoreError(
                f"rectify: {name!r} is not a field a rectification corrects (the customer's "
                f"{', '.join(k for k in allowed if '.' not in k)}; or TABLE:ROW_ID.COLUMN for "
                f"{', '.join(k for k in allowed if '.' in k)})"
            )
        if "." in key and match is None:
            table, column = key.split(".")
            raise StoreError(f"rectify: {name!r} names no row: {table}:ROW_ID.{column}")
        return allowed[key], None if match is None else int(match["row"])

    def rectify(self, ctx: SubjectContext, changes: dict[str, Any]) -> StepOutcome:
        counts: dict[str, int] = {}
        tables = {t.name: t for t in self.tables(ctx.catalog)}
        with db.connect(ctx.settings) as conn, conn.transaction():
            for name, value in changes.items():
                entry, row = self.parse_change(ctx.catalog, name)
                table = tables[entry.dataset]
                encrypted = entry.field in db.ENCRYPTED_COLUMNS.get(table.name, ())
                column = sql.Identifier(entry.field)
                new = (
                    sql.SQL("pii_encrypt(%(value)s, %(scope)s)")
                    if encrypted
                    else sql.SQL("%(value)s")
                )
                current = sql.SQL("pii_decrypt({c})").format(c=column) if encrypted else column
                where = (
                    sql.SQL("id = %(row)s AND {s} = %(subject)s").format(
                        s=sql.Identifier(table.subject)
                    )
                    if row is not None
                    else sql.SQL("{s} = %(subject)s").format(s=sql.Identifier(table.subject))
                )
                params = {
                    "value": value,
                    "scope": f"postgres/{table.name}",
                    "row": row,
                    "subject": ctx.customer_id,
                }
                found = conn.execute(
                    sql.SQL("SELECT count(*) FROM {t} WHERE {w}").format(
                        t=sql.Identifier(table.name), w=where
                    ),
                    params,
                ).fetchone()[0]
                if not found:
                    raise StoreError(
                        f"postgres {table.name}: no row {row} of customer {ctx.customer_id} "
                        f"to rectify {name!r}"
                    )
                changed = conn.execute(
                    sql.SQL(
                        "UPDATE {t} SET {c} = {new} WHERE {w} AND {cur} IS DISTINCT FROM %(value)s"
                    ).format(t=sql.Identifier(table.name), c=column, new=new, w=where, cur=current),
                    params,
                ).rowcount
                counts[f"{table.name}.{entry.field}.rectified"] = changed
        return StepOutcome(self.name, counts, "corrected at the source")

    # -- erase ---------------------------------------------------------------------------------
    @staticmethod
    def _references(conn: psycopg.Connection, tables: list[str]) -> list[tuple[str, str, str]]:
        """(referencing table, its column, referenced table) of every one-column foreign key of
        the public schema onto ``tables`` (partitions' inherited copies left out)."""
        return conn.execute(
            """SELECT cl.relname, a.attname, rf.relname
               FROM pg_constraint c
               JOIN pg_class cl ON cl.oid = c.conrelid
               JOIN pg_namespace n ON n.oid = cl.relnamespace
               JOIN pg_class rf ON rf.oid = c.confrelid
               JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
               WHERE c.contype = 'f' AND c.conparentid = 0 AND n.nspname = 'public'
                 AND cardinality(c.conkey) = 1 AND rf.relname = ANY(%s)
               ORDER BY 1, 2""",
            (tables,),
        ).fetchall()

    @staticmethod
    def _columns(conn: psycopg.Connection, table: str) -> dict[str, tuple[bool, str]]:
        """column -> (nullable, data type)."""
        rows = conn.execute(
            "SELECT column_name, is_nullable = 'YES', data_type FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = %s",
            (table,),
        ).fetchall()
        return {name: (nullable, kind) for name, nullable, kind in rows}

    def erase(self, ctx: SubjectContext) -> StepOutcome:
        tables = self.tables(ctx.catalog)
        deleted = [t for t in tables if t.action == "delete"]
        counts: dict[str, int] = {}
        subject = ctx.customer_id
        with db.connect(ctx.settings) as conn, conn.transaction():
            references = self._references(conn, [t.name for t in deleted])
            deleting = {t.name for t in deleted}
            # Rows the erasure keeps lose their links to the rows it deletes: one statement (one
            # scan) a referencing table, whatever the number of its links.
            doomed = {
                t.name: [
                    r[0]
                    for r in conn.execute(
                        sql.SQL("SELECT id FROM {t} WHERE {s} = %s").format(
                            t=sql.Identifier(t.name), s=sql.Identifier(t.subject)
                        ),
                        (subject,),
                    )
                ]
                for t in deleted
            }
            links: dict[str, list[tuple[str, str]]] = {}
            for referencing, column, referenced in references:
                if referencing in deleting or not doomed[referenced]:
                    continue
                if not self._columns(conn, referencing)[column][0]:
                    raise StoreError(
                        f"postgres {referencing}.{column} references {referenced} (deleted by an "
                        "erasure) and is NOT NULL: the erasure cannot strip it; declare the table "
                        "in RETAINED with a nullable link or in the catalog with a subject"
                    )
                links.setdefault(referencing, []).append((column, referenced))
            for referencing, columns in links.items():
                params = {f"ids_{c}": doomed[f] for c, f in columns}
                counts[f"{referencing}.unlinked"] = conn.execute(
                    sql.SQL("UPDATE {r} SET {sets} WHERE {any}").format(
                        r=sql.Identifier(referencing),
                        sets=sql.SQL(", ").join(
                            sql.SQL("{c} = CASE WHEN {c} = ANY({p}) THEN NULL ELSE {c} END").format(
                                c=sql.Identifier(c), p=sql.Placeholder(f"ids_{c}")
                            )
                            for c, _ in columns
                        ),
                        any=sql.SQL(" OR ").join(
                            sql.SQL("{c} = ANY({p})").format(
                                c=sql.Identifier(c), p=sql.Placeholder(f"ids_{c}")
                            )
                            for c, _ in columns
                        ),
                    ),
                    params,
                ).rowcount
            # Delete a table that references another deleted one first.
            order = sorted(
                deleted,
                key=lambda t: -sum(1 for r, _, f in references if r == t.name and f in deleting),
            )
            for table in order:
                counts[f"{table.name}.deleted"] = conn.execute(
                    sql.SQL("DELETE FROM {t} WHERE {s} = %s").format(
                        t=sql.Identifier(table.name), s=sql.Identifier(table.subject)
                    ),
                    (subject,),
                ).rowcount
            for table in tables:
                if table.action == "keep_without_identity":
                    counts[f"{table.name}.stripped"] = self._strip(conn, table, subject)
                elif table.action == "anonymise":
                    counts[f"{table.name}.anonymised"] = self._anonymise(conn, table, subject)
            conn.execute(
                "INSERT INTO privacy.erased_subject (customer_id, request_id, erased_at) "
                "VALUES (%s, %s, %s) ON CONFLICT (customer_id) DO NOTHING",
                (subject, ctx.request_id, ctx.now),
            )
        return StepOutcome(
            self.name,
            counts,
            "addresses, devices and cards deleted; transactions kept without identity; the "
            "customer row kept as a tombstone (its restricted fields erased)",
        )

    def _strip(self, conn: psycopg.Connection, table: _Table, subject: int) -> int:
        if not table.restricted:
            return 0
        columns = self._columns(conn, table.name)
        fixed = [e.field for e in table.restricted if not columns[e.field][0]]
        if fixed:
            raise StoreError(
                f"postgres {table.name}: kept by law but its restricted column(s) {fixed} are NOT "
                "NULL: the erasure cannot strip them"
            )
        names = [sql.Identifier(e.field) for e in table.restricted]
        return conn.execute(
            sql.SQL("UPDATE {t} SET {sets} WHERE {s} = %s AND ({any})").format(
                t=sql.Identifier(table.name),
                sets=sql.SQL(", ").join(sql.SQL("{} = NULL").format(c) for c in names),
                s=sql.Identifier(table.subject),
                any=sql.SQL(" OR ").join(sql.SQL("{} IS NOT NULL").format(c) for c in names),
            ),
            (subject,),
        ).rowcount

    def _anonymise(self, conn: psycopg.Connection, table: _Table, subject: int) -> int:
        """The root row stays (kept records reference it); every restricted field is emptied, or
        replaced by a placeholder naming only the id where the schema needs a value: a unique
        text, an encrypted placeholder address, a bcrypt hash of a random secret nobody holds."""
        columns = self._columns(conn, table.name)
        encrypted = set(db.ENCRYPTED_COLUMNS.get(table.name, ()))
        placeholder = f"erased-{subject}"
        sets, pending, params = [], [], {"placeholder": placeholder, "subject": subject}
        params["email"] = f"{placeholder}@erased.invalid"
        params["scope"] = f"postgres/{table.name}"
        for e in table.restricted:
            column = sql.Identifier(e.field)
            nullable, kind = columns[e.field]
            if nullable:
                sets.append(sql.SQL("{} = NULL").format(column))
                pending.append(sql.SQL("{} IS NOT NULL").format(column))
            elif e.field in encrypted:
                value = "email" if e.category == "user.contact.email" else "placeholder"
                sets.append(
                    sql.SQL("{} = pii_encrypt(%({})s, %(scope)s)").format(column, sql.SQL(value))
                )
            elif e.data_class == DataClass.CREDENTIAL:
                sets.append(
                    sql.SQL("{} = crypt(gen_random_uuid()::text, gen_salt('bf'))").format(column)
                )
            elif kind == "bytea":  # a keyed hash (its trigger recomputes it from the placeholder)
                sets.append(
                    sql.SQL("{} = sha256(convert_to(%(placeholder)s, 'UTF8'))").format(column)
                )
            elif kind == "text":
                sets.append(sql.SQL("{} = %(placeholder)s").format(column))
                pending.append(sql.SQL("{} <> %(placeholder)s").format(column))
            else:
                raise StoreError(
                    f"postgres {table.name}.{e.field} ({kind}, NOT NULL): no placeholder to "
                    "anonymise it with"
                )
        if not pending:
            raise StoreError(
                f"postgres {table.name}: no nullable or text restricted column tells an erased "
                "row from a live one"
            )
        return conn.execute(
            sql.SQL("UPDATE {t} SET {sets} WHERE {s} = %(subject)s AND ({pending})").format(
                t=sql.Identifier(table.name),
                sets=sql.SQL(", ").join(sets),
                s=sql.Identifier(table.subject),
                pending=sql.SQL(" OR ").join(pending),
            ),
            params,
        ).rowcount


_CHANGE = re.compile(r"^(?P<table>[a-z_][a-z0-9_]*):(?P<row>\d+)\.(?P<column>[a-z_][a-z0-9_]*)$")


# -- documents -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Collection:
    name: str
    subject: str | None  # the field naming the subject (their customer id, or their Customer _id)
    email: str | None  # else: the protected e-mail field with a keyed hash that binds it
    entries: tuple[Entry, ...]
    action: str  # "delete" or "keep_without_identity" (RETAINED)

    @property
    def restricted(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.data_class in RESTRICTED)


class DocumentsStore:
    """The document store, all six collections as the catalog declares them: a collection with a
    subject field is bound by it (its value is the customer id, or the _id of the subject's
    Customer document); one without, by its protected e-mail field's keyed hash (Transaction);
    one with neither holds nobody's data by customer (Merchant) or is the logs' (Log: the `logs`
    step). Protected fields are decrypted for the export through docstore/fields.py."""

    name = "documents"

    def collections(self, catalog: Catalog) -> tuple[list[_Collection], dict[str, str]]:
        """The collections bound to a subject, and why each other one is not."""
        bound, unbound = [], {}
        protected = protected_fields()
        for dataset in catalog.datasets("documents"):
            entries = catalog.dataset("documents", dataset)
            subject = catalog.subject("documents", dataset)
            emails = [
                f.path
                for f in protected.get(dataset, ())
                if f.hash_path is not None and f.category == EMAIL_CATEGORY
            ]
            action = "keep_without_identity" if ("documents", dataset) in RETAINED else "delete"
            if subject is not None or emails:
                email = None if subject is not None else emails[0]
                bound.append(_Collection(dataset, subject, email, entries, action))
            elif any(e.data_class in RESTRICTED for e in entries):
                unbound[dataset] = "no subject field: the `logs` step searches it by identifiers"
            else:
                unbound[dataset] = "no personal data"
        return bound, unbound

    def plan(self, catalog: Catalog) -> dict[str, Any]:
        bound, unbound = self.collections(catalog)
        return {
            "bound": {
                c.name: {
                    "by": f"subject field {c.subject}" if c.subject else f"keyed hash of {c.email}",
                    "action": c.action,
                    "restricted": [e.field for e in c.restricted],
                }
                for c in bound
            },
            "not_bound": unbound,
        }

    def _filters(self, ctx: SubjectContext, docs: Any) -> list[tuple[_Collection, list[dict]]]:
        """Each bound collection with the filters that find the subject's documents in it.
        Equality on one top-level field each: what FerretDB pushes down to its PostgreSQL
        backend (an $in or $or it filters document by document itself: 6x slower on 4,000
        sessions). Roots (documents naming the customer id itself, e.g. Customer) come last, so
        an interrupted erasure still finds their dependents (naming the root's _id) on a re-run."""
        bound, _ = self.collections(ctx.catalog)
        fields = DocumentFields(ctx.settings)
        direct = {
            c.name: [d["_id"] for d in docs[c.name].find({c.subject: ctx.customer_id}, {"_id": 1})]
            for c in bound
            if c.subject is not None
        }
        root_ids = [i for ids in direct.values() for i in ids]
        dependent: list[tuple[_Collection, list[dict]]] = []
        roots: list[tuple[_Collection, list[dict]]] = []
        for c in bound:
            if c.subject is not None:
                filters = [{c.subject: ctx.customer_id}, *({c.subject: r} for r in root_ids)]
                (roots if direct[c.name] else dependent).append((c, filters))
            else:
                dependent.append(
                    (
                        c,
                        [
                            {c.email + HASH_SUFFIX: fields.lookup_hash(email)}
                            if fields.enabled
                            else {c.email: email}
                            for email in ctx.identifiers.emails
                        ],
                    )
                )
        return dependent + roots

    def _found(self, ctx: SubjectContext, docs: Any) -> list[tuple[_Collection, list[dict]]]:
        """Each bound collection's documents of the subject, as stored (in _filters' order)."""
        found = []
        for c, filters in self._filters(ctx, docs):
            matched: dict[Any, dict] = {}
            for f in filters:
                for d in docs[c.name].find(f):
                    matched[d["_id"]] = d
            found.append((c, list(matched.values())))
        return found

    def access(self, ctx: SubjectContext) -> list[HeldItem]:
        fields = DocumentFields(ctx.settings)
        docs = docstore.connect(ctx.settings)
        try:
            items = []
            for c, found in self._found(ctx, docs):
                for doc in found:
                    clear = _json_value(fields.decrypt_document(c.name, doc))
                    key = f"_id={doc['_id']}"
                    items.append(
                        HeldItem("documents", c.name, key, clear, f"documents {c.name} {key}")
                    )
            return items
        finally:
            docs.client.close()

    def identifiers(self, ctx: SubjectContext) -> Identifiers:
        fields = DocumentFields(ctx.settings)
        docs = docstore.connect(ctx.settings)
        found: dict[str, set[str]] = {}
        try:
            for c, matched in self._found(ctx, docs):
                wanted = {
                    e.field: kind
                    for e in c.entries
                    if (kind := _identifier_kind(e.field, e.category)) and kind != "email_hashes"
                }
                for doc in matched:
                    clear = fields.decrypt_document(c.name, doc)
                    for path, kind in wanted.items():
                        for value in _values(clear, path.split(".")):
                            if isinstance(value, str) and value:
                                found.setdefault(kind, set()).add(value)
            # The keyed hashes the documents keep beside each e-mail, for the downstream copies.
            emails = found.get("emails", set()) | set(ctx.identifiers.emails)
            if fields.enabled and emails:
                found["email_hashes"] = {fields.lookup_hash(e) for e in emails}
        finally:
            docs.client.close()
        return Identifiers.from_json(found)

    def rectify(self, ctx: SubjectContext, changes: dict[str, Any]) -> StepOutcome:
        """The documents copy some of the sources' fields (e-mail, user name): each changed
        PostgreSQL field is written to the document fields of the same catalog category, in every
        document of the subject (encrypted and re-hashed as the platform writes them)."""
        source = PostgresStore()
        by_category = {}
        for name, value in changes.items():
            entry, _ = source.parse_change(ctx.catalog, name)
            if entry.category:
                by_category[entry.category] = value
        fields = DocumentFields(ctx.settings)
        docs = docstore.connect(ctx.settings)
        counts: dict[str, int] = {}
        try:
            for c, found in self._found(ctx, docs):
                targets = {
                    e.field: by_category[e.category]
                    for e in c.entries
                    if e.category in by_category
                    and "." not in e.field
                    and not e.field.endswith(HASH_SUFFIX)
                }
                if not targets:
                    continue
                changed = 0
                for doc in found:
                    clear = fields.decrypt_document(c.name, doc)
                    if all(clear.get(f) == v for f, v in targets.items()):
                        continue
                    new = fields.encrypt_document(c.name, {"_id": doc["_id"], **targets})
                    new.pop("_id")
                    changed += (
                        docs[c.name].update_one({"_id": doc["_id"]}, {"$set": new}).modified_count
                    )
                for f in targets:
                    counts[f"{c.name}.{f}.rectified"] = changed
        finally:
            docs.client.close()
        return StepOutcome(self.name, counts, "copies of the corrected fields rewritten")

    def erase(self, ctx: SubjectContext) -> StepOutcome:
        docs = docstore.connect(ctx.settings)
        counts: dict[str, int] = {}
        try:
            for c, filters in self._filters(ctx, docs):
                if c.action == "delete":
                    counts[f"{c.name}.deleted"] = sum(
                        docs[c.name].delete_many(f).deleted_count for f in filters
                    )
                    continue
                # Every restricted field, the keyed hashes among them (catalog classes them): a
                # re-run's filters find nothing left.
                unset = {e.field: "" for e in c.restricted}
                counts[f"{c.name}.stripped"] = sum(
                    docs[c.name].update_many(f, {"$unset": unset}).modified_count for f in filters
                )
        finally:
            docs.client.close()
        return StepOutcome(
            self.name,
            counts,
            "documents of the subject deleted; copies of financial records kept without identity",
        )


def _values(doc: Any, parts: list[str]) -> list[Any]:
    """The values at a dotted path (through arrays of objects)."""
    if isinstance(doc, list):
        return [v for item in doc for v in _values(item, parts)]
    if not isinstance(doc, dict) or parts[0] not in doc:
        return []
    if len(parts) == 1:
        value = doc[parts[0]]
        return value if isinstance(value, list) else [value]
    return _values(doc[parts[0]], parts[1:])


POSTGRES = register(PostgresStore())
DOCUMENTS = register(DocumentsStore())
