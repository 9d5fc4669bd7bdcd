"""The data-subject request steps of the stores derived from the sources (issue 23 §1): the
warehouse's raw layer and marts, the lake, the logs, and the subject's key last.

What each step does on erasure, and why that way:

- ``warehouse_raw``: the raw tables (``raw.<source>_<stream>``) keep one row per key and are
  rewritten by the next sync anyway, but only when the source row changes; the step nulls every
  RESTRICTED field (pci, pii, pii_quasi, credential: the catalog's) of the subject's rows now, so
  nothing waits for a sync. Protected fields are ciphertext under the subject's key already; the
  pii_quasi ones (IP address, user name, postal code, e-mail hash, fingerprint...) are in clear and
  would stay readable after the key is shredded.
- ``marts``: the dbt tables keep derived copies (DIM_Customer.UserName, FACT_Session's city and
  country) and the customers snapshot keeps every past version (a rebuild would not drop them):
  their classified fields are nulled for the subject's rows, in place; the next build derives the
  same nulls from the erased raw rows.
- ``lake``: every parquet file (live ``raw/`` and every ``superseded/`` generation) holding a row
  of the subject is rewritten with that row's RESTRICTED fields nulled, atomically under the same
  name (``LakeWriter.put_bytes``); other rows and files are left as they are. Copies the platform
  cannot rewrite (backups, an exploration copy someone took) hold the protected fields as
  ciphertext under the subject's key: the ``keys`` step makes them unreadable.
- ``logs``: Log documents and the log files (the API's access log, PostgreSQL's jsonlog) are
  searched for the subject's identifiers (e-mails, names, phones, IPs, user names, e-mail hashes:
  ``Identifiers``, gathered from the sources before any erase step); a hit is replaced: in
  documents by ``[erased]``, in files byte for byte by ``*`` of the same length, so a file keeps
  its length and line offsets (a writer appending to it is not disturbed). The audit trail is not
  rewritten: it is append-only and hash-chained by design, and the collector redacts every literal
  before anything reaches it (tests/test_privacy_erasure.py shows nothing personal is readable).
- ``keys``: ``SubjectKeys.shred``: every remaining ciphertext of the subject (lake copies, the
  request's own encrypted copy of the identifiers) is unreadable from then on.

Whose rows: a dataset whose catalog entries name a ``subject`` field holds the subject's rows where
that field is the customer id, or (documents that reference ``Customer._id``) one of the subject's
customer document ids. A dataset without one (the Transaction and Log documents' copies) holds
them where one of its RESTRICTED fields in clear equals, or for JSON fields contains, one of the
subject's identifiers; every RESTRICTED field of such a row is nulled (a fraud copy that carries
the subject's IP under another customer loses its personal fields in the derived copy only; the
source documents are the documents step's).

Rectification happens at the source; these stores receive it from the normal pipelines (the next
sync, dbt build): their ``rectify`` says so and changes nothing.

Supported warehouses: DuckDB (embedded) and PostgreSQL. On Snowflake the warehouse steps fail with
a StoreError naming the gap (the request stays ``failed`` there, re-runnable once supported).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stripe_platform.compliance.stores import (
    HeldItem,
    Identifiers,
    StepOutcome,
    StoreError,
    SubjectContext,
    register,
)
from stripe_platform.config import Settings
from stripe_platform.governance.classification import EXTRA_COLUMN, Catalog
from stripe_platform.security.keys import KeyShredded, KeyUnavailable, TamperedCiphertext

ERASED = "[erased]"
# The lake's and the warehouse's bookkeeping columns: no personal data (the catalog's own rule).
METADATA_PREFIXES = ("_airbyte_", "_ab_cdc_")
# dbt snapshots copy a staging model with its history; the catalog classifies marts, not
# snapshots, so their personal columns are named here: customers_snapshot is Customer's
# (user_name is Customer.UserName, email_hash Customer.EmailHash, both pii_quasi).
SNAPSHOT_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "customers_snapshot": ("customer_id", ("user_name", "email_hash")),
}
SNAPSHOT_SCHEMA = "snapshots"
CUSTOMER_DOCUMENTS = "Customer"  # the collection whose _id other documents reference


@dataclass(frozen=True)
class Dataset:
    """One dataset of a store as the catalog declares it: its subject field and its fields to
    read and erase (RESTRICTED classes)."""

    name: str
    subject: str | None
    fields: tuple[str, ...]


def datasets(catalog: Catalog, store: str) -> list[Dataset]:
    """The store's datasets with RESTRICTED fields, from the catalog."""
    found: dict[str, Dataset] = {}
    for entry in catalog.restricted(store):  # type: ignore[arg-type]
        d = found.get(entry.dataset) or Dataset(entry.dataset, entry.subject, ())
        found[entry.dataset] = Dataset(d.name, d.subject, (*d.fields, entry.field))
    return list(found.values())


