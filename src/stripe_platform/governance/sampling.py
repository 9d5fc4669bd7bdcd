"""Bounded samples of what the stores really hold: the one place that knows how to read each
backend. `catalog scan` (governance/scan.py) runs its recognizers on sampled rows; `keys coverage`
(security/coverage.py) judges sampled values of the protected fields encrypted or in clear.

    with open_store(settings, "lake") as store:
        store.rows("postgres.merchant", 1000)  # up to 1000 rows, every field; None: not there
        store.values("postgres.merchant", ["name"], 200)  # up to 200 non-empty values a field

Datasets are named as in the catalog: an OLTP table (``customer``), a collection (``Customer``),
a lake stream (``postgres.customer``), a warehouse table (``raw.postgres_customer``; the marts:
``marts.dim_customer``). The warehouse is the configured one (DuckDB, PostgreSQL or Snowflake).
``values`` matches field names case-insensitively (Snowflake upper-cases them) and a document
field is a dotted path whose arrays are walked (``lines.message``); ``rows`` keys each row as
stored, or for the warehouse as the caller spells the names it passes.

Besides a sample, two outcomes, raised out of the ``with``:
- ``StoreNotBuilt``: the store is configured but holds nothing yet (no DuckDB warehouse file; no
  Parquet file, raw table or mart for any dataset read);
- ``StoreUnreachable``: server down, file locked or unreadable, a driver's error (named in the
  message). ``DatasetUnreadable``, its subclass, is one lake dataset whose file cannot be read
  while the others may be.
Samples go to the caller only: the reports built on them carry counts, never a value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from pymongo.errors import PyMongoError

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError

# What a store out of reach raises (server down, file locked or missing), and the drivers whose
# own errors say so too (DuckDB: a file held by a writer).
_OUT_OF_REACH = (PlatformError, psycopg.Error, PyMongoError, OSError)
_DRIVERS = frozenset({"duckdb", "_duckdb", "snowflake"})
# A document may hold many values at one dotted path (arrays): at most this many per sampled row.
_VALUES_PER_DOCUMENT = 10


class StoreNotBuilt(PlatformError):
    """The store is configured but holds nothing yet (the message says what is missing)."""


class StoreUnreachable(PlatformError):
    """The store cannot be read (the message names the driver's error)."""


class DatasetUnreadable(StoreUnreachable):
    """One dataset cannot be read (a damaged file, an encrypted file without its keys)."""


@dataclass
class Values:
    """Sampled values of a dataset's fields: up to the limit of non-empty values of each field
    found (possibly none), and why each other field is missing."""

    found: dict[str, list[Any]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


def _respell(rows: Iterable[Mapping[str, Any]], names: Iterable[str]) -> list[dict[str, Any]]:
    """Rows keyed by the caller's spelling of each column matched case-insensitively (a warehouse
    folds the case of names: Snowflake upper-cases them); other columns as stored."""
    by_lower = {n.lower(): n for n in names}
    return [{by_lower.get(k.lower(), k): v for k, v in row.items()} for row in rows]


class StoreReader:
    """A store opened read-only. ``not_built``: what to say when no dataset read was there."""

    not_built: str | None = None

    def __init__(self) -> None:
        self.found_any = False

    def rows(
        self, dataset: str, limit: int, names: Iterable[str] = ()
    ) -> list[dict[str, Any]] | None:
        """Up to ``limit`` rows of every field, keyed as stored; where the backend folds the case
        of names (the warehouse), as spelled in ``names``. None: the dataset is not there."""
        raise NotImplementedError

    def values(self, dataset: str, fields: Sequence[str], limit: int) -> Values:
        """Up to ``limit`` non-empty values of each field."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


# --- OLTP PostgreSQL ---------------------------------------------------------------------------


class PostgresReader(StoreReader):
    def __init__(self, settings: Settings) -> None:
        from stripe_platform.oltp import db

        super().__init__()
        self.conn = db.connect(settings, autocommit=True)
        self._tables: dict[str, dict[str, str]] | None = None

    def close(self) -> None:
        self.conn.close()

    def _columns(self, table: str) -> dict[str, str] | None:
        """lower column -> real name, of one public table; None when there is no such table."""
        if self._tables is None:
            self._tables = {}
            for name, column in self.conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = 'public'"
            ).fetchall():
                self._tables.setdefault(name.lower(), {})[column.lower()] = column
        return self._tables.get(table.lower())

    def rows(
        self, dataset: str, limit: int, names: Iterable[str] = ()
    ) -> list[dict[str, Any]] | None:
        from psycopg import sql

        if self._columns(dataset) is None:
            return None
        self.found_any = True
        cursor = self.conn.execute(
            sql.SQL("SELECT * FROM {} LIMIT %s").format(sql.Identifier(dataset.lower())), (limit,)
        )
        columns = [d.name for d in cursor.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def values(self, dataset: str, fields: Sequence[str], limit: int) -> Values:
        from psycopg import sql

        columns = self._columns(dataset) or {}
        self.found_any = self.found_any or bool(columns)
        result = Values()
        for name in fields:
            column = columns.get(name.lower())
            if column is None:
                result.missing[name] = "no such column in the database"
                continue
            rows = self.conn.execute(
                sql.SQL("SELECT {c} FROM {t} WHERE {c} IS NOT NULL LIMIT %s").format(
                    c=sql.Identifier(column), t=sql.Identifier(dataset.lower())
                ),
                (limit,),
            ).fetchall()
            result.found[name] = [r[0] for r in rows]
        return result


# --- the document store --------------------------------------------------------------------------


def _at_path(value: Any, path: Sequence[str]) -> Iterator[Any]:
    """The values at a dotted path of a document; arrays are walked (``lines.message``)."""
    if isinstance(value, list):
        for item in value:
            yield from _at_path(item, path)
        return
    if not path:
        yield value
        return
    if isinstance(value, Mapping) and path[0] in value:
        yield from _at_path(value[path[0]], path[1:])


class DocumentsReader(StoreReader):
    def __init__(self, settings: Settings) -> None:
        from stripe_platform.docstore import client as docstore

        super().__init__()
        self.database = docstore.connect(settings)
        self._collections: set[str] | None = None

    def close(self) -> None:
        self.database.client.close()

    def _exists(self, dataset: str) -> bool:
        if self._collections is None:
            self._collections = set(self.database.list_collection_names())
        return dataset in self._collections

    def rows(
        self, dataset: str, limit: int, names: Iterable[str] = ()
    ) -> list[dict[str, Any]] | None:
        if not self._exists(dataset):
            return None
        self.found_any = True
        return list(self.database[dataset].find({}, limit=limit))

    def values(self, dataset: str, fields: Sequence[str], limit: int) -> Values:
        result = Values()
        if not self._exists(dataset):
            result.missing = dict.fromkeys(fields, "no such collection")
            return result
        self.found_any = True
        for name in fields:
            path = name.split(".")
            cursor = self.database[dataset].find(
                {name: {"$exists": True, "$ne": None}}, {path[0]: 1, "_id": 0}, limit=limit
            )
            found = [v for document in cursor for v in _at_path(document, path)]
            result.found[name] = [v for v in found[: limit * _VALUES_PER_DOCUMENT] if v is not None]
        return result


# --- the lake's Parquet files -------------------------------------------------------------------


class LakeReader(StoreReader):
    def __init__(self, settings: Settings) -> None:
        from stripe_platform.lake.writer import LakeWriter

        super().__init__()
        self.lake = LakeWriter.from_settings(settings)
        self.not_built = f"no Parquet file under {self.lake.uri(self.lake.base)}"

    def close(self) -> None:
        pass  # a filesystem handle: nothing held open between reads

    def _files(self, dataset: str) -> list[str]:
        import pyarrow.fs as pafs

        source, stream = dataset.split(".", 1)
        selector = pafs.FileSelector(self.lake.stream_dir(source, stream), recursive=True)
        try:
            infos = self.lake.filesystem.get_file_info(selector)
        except FileNotFoundError:
            return []
        return sorted(i.path for i in infos if i.path.endswith(".parquet"))

    @contextlib.contextmanager
    def _open(self, path: str) -> Iterator[Any]:
        import pyarrow.parquet as pq

        try:
            with self.lake.filesystem.open_input_file(path) as handle:
                yield pq.ParquetFile(handle)
        except (OSError, ValueError) as exc:  # an encrypted file without its keys, or damage
            raise DatasetUnreadable(
                f"{self.lake.uri(path)} not readable ({type(exc).__name__}: {exc})"
            ) from exc

    def rows(
        self, dataset: str, limit: int, names: Iterable[str] = ()
    ) -> list[dict[str, Any]] | None:
        files = self._files(dataset)
        if not files:
            return None
        self.found_any = True
        rows: list[dict[str, Any]] = []
        for path in files:  # the first batch of each file until the limit: a spread of partitions
            with self._open(path) as parquet:
                batch = next(parquet.iter_batches(batch_size=limit), None)
            if batch is not None:
                rows += batch.slice(0, limit - len(rows)).to_pylist()
            if len(rows) >= limit:
                break
        return rows

    def values(self, dataset: str, fields: Sequence[str], limit: int) -> Values:
        files = self._files(dataset)
        if not files:
            return Values(missing=dict.fromkeys(fields, "no Parquet file yet"))
        self.found_any = True
        found: dict[str, list[Any]] = {name: [] for name in fields}
        for path in files:
            with self._open(path) as parquet:
                real = {n.lower(): n for n in parquet.schema_arrow.names}
                wanted = {f: real[f.lower()] for f in fields if f.lower() in real}
                if wanted:
                    batches = parquet.iter_batches(batch_size=limit, columns=list(wanted.values()))
                    batch = next(batches, None)
                    for name, column in wanted.items():
                        if batch is not None:
                            found[name] += [
                                v for v in batch.column(column).to_pylist() if v is not None
                            ]
            if all(len(v) >= limit for v in found.values()):
                break
        return Values(found={name: v[:limit] for name, v in found.items()})


# --- the warehouse (raw layer and marts) ----------------------------------------------------------


class Warehouse:
    """The configured warehouse, read-only: sample a column, see a schema's columns."""

    def __init__(self, settings: Settings) -> None:
        self.backend = settings.warehouse_backend
        self.settings = settings
        if self.backend == "duckdb":
            import duckdb

            if not settings.warehouse_file.exists():
                raise StoreNotBuilt(f"no DuckDB warehouse at {settings.warehouse_file}")
            self.conn: Any = duckdb.connect(str(settings.warehouse_file), read_only=True)
            self.param = "?"
        elif self.backend == "postgres":
            assert settings.warehouse_dsn is not None  # checked by Settings
            self.conn = psycopg.connect(settings.warehouse_dsn.get_secret_value(), autocommit=True)
            self.param = "%s"
        else:
            import snowflake.connector

            from stripe_platform.warehouse import snowflake_params

            self.conn = snowflake.connector.connect(**snowflake_params(settings))
            self.param = "%s"

    def close(self) -> None:
        self.conn.close()

    def _execute(
        self, query: str, params: tuple[Any, ...]
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        cursor = self.conn.cursor()
        try:
            cursor.execute(query, params)
            names = [d[0] for d in cursor.description or ()]
            return names, [tuple(r) for r in cursor.fetchall()]
        finally:
            cursor.close()

    def rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._execute(query, params)[1]

    def records(self, relation: str, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` rows of a relation, every column, keyed by the column's real name."""
        names, rows = self._execute(f"SELECT * FROM {relation} LIMIT {int(limit)}", ())
        return [dict(zip(names, row, strict=True)) for row in rows]

    def columns(self, schema: str) -> dict[str, dict[str, str]]:
        """lower table -> lower column -> the column's real name, of one schema."""
        where = "upper(table_schema)" if self.backend == "snowflake" else "lower(table_schema)"
        name = schema.upper() if self.backend == "snowflake" else schema.lower()
        found: dict[str, dict[str, str]] = {}
        for table, column in self.rows(
            f"SELECT table_name, column_name FROM information_schema.columns WHERE {where} = "
            f"{self.param}",
            (name,),
        ):
            found.setdefault(table.lower(), {})[column.lower()] = column
        return found

    def table_name(self, schema: str, table: str) -> str:
        """Quoted as stored: lower case on DuckDB/PostgreSQL, upper case on Snowflake."""
        if self.backend == "snowflake":
            return f'"{schema.upper()}"."{table.upper()}"'
        return f'"{schema.lower()}"."{table.lower()}"'

    def sample(self, relation: str, column: str, sample: int) -> list[Any]:
        quoted = '"' + column.replace('"', '""') + '"'
        rows = self.rows(
            f"SELECT {quoted} FROM {relation} WHERE {quoted} IS NOT NULL LIMIT {int(sample)}"
        )
        return [r[0] for r in rows]


class WarehouseReader(StoreReader):
    """Datasets ``schema.table`` of the configured warehouse."""

    def __init__(self, settings: Settings, not_built: str) -> None:
        super().__init__()
        self.warehouse = Warehouse(settings)
        self.not_built = not_built
        self._schemas: dict[str, dict[str, dict[str, str]]] = {}

    def close(self) -> None:
        self.warehouse.close()

    def _columns(self, dataset: str) -> tuple[str, dict[str, str] | None]:
        """The dataset's quoted relation, and lower column -> real name (None: no such table)."""
        schema, table = dataset.split(".", 1)
        if schema not in self._schemas:
            self._schemas[schema] = self.warehouse.columns(schema)
        return self.warehouse.table_name(schema, table), self._schemas[schema].get(table.lower())

    def rows(
        self, dataset: str, limit: int, names: Iterable[str] = ()
    ) -> list[dict[str, Any]] | None:
        relation, columns = self._columns(dataset)
        if columns is None:
            return None
        self.found_any = True
        return _respell(self.warehouse.records(relation, limit), names)

    def values(self, dataset: str, fields: Sequence[str], limit: int) -> Values:
        relation, columns = self._columns(dataset)
        if columns is None:
            return Values(missing=dict.fromkeys(fields, "not synced yet"))
        self.found_any = True
        result = Values()
        for name in fields:
            real = columns.get(name.lower())
            if real is None:
                result.missing[name] = "no such column"
            else:
                result.found[name] = self.warehouse.sample(relation, real, limit)
        return result


# --- opening a store ------------------------------------------------------------------------------


def _reader(settings: Settings, store: str) -> StoreReader:
    if store == "postgres":
        return PostgresReader(settings)
    if store == "documents":
        return DocumentsReader(settings)
    if store == "lake":
        return LakeReader(settings)
    if store == "warehouse_raw":
        return WarehouseReader(settings, "no raw table synced yet")
    if store == "marts":
        from stripe_platform.transform.dbt import MARTS_SCHEMA

        return WarehouseReader(
            settings, f"no mart in schema {MARTS_SCHEMA} (run stripe-platform transform)"
        )
    raise ValueError(f"sampling: unknown store {store!r}")


@contextlib.contextmanager
def open_store(settings: Settings, store: str) -> Iterator[StoreReader]:
    """A store's reader (see the module docstring). Whatever the store's driver raises while it is
    open leaves as ``StoreUnreachable``; leaving having found none of the datasets read raises
    ``StoreNotBuilt`` for the stores that can be empty (lake, warehouse)."""
    try:
        reader = _reader(settings, store)
        try:
            yield reader
        finally:
            reader.close()
    except (StoreNotBuilt, StoreUnreachable):
        raise
    except Exception as exc:
        out_of_reach = (
            isinstance(exc, _OUT_OF_REACH) or type(exc).__module__.split(".")[0] in _DRIVERS
        )
        if not out_of_reach:
            raise
        raise StoreUnreachable(f"{type(exc).__name__}: {exc}") from exc
    if reader.not_built and not reader.found_any:
        raise StoreNotBuilt(reader.not_built)


__all__ = [
    "DatasetUnreadable",
    "StoreNotBuilt",
    "StoreReader",
    "StoreUnreachable",
    "Values",
    "Warehouse",
    "WarehouseReader",
    "open_store",
]