def _plan(catalog: Catalog, store: str) -> dict[str, Any]:
    return {
        "datasets": {
            d.name: {"subject": d.subject, "fields": list(d.fields)}
            for d in datasets(catalog, store)
        }
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _split_raw(name: str, *, sep: str) -> tuple[str, str]:
    """("postgres", "customer") of a raw table ``postgres_customer`` (sep "_") or a lake dataset
    ``postgres.customer`` (sep "."): the source kind and the source's table or collection, which
    the raw layer's ciphertexts are bound to."""
    source, _, dataset = name.partition(sep)
    return source, dataset


class _Readable:
    """Decrypts raw-layer ciphertext for access exports (the platform holds the keys)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._keys: Any = None

    def value(self, source: str, dataset: str, column: str, value: Any) -> Any:
        if not isinstance(value, bytes | bytearray | memoryview):
            return _jsonable(value)
        from stripe_platform.security.envelope import shared_envelope
        from stripe_platform.security.subjects_layer import decrypt_column

        if self._keys is None:
            envelope = shared_envelope(self.settings)
            self._keys = (envelope, envelope.subject_keys())
        envelope, subjects = self._keys
        try:
            plain = decrypt_column(
                envelope, source, dataset, column, [bytes(value)], subjects=subjects
            )[0]
        except KeyShredded:
            return "unreadable: the subject's key is shredded"
        except (KeyUnavailable, TamperedCiphertext):
            return f"<{len(bytes(value))} bytes, encrypted>"
        assert plain is not None
        try:
            return plain.decode()
        except UnicodeDecodeError:  # the source's own ciphertext (pgcrypto, document fields)
            return "encrypted copy of the source's encrypted value (see the source's item)"


# --- the subject's keys in each id space ------------------------------------------------------


def document_ids(ctx: SubjectContext) -> set[str]:
    """The subject's customer document ids (what CustomerReview and UserInteractionData name):
    from the documents while they are there, else from the warehouse's raw copy (an erasure that
    failed after the documents step re-runs without them)."""
    found: set[str] = set()
    from stripe_platform.docstore import client as docstore

    documents = docstore.connect(ctx.settings)
    try:
        for doc in documents[CUSTOMER_DOCUMENTS].find({"oltp_id": ctx.customer_id}, {"_id": 1}):
            found.add(str(doc["_id"]))
    finally:
        documents.client.close()
    if ctx.settings.warehouse_backend in ("duckdb", "postgres"):
        with _Warehouse(ctx.settings, read_only=True) as wh:
            table = wh.find("raw", f"mongodb_{CUSTOMER_DOCUMENTS.lower()}")
            if table is not None and {"_id", "oltp_id"} <= set(table.columns):
                rows = wh.query(
                    f"SELECT DISTINCT {wh.text(table.col('_id'))} FROM {table.ref} "
                    f"WHERE {table.col('oltp_id')} = {wh.ph}",
                    [ctx.customer_id],
                )
                found |= {r[0] for r in rows if r[0]}
    return found


def subject_keys(ctx: SubjectContext, documents: Iterable[str] = ()) -> list[str]:
    """Every value a subject field may hold for this subject, as text."""
    return sorted({str(ctx.customer_id), *documents})


def _needles(identifiers: Identifiers) -> list[str]:
    """Identifier values worth searching for (a one-letter name would match everything)."""
    return [v for v in identifiers.values() if len(v) >= 4]


# --- the warehouse ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    schema: str
    name: str
    columns: dict[str, str]  # lower-case name -> the name as stored
    required: frozenset[str] = frozenset()  # lower-case names of NOT NULL columns

    @property
    def ref(self) -> str:
        return f"{_q(self.schema)}.{_q(self.name)}"

    def col(self, name: str) -> str:
        return _q(self.columns[name.lower()])

    def has(self, name: str) -> bool:
        return name.lower() in self.columns

    def erased(self, name: str) -> str:
        """The value an erased field takes: NULL, or the ERASED mark where the column may not be
        null (a mart's contract, e.g. DIM_Customer.UserName)."""
        return f"'{ERASED}'" if name.lower() in self.required else "NULL"

    def holding(self, name: str) -> str:
        """SQL true where the field still holds something to erase."""
        column = self.col(name)
        if name.lower() in self.required:
            return f"({column} IS NOT NULL AND {column} <> '{ERASED}')"
        return f"{column} IS NOT NULL"

    def erase_sql(self, fields: list[str]) -> tuple[str, str]:
        """(the SET list, the condition that some field still holds a value)."""
        sets = ", ".join(f"{self.col(f)} = {self.erased(f)}" for f in fields)
        return sets, " OR ".join(self.holding(f) for f in fields)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Warehouse:
    """The configured warehouse (DuckDB or PostgreSQL) for the privacy steps: one transaction."""

    def __init__(self, settings: Settings, *, read_only: bool = False) -> None:
        self.backend = settings.warehouse_backend
        if self.backend == "duckdb":
            import duckdb

            path = settings.warehouse_file
            self.ph = "?"
            if not Path(path).exists():
                self.conn: Any = None
                return
            try:
                if read_only:
                    self.conn = duckdb.connect(str(path), read_only=True)
                else:
                    from stripe_platform.warehouse.duckdb import connect_duckdb

                    self.conn = connect_duckdb(path)
            except duckdb.IOException as exc:
                raise StoreError(
                    f"warehouse {path}: cannot be opened ({exc}); another process holds it "
                    "(a sync or dbt build): run the request again when it is done"
                ) from exc
        elif self.backend == "postgres":
            import psycopg

            assert settings.warehouse_dsn is not None  # checked by Settings
            self.ph = "%s"
            self.conn = psycopg.connect(settings.warehouse_dsn.get_secret_value())
        else:
            raise StoreError(
                f"warehouse {self.backend}: the privacy steps support DuckDB and PostgreSQL "
                "warehouses only; erase the subject's rows on Snowflake by hand, then re-run"
            )
        self._tables: dict[tuple[str, str], _Table] | None = None

    def __enter__(self) -> _Warehouse:
        if self.conn is not None and self.backend == "duckdb":
            self.conn.execute("BEGIN TRANSACTION")
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if self.conn is None:
            return
        try:
            if kind is None:
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            self.conn.close()

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        if self.backend == "duckdb":
            return self.conn.execute(sql, params or []).fetchall()
        return self.conn.execute(sql, params or []).fetchall()

    def execute(self, sql: str, params: list[Any] | None = None) -> int:
        if self.backend == "duckdb":
            rows = self.conn.execute(sql, params or []).fetchall()
            return int(rows[0][0]) if rows else 0  # DuckDB returns the count as a row
        return self.conn.execute(sql, params or []).rowcount

    def find(self, schema: str, name: str) -> _Table | None:
        """A table (not a view: views follow their tables) by case-insensitive name."""
        if self.conn is None:
            return None
        if self._tables is None:
            rows = self.query(
                "SELECT c.table_schema, c.table_name, c.column_name, c.is_nullable "
                "FROM information_schema.columns c JOIN information_schema.tables t "
                "ON t.table_schema = c.table_schema AND t.table_name = c.table_name "
                "WHERE t.table_type = 'BASE TABLE'"
            )
            columns: dict[tuple[str, str], dict[str, str]] = {}
            required: dict[tuple[str, str], set[str]] = {}
            for s, t, c, nullable in rows:
                columns.setdefault((s, t), {})[c.lower()] = c
                if nullable == "NO":
                    required.setdefault((s, t), set()).add(c.lower())
            self._tables = {
                (s.lower(), t.lower()): _Table(s, t, cols, frozenset(required.get((s, t), ())))
                for (s, t), cols in columns.items()
            }
        return self._tables.get((schema.lower(), name.lower()))

    def text(self, column: str) -> str:
        return f"CAST({column} AS VARCHAR)" if self.backend == "duckdb" else f"{column}::text"

    def json_key(self, column: str, key: str) -> str:
        if self.backend == "duckdb":
            return f"json_extract_string({column}, '$.{key}')"
        return f"({column}::jsonb ->> '{key}')"

    def matches(self, column: str) -> str:
        """SQL true where the column's text holds a match of the pattern parameter."""
        if self.backend == "duckdb":
            return f"regexp_matches({self.text(column)}, {self.ph})"
        return f"{self.text(column)} ~ {self.ph}"

    def placeholders(self, n: int) -> str:
        return ", ".join([self.ph] * n)


def _subject_expr(wh: _Warehouse, table: _Table, subject: str) -> str | None:
    if subject.startswith(f"{EXTRA_COLUMN}."):
        if not table.has(EXTRA_COLUMN):
            return None
        return wh.json_key(table.col(EXTRA_COLUMN), subject.split(".", 1)[1])
    return wh.text(table.col(subject)) if table.has(subject) else None


def _rows_where(
    wh: _Warehouse, table: _Table, dataset: Dataset, keys: list[str], needles: list[str]
) -> tuple[str, list[Any]] | None:
    """The SQL condition selecting the subject's rows of ``table``, with its parameters."""
    if dataset.subject is not None:
        expr = _subject_expr(wh, table, dataset.subject)
        if expr is None:
            raise StoreError(
                f"warehouse {table.schema}.{table.name}: the catalog's subject field "
                f"{dataset.subject!r} is not a column: its rows cannot be found per customer"
            )
        return f"{expr} IN ({wh.placeholders(len(keys))})", list(keys)
    if not needles:
        return None
    # One regular expression of every identifier a field (JSON fields such as Log lines hold them
    # inside their text): a fraud victim has hundreds of IPs, and a condition per identifier and
    # field made the scan quadratic.
    pattern = _pattern(needles)
    clauses = [wh.matches(table.col(f)) for f in dataset.fields if table.has(f)]
    return (" OR ".join(clauses), [pattern] * len(clauses)) if clauses else None


def _pattern(needles: list[str]) -> str:
    """A regular expression (RE2 and PostgreSQL syntax alike) matching any of the identifiers."""
    return "|".join(re.escape(n) for n in needles)


class WarehouseRaw:
    """The warehouse's raw tables (Destinations V2 layout)."""

    name = "warehouse_raw"
    store = "warehouse_raw"

    def plan(self, catalog: Catalog) -> dict[str, Any]:
        return _plan(catalog, self.store)

    def _tables(self, wh: _Warehouse, catalog: Catalog) -> Iterator[tuple[Dataset, _Table]]:
        for dataset in datasets(catalog, self.store):
            schema, _, name = dataset.name.partition(".")
            table = wh.find(schema, name)
            if table is not None:
                yield dataset, table

    def access(self, ctx: SubjectContext) -> list[HeldItem]:
        keys = subject_keys(ctx, document_ids(ctx))
        needles = _needles(ctx.identifiers)
        readable = _Readable(ctx.settings)
        items: list[HeldItem] = []
        with _Warehouse(ctx.settings, read_only=True) as wh:
            for dataset, table in self._tables(wh, ctx.catalog):
                where = _rows_where(wh, table, dataset, keys, needles)
                if where is None:
                    continue
                names = [c for c in table.columns.values() if not c.startswith(METADATA_PREFIXES)]
                rows = wh.query(
                    f"SELECT {', '.join(_q(c) for c in names)} FROM {table.ref} WHERE {where[0]}",
                    where[1],
                )
                source, stream = _split_raw(table.name, sep="_")
                for n, row in enumerate(rows):
                    fields = {
                        c: readable.value(source, stream, c, v)
                        for c, v in zip(names, row, strict=True)
                    }
                    key = str(fields.get("id", fields.get("_id", n)))
                    items.append(
                        HeldItem(
                            self.name,
                            dataset.name,
                            key,
                            fields,
                            f"warehouse ({wh.backend}) {dataset.name} row {key}",
                        )
                    )
        return items

    def rectify(self, ctx: SubjectContext, changes: dict[str, Any]) -> StepOutcome:
        return StepOutcome(self.name, {}, "corrected at the source; the next sync brings it here")

    def identifiers(self, ctx: SubjectContext) -> Identifiers:
        return Identifiers()

    def erase(self, ctx: SubjectContext) -> StepOutcome:
        keys = subject_keys(ctx, document_ids(ctx))
        needles = _needles(ctx.identifiers)
        counts: dict[str, int] = {}
        with _Warehouse(ctx.settings) as wh:
            for dataset, table in self._tables(wh, ctx.catalog):
                where = _rows_where(wh, table, dataset, keys, needles)
                fields = [f for f in dataset.fields if table.has(f)]
                if where is None or not fields:
                    continue
                # Only rows that still hold something: a second run changes nothing.
                sets, held = table.erase_sql(fields)
                n = wh.execute(
                    f"UPDATE {table.ref} SET {sets} WHERE ({where[0]}) AND ({held})", where[1]
                )
                if n:
                    counts[f"{dataset.name}.nulled"] = n
        return StepOutcome(self.name, counts, "restricted fields of the subject's rows nulled")


class Marts:
    """The dbt marts (the catalog's marts entries) and the snapshots of subject datasets."""

    name = "marts"
    store = "marts"

    def plan(self, catalog: Catalog) -> dict[str, Any]:
        plan = _plan(catalog, self.store)
        plan["snapshots"] = {
            name: {"subject": subject, "fields": list(fields)}
            for name, (subject, fields) in SNAPSHOT_FIELDS.items()
        }
        return plan

    def _targets(
        self, wh: _Warehouse, catalog: Catalog
    ) -> Iterator[tuple[str, _Table, str, list[str]]]:
        from stripe_platform.transform.dbt import MARTS_SCHEMA

        for dataset in datasets(catalog, self.store):
            table = wh.find(MARTS_SCHEMA, dataset.name)
            if table is None or dataset.subject is None:
                continue
            fields = [f for f in dataset.fields if table.has(f)]
            yield dataset.name, table, dataset.subject, fields
        for name, (subject, fields) in SNAPSHOT_FIELDS.items():
            table = wh.find(SNAPSHOT_SCHEMA, name)
            if table is not None:
                yield (
                    f"{SNAPSHOT_SCHEMA}.{name}",
                    table,
                    subject,
                    [f for f in fields if table.has(f)],
                )

    def access(self, ctx: SubjectContext) -> list[HeldItem]:
        items: list[HeldItem] = []
        with _Warehouse(ctx.settings, read_only=True) as wh:
            for name, table, subject, _ in self._targets(wh, ctx.catalog):
                names = list(table.columns.values())
                rows = wh.query(
                    f"SELECT {', '.join(_q(c) for c in names)} FROM {table.ref} "
                    f"WHERE {table.col(subject)} = {wh.ph}",
                    [ctx.customer_id],
                )
                for n, row in enumerate(rows):
                    fields = {c: _jsonable(v) for c, v in zip(names, row, strict=True)}
                    items.append(
                        HeldItem(
                            self.name,
                            name,
                            str(n),
                            fields,
                            f"warehouse ({wh.backend}) {table.schema}.{table.name} "
                            f"{subject}={ctx.customer_id}",
                        )
                    )
        return items

    def rectify(self, ctx: SubjectContext, changes: dict[str, Any]) -> StepOutcome:
        return StepOutcome(self.name, {}, "corrected at the source; the next dbt build brings it")

    def identifiers(self, ctx: SubjectContext) -> Identifiers:
        return Identifiers()

    def erase(self, ctx: SubjectContext) -> StepOutcome:
        counts: dict[str, int] = {}
        with _Warehouse(ctx.settings) as wh:
            for name, table, subject, fields in self._targets(wh, ctx.catalog):
                if not fields:
                    continue
                sets, held = table.erase_sql(fields)
                n = wh.execute(
                    f"UPDATE {table.ref} SET {sets} "
                    f"WHERE {table.col(subject)} = {wh.ph} AND ({held})",
                    [ctx.customer_id],
                )
                if n:
                    counts[f"{name}.nulled"] = n
        return StepOutcome(self.name, counts, "classified mart and snapshot fields nulled")


# --- the lake ---------------------------------------------------------------------------------


def _lake():
    from stripe_platform.lake.writer import LakeWriter

    return LakeWriter


def lake_files(writer: Any, source: str, stream: str) -> list[str]:
    """Every data file of a stream, live and superseded (filesystem paths)."""
    from stripe_platform.lake.writer import HISTORY, LIVE

    found = []
    for top in (LIVE, HISTORY):
        directory = f"{writer.base}/{top}/{source}/{stream}"
        selector = pafs.FileSelector(directory, recursive=True, allow_not_found=True)
        with writer.reaching(directory, "read"):
            for info in writer.filesystem.get_file_info(selector):
                name = info.path.rpartition("/")[2]
                # A hidden name is a write in progress.
                if info.type == pafs.FileType.File and name.endswith(".parquet"):
                    found += [] if name.startswith(".") else [info.path]
    return sorted(found)


def _lake_mask(
    table: pa.Table, dataset: Dataset, keys: list[str], needles: list[str]
) -> pa.Array | None:
    """Which rows of a lake file are the subject's (None: no such column to tell)."""
    n = table.num_rows
    if dataset.subject is not None:
        subject = dataset.subject
        if subject.startswith(f"{EXTRA_COLUMN}."):
            if EXTRA_COLUMN not in table.column_names:
                return None
            key = subject.split(".", 1)[1]
            extra = table.column(EXTRA_COLUMN)
            mask = pa.array([False] * n)
            for k in keys:  # a cheap substring test, then the JSON read on the candidates
                mask = pc.or_(mask, pc.fill_null(pc.match_substring(extra, f'"{k}"'), False))
            hits = mask.to_pylist()
            if any(hits):
                values = extra.to_pylist()
                hits = [
                    bool(h) and str((json.loads(v) or {}).get(key)) in keys
                    for h, v in zip(hits, values, strict=True)
                ]
            return pa.array(hits)
        if subject not in table.column_names:
            return None
        column = pc.cast(table.column(subject), pa.string())
        return pc.fill_null(pc.is_in(column, pa.array(keys, pa.string())), False)
    mask = pa.array([False] * n)
    pattern = _pattern(needles)
    for field in dataset.fields:
        if field not in table.column_names or not needles:
            continue
        column = table.column(field)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            continue
        hit = pc.match_substring_regex(column, pattern)
        mask = pc.or_(mask, pc.fill_null(hit, False))
    return mask


class Lake:
    """The raw lake's parquet files, live and superseded."""

    name = "lake"
    store = "lake"

    def plan(self, catalog: Catalog) -> dict[str, Any]:
        return _plan(catalog, self.store)

    def _scan(self, ctx: SubjectContext) -> Iterator[tuple[Any, Dataset, str, pa.Table, pa.Array]]:
        """(writer, dataset, file path, its table, the subject's rows) of each file with a hit."""
        writer = _lake().from_settings(ctx.settings)
        catalog_sets = datasets(ctx.catalog, self.store)
        documents = document_ids(ctx)
        # The customer documents' own lake copies name the subject's document ids too.
        customers = CUSTOMER_DOCUMENTS.lower()
        for path in lake_files(writer, "mongodb", customers):
            with writer.reaching(path, "read"):
                parquet = pq.ParquetFile(path, filesystem=writer.filesystem)
                if not {"_id", "oltp_id"} <= set(parquet.schema_arrow.names):
                    continue
                t = parquet.read(columns=["_id", "oltp_id"])
            hit = pc.fill_null(pc.equal(t.column("oltp_id"), ctx.customer_id), False)
            documents |= {str(v) for v in pc.filter(t.column("_id"), hit).to_pylist() if v}
        keys = subject_keys(ctx, documents)
        needles = _needles(ctx.identifiers)
        for dataset in catalog_sets:
            source, stream = _split_raw(dataset.name, sep=".")
            # Only the columns that tell whose a row is are read from every file; the whole file
            # only when it holds a row of the subject.
            if dataset.subject is None:
                telling = list(dataset.fields)
            else:
                telling = [dataset.subject.split(".", 1)[0]]
            for path in lake_files(writer, source, stream):
                with writer.reaching(path, "read"):
                    parquet = pq.ParquetFile(path, filesystem=writer.filesystem)
                    present = [c for c in telling if c in parquet.schema_arrow.names]
                    if not present:
                        continue
                    mask = _lake_mask(parquet.read(columns=present), dataset, keys, needles)
                    if mask is None or not pc.any(mask).as_py():
                        continue
                    table = parquet.read()
                yield writer, dataset, path, table, mask

    def access(self, ctx: SubjectContext) -> list[HeldItem]:
        readable = _Readable(ctx.settings)
        items: list[HeldItem] = []
        for writer, dataset, path, table, mask in self._scan(ctx):
            source, stream = _split_raw(dataset.name, sep=".")
            rows = table.filter(mask).to_pylist()
            for n, row in enumerate(rows):
                fields = {
                    c: readable.value(source, stream, c, v)
                    for c, v in row.items()
                    if not c.startswith(METADATA_PREFIXES)
                }
                items.append(
                    HeldItem(
                        self.name,
                        dataset.name,
                        f"{path.rpartition('/')[2]}#{n}",
                        fields,
                        f"lake {writer.uri(path)}",
                    )
                )
        return items

    def rectify(self, ctx: SubjectContext, changes: dict[str, Any]) -> StepOutcome:
        return StepOutcome(
            self.name, {}, "corrected at the source; the next sync writes the new version"
        )

    def identifiers(self, ctx: SubjectContext) -> Identifiers:
        return Identifiers()

    def erase(self, ctx: SubjectContext) -> StepOutcome:
        from stripe_platform.lake.writer import _generation_of, _write_parquet

        counts: dict[str, int] = {}
        files = 0
        for writer, dataset, path, table, mask in self._scan(ctx):
            columns = {}
            for field in dataset.fields:
                if field not in table.column_names:
                    continue
                column = table.column(field)
                # Rows of the subject still holding a value: none left means nothing to rewrite.
                if pc.any(pc.and_(mask, pc.is_valid(column))).as_py():
                    columns[field] = pc.if_else(mask, pa.scalar(None, column.type), column)
            if not columns:
                continue
            for field, values in columns.items():
                table = table.set_column(table.column_names.index(field), field, values)
            with writer.reaching(path, "read"):
                generation = _generation_of(
                    pq.ParquetFile(path, filesystem=writer.filesystem).metadata
                )
            buffer = pa.BufferOutputStream()
            _write_parquet(table, buffer, writer.compression, generation or 0)
            writer.put_bytes(path, buffer.getvalue().to_pybytes())
            files += 1
            key = f"{dataset.name}.rows_nulled"
            counts[key] = counts.get(key, 0) + int(pc.sum(mask.cast(pa.int64())).as_py() or 0)
        if files:
            counts["files_rewritten"] = files
        return StepOutcome(self.name, counts, "the subject's rows rewritten, fields nulled")


# --- the logs ---------------------------------------------------------------------------------


def _redact_text(text: str, needles: list[str]) -> str:
    for needle in needles:
        text = text.replace(needle, ERASED)
    return text


def _redact_value(value: Any, needles: list[str]) -> Any:
    if isinstance(value, str):
        return _redact_text(value, needles)
    if isinstance(value, dict):
        return {k: _redact_value(v, needles) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v, needles) for v in value]
    return value


def _log_files(settings: Settings) -> list[Path]:
    from stripe_platform.audit.collector import sources

    found: list[Path] = []
    for source in sources(settings):
        if source.directory.is_dir():
            found += sorted(source.directory.glob(source.pattern))
    return found


def _file_hits(path: Path, needles: list[str]) -> list[tuple[int, int]]:
    """(offset, length) of each identifier in a log file. The lines are matched at once by one
    regular expression (Arrow's RE2: a fraud victim has hundreds of IPs, and a scan a needle was
    quadratic), then the few matching lines are searched for the offsets."""
    data = path.read_bytes()
    if not data or not needles:
        return []
    # latin-1 maps each byte to one character: offsets in the text are offsets in the file.
    text = data.decode("latin-1")
    latin = [n.encode().decode("latin-1") for n in needles]
    lines = text.split("\n")
    matched = pc.match_substring_regex(pa.array(lines, pa.large_string()), _pattern(latin))
    compiled = re.compile(_pattern(latin))
    hits, offset = [], 0
    for line, hit in zip(lines, matched.to_pylist(), strict=True):
        if hit:
            hits += [(offset + m.start(), m.end() - m.start()) for m in compiled.finditer(line)]
        offset += len(line) + 1
    return hits


class Logs:
    """Log documents and the log files the platform writes."""

    name = "logs"
    collection = "Log"

    def plan(self, catalog: Catalog) -> dict[str, Any]:
        fields = [e.field for e in catalog.restricted("documents") if e.dataset == self.collection]
        return {"documents": {self.collection: fields}, "files": ["api access log", "postgres"]}

    def _documents(self, ctx: SubjectContext) -> Iterator[tuple[Any, dict]]:
        needles = _needles(ctx.identifiers)
        if not needles:
            return
        from stripe_platform.docstore import client as docstore

        fields = [
            e.field for e in ctx.catalog.restricted("documents") if e.dataset == self.collection
        ]
        if not fields:
            return
        db = docstore.connect(ctx.settings)
        try:
            collection = db[self.collection]
            # The fields read once and matched here by one RE2 expression: the document server
            # evaluates a $regex of hundreds of alternatives document by document (12 s for 500
            # Log documents and a fraud victim's IPs on FerretDB).
            projection = {f.split(".")[0]: 1 for f in fields}
            ids, texts = [], []
            for doc in collection.find({}, projection):
                ids.append(doc["_id"])
                texts.append(json.dumps({k: v for k, v in doc.items() if k != "_id"}, default=str))
            if not ids:
                return
            hits = pc.match_substring_regex(pa.array(texts, pa.large_string()), _pattern(needles))
            found = [i for i, hit in zip(ids, hits.to_pylist(), strict=True) if hit]
            for start in range(0, len(found), 1000):
                for doc in collection.find({"_id": {"$in": found[start : start + 1000]}}):
                    yield collection, doc
        finally:
            db.client.close()

    def access(self, ctx: SubjectContext) -> list[HeldItem]:
        items = [
            HeldItem(
                self.name,
                self.collection,
                str(doc["_id"]),
                _jsonable({k: v for k, v in doc.items() if k != "_id"}),
                f"documents {self.collection} _id={doc['_id']}",
            )
            for _, doc in self._documents(ctx)
        ]
        needles = _needles(ctx.identifiers)
        for path in _log_files(ctx.settings):
            hits = _file_hits(path, needles)
            if hits:
                with path.open("rb") as f:
                    data = f.read()
                lines = sorted({data.rfind(b"\n", 0, at) + 1 for at, _ in hits})
                for start in lines:
                    end = data.find(b"\n", start)
                    line = data[start : end if end != -1 else len(data)]
                    items.append(
                        HeldItem(
                            self.name,
                            path.name,
                            str(start),
                            {"line": line.decode(errors="replace")},
                            f"log file {path} at byte {start}",
                        )
                    )
        return items

    def rectify(self, ctx: SubjectContext, changes: dict[str, Any]) -> StepOutcome:
        return StepOutcome(self.name, {}, "logs record what happened; nothing to correct")

    def identifiers(self, ctx: SubjectContext) -> Identifiers:
        return Identifiers()

    def erase(self, ctx: SubjectContext) -> StepOutcome:
        needles = _needles(ctx.identifiers)
        counts: dict[str, int] = {}
        for collection, doc in self._documents(ctx):
            redacted = _redact_value({k: v for k, v in doc.items() if k != "_id"}, needles)
            collection.replace_one({"_id": doc["_id"]}, redacted)
            counts["Log.documents_redacted"] = counts.get("Log.documents_redacted", 0) + 1
        for path in _log_files(ctx.settings):
            hits = _file_hits(path, needles)
            if not hits:
                continue
            # In place, same length: the file's writer keeps appending at its offset, and readers
            # that remember offsets (the collector) still find their lines.
            try:
                with path.open("r+b") as f:
                    for at, length in hits:
                        f.seek(at)
                        f.write(b"*" * length)
            except OSError as exc:
                raise StoreError(
                    f"logs: {path} holds the subject's identifiers and cannot be rewritten "
                    f"({exc}); the platform's OS user must be able to write its log files"
                ) from exc
            counts[f"{path.parent.name}/{path.name}.redacted"] = len(hits)
        return StepOutcome(self.name, counts, "identifiers redacted from Log documents and files")


# --- the keys ---------------------------------------------------------------------------------


class Keys:
    """The subject's own key, shredded last."""

    name = "keys"

    def plan(self, catalog: Catalog) -> dict[str, Any]:
        return {"shred": "subjects/<customer id>"}

    def _subjects(self, settings: Settings):
        # The process's shared key cache: shredding drops the key from it for every reader here.
        from stripe_platform.security.envelope import shared_envelope

        return shared_envelope(settings).subject_keys()

    def access(self, ctx: SubjectContext) -> list[HeldItem]:
        shredded = self._subjects(ctx.settings).is_shredded(ctx.customer_id)
        return [
            HeldItem(
                self.name,
                "subject_key",
                f"subjects/{ctx.customer_id}",
                {"state": "shredded" if shredded else "live"},
                f"keys.subject_key subject_id={ctx.customer_id}",
            )
        ]

    def rectify(self, ctx: SubjectContext, changes: dict[str, Any]) -> StepOutcome:
        return StepOutcome(self.name, {}, "a key holds no data to correct")

    def identifiers(self, ctx: SubjectContext) -> Identifiers:
        return Identifiers()

    def erase(self, ctx: SubjectContext) -> StepOutcome:
        destroyed = self._subjects(ctx.settings).shred(
            ctx.customer_id, reason=f"privacy request {ctx.request_id}: erasure"
        )
        return StepOutcome(
            self.name,
            {"subject_key.shredded": 1} if destroyed else {},
            "the subject's key is destroyed: every remaining ciphertext of theirs is unreadable",
        )


for _store in (WarehouseRaw(), Marts(), Lake(), Logs(), Keys()):
    register(_store)
