"""Connections as code: the YAML in ``airbyte/``, loaded into validated models.

One stream catalog (``catalog.yaml``) declares each stream's primary key, cursor and sync mode; the
Airbyte API path (:mod:`stripe_platform.ingestion.airbyte`) and the embedded engine both read it, so
nothing lists a stream twice. Loading checks every stream against what really exists (the
``CREATE TABLE`` statements in ``sql/oltp`` and the specs in ``mongo/collections``) so a renamed
table or a typo fails here, naming the file and the field, instead of inside a sync hours later.
Secrets never appear in the YAML: it names environment variables, read by :func:`require_env`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from stripe_platform.errors import PlatformError
from stripe_platform.paths import MONGO_DIR, REPO_ROOT, SQL_OLTP_DIR

__all__ = [
    "AIRBYTE_DIR",
    "CDC_COLUMNS",
    "LAKE_FILE_NAME_PATTERN",
    "LAKE_PATH_FORMAT",
    "LAKE_PREFIX",
    "Catalog",
    "CatalogError",
    "Connection",
    "CronSchedule",
    "Destination",
    "MissingEnvError",
    "MongoSource",
    "PostgresSource",
    "ResolvedConnection",
    "S3Destination",
    "SnowflakeDestination",
    "Source",
    "Stream",
    "StreamGroup",
    "SyncMode",
    "UnknownConnectionError",
    "Workspace",
    "document_fields",
    "lake_key",
    "load_catalog",
    "oltp_column_comments",
    "oltp_column_labels",
    "oltp_columns",
    "require_env",
]

AIRBYTE_DIR = REPO_ROOT / "airbyte"

# The lake layout contract: raw/<source>/<stream>/extracted_date=YYYY-MM-DD/<sync_id>-<n>.parquet.
# Airbyte's S3 destination writes <bucket_path>/<path format><file name pattern>; the connection
# namespace is the <source> segment. Fixed here, not in YAML, because dbt, DuckDB, Snowflake external
# tables and Athena all read this exact layout.
LAKE_PREFIX = "raw"
LAKE_PATH_FORMAT = "${NAMESPACE}/${STREAM_NAME}/extracted_date=${YEAR}-${MONTH}-${DAY}/"
LAKE_FILE_NAME_PATTERN = "{sync_id}-{part_number}{format_extension}"

# Columns a CDC source adds to each stream. They stay selected when a stream excludes columns:
# Airbyte rejects a field selection that drops the (source-defined) cursor.
CDC_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "postgres": ("_ab_cdc_lsn", "_ab_cdc_updated_at", "_ab_cdc_deleted_at"),
    "mongodb": ("_ab_cdc_cursor", "_ab_cdc_updated_at", "_ab_cdc_deleted_at"),
}


def lake_key(source: str, stream: str, extracted: dt.date, sync_id: int | str, part: int) -> str:
    """The object key a sync writes, so the embedded engine lands files exactly where Airbyte does."""
    return (
        f"{LAKE_PREFIX}/{source}/{stream}/extracted_date={extracted.isoformat()}/"
        f"{sync_id}-{part}.parquet"
    )


class CatalogError(PlatformError, ValueError):
    """The airbyte/ YAML is invalid; the message names the file and the field."""


class MissingEnvError(CatalogError):
    """A secret's environment variable is not set."""


class UnknownConnectionError(CatalogError):
    """No connection of that name in connections.yaml; the message lists the known ones."""


def require_env(env: Mapping[str, str], variable: str, used_by: str) -> str:
    """The value of a secret's variable; unset or empty is an error naming it and its user."""
    value = env.get(variable)
    if not value:
        raise MissingEnvError(f"environment variable {variable} is not set (needed by {used_by})")
    return value


# --- models ---------------------------------------------------------------------------------

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", max_length=63)]
FieldName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=63)]
EnvVar = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]*$")]
PgIdentifier = Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_]*$", max_length=63)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SyncMode(StrEnum):
    """How a stream is read (incremental / full refresh) and written (dedup / append / overwrite)."""

    INCREMENTAL_APPEND_DEDUPED = "incremental_append_deduped"
    INCREMENTAL_APPEND = "incremental_append"
    FULL_REFRESH_OVERWRITE = "full_refresh_overwrite"
    FULL_REFRESH_APPEND = "full_refresh_append"

    @property
    def incremental(self) -> bool:
        return self.value.startswith("incremental")

    @property
    def deduped(self) -> bool:
        return self is SyncMode.INCREMENTAL_APPEND_DEDUPED

    @property
    def destination_sync_mode(self) -> Literal["append_dedup", "append", "overwrite"]:
        """The Airbyte protocol's destination half, for the embedded engine."""
        if self.deduped:
            return "append_dedup"
        return "overwrite" if self is SyncMode.FULL_REFRESH_OVERWRITE else "append"


class Stream(_Model):
    """One table or collection, with everything that decides how it syncs."""

    name: Name
    sync_mode: SyncMode
    primary_key: tuple[FieldName, ...] = ()
    cursor_field: FieldName | None = None
    exclude_columns: tuple[FieldName, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Stream:
        if self.sync_mode.deduped and not self.primary_key:
            raise ValueError(f"{self.sync_mode} needs a primary_key to merge on")
        if self.sync_mode.incremental and not self.cursor_field:
            raise ValueError(f"{self.sync_mode} needs a cursor_field")
        kept = {*self.primary_key, self.cursor_field}
        if clash := sorted(kept.intersection(self.exclude_columns)):
            raise ValueError(f"exclude_columns cannot drop the key or cursor: {clash}")
        return self


class StreamGroup(_Model):
    """The streams of one source, in its namespace (PostgreSQL schema / MongoDB database)."""

    namespace: FieldName
    streams: tuple[Stream, ...] = Field(min_length=1)

    @field_validator("streams")
    @classmethod
    def _unique(cls, streams: tuple[Stream, ...]) -> tuple[Stream, ...]:
        _reject_duplicates(s.name for s in streams)
        return streams

    def stream(self, name: str) -> Stream:
        return next(s for s in self.streams if s.name == name)


class Workspace(_Model):
    server_url_env: EnvVar
    workspace_id_env: EnvVar
    client_id_env: EnvVar
    client_secret_env: EnvVar


class PostgresCdc(_Model):
    plugin: Literal["pgoutput"] = "pgoutput"
    replication_slot: PgIdentifier
    publication: PgIdentifier


class PostgresSource(_Model):
    kind: Literal["postgres"]
    name: Name
    host: str = Field(min_length=1)
    port: int = Field(5432, ge=1, le=65535)
    database: PgIdentifier
    username: str = Field(min_length=1)
    password_env: EnvVar
    # TLS in transit is a platform requirement: no disable/allow/prefer.
    ssl_mode: Literal["require", "verify-ca", "verify-full"] = "require"
    ca_certificate_env: EnvVar | None = None
    cdc: PostgresCdc

    @model_validator(mode="after")
    def _ca_for_verify(self) -> PostgresSource:
        if self.ssl_mode != "require" and not self.ca_certificate_env:
            raise ValueError(f"ssl_mode {self.ssl_mode} needs ca_certificate_env")
        return self


class MongoSource(_Model):
    kind: Literal["mongodb"]
    name: Name
    connection_string: str = Field(pattern=r"^mongodb(\+srv)?://")
    cluster: Literal["self_managed", "atlas"] = "self_managed"
    username: str = Field(min_length=1)
    password_env: EnvVar
    auth_source: str = "admin"

    @field_validator("connection_string")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        if "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("no credentials in the URI: use username and password_env")
        return value


Source = Annotated[PostgresSource | MongoSource, Field(discriminator="kind")]


class SnowflakeDestination(_Model):
    kind: Literal["snowflake"]
    name: Name
    host: str = Field(min_length=1)
    role: str = Field(min_length=1)
    warehouse: str = Field(min_length=1)
    database: str = Field(min_length=1)
    schema_: str = Field(alias="schema", min_length=1)
    username: str = Field(min_length=1)
    private_key_env: EnvVar | None = None
    private_key_password_env: EnvVar | None = None
    password_env: EnvVar | None = None
    cdc_deletion_mode: Literal["hard_delete", "soft_delete"] = "hard_delete"

    @model_validator(mode="after")
    def _one_auth(self) -> SnowflakeDestination:
        if (self.private_key_env is None) == (self.password_env is None):
            raise ValueError("set exactly one of private_key_env (key pair) or password_env")
        return self


class S3Destination(_Model):
    kind: Literal["s3"]
    name: Name
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    region: str = Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
    endpoint: str | None = None  # MinIO or another S3-compatible store
    role_arn: str | None = None
    access_key_id_env: EnvVar | None = None
    secret_access_key_env: EnvVar | None = None
    compression: Literal["SNAPPY", "ZSTD", "GZIP", "UNCOMPRESSED"] = "SNAPPY"

    @model_validator(mode="after")
    def _key_pair(self) -> S3Destination:
        if (self.access_key_id_env is None) != (self.secret_access_key_env is None):
            raise ValueError("set both access_key_id_env and secret_access_key_env, or neither")
        return self


Destination = Annotated[SnowflakeDestination | S3Destination, Field(discriminator="kind")]


class CronSchedule(_Model):
    """A Quartz cron in UTC, checked the way Airbyte's public API checks it."""

    cron: str

    @field_validator("cron")
    @classmethod
    def _quartz(cls, value: str) -> str:
        fields = value.removesuffix("UTC").split()
        if len(fields) not in (6, 7):
            raise ValueError(
                "Quartz cron has 6 or 7 fields: sec min hour day-of-month month day-of-week [year]"
            )
        if not (fields[0].isdigit() and fields[1].isdigit()):
            raise ValueError("seconds and minutes must be numbers (Airbyte runs at most hourly)")
        if (fields[3] == "?") == (fields[5] == "?"):
            raise ValueError("exactly one of day-of-month and day-of-week must be '?'")
        return value


class Connection(_Model):
    name: Name
    source: Name
    destination: Name
    streams: tuple[Name, ...] | None = None  # a subset of the source's catalog streams; None = all
    namespace: str = Field(min_length=1)
    prefix: str = Field("", pattern=r"^[A-Za-z0-9_]*$")
    schedule: Literal["manual"] | CronSchedule
    status: Literal["active", "inactive"] = "active"
    schema_changes: Literal[
        "ignore", "disable_connection", "propagate_columns", "propagate_fully"
    ] = "ignore"

    @field_validator("streams")
    @classmethod
    def _unique(cls, streams: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if streams is not None:
            _reject_duplicates(streams)
        return streams


class _CatalogFile(_Model):
    version: Literal[1]


class _SourcesFile(_Model):
    sources: tuple[Source, ...]


class _DestinationsFile(_Model):
    destinations: tuple[Destination, ...]


class _ConnectionsFile(_Model):
    connections: tuple[Connection, ...]


class _WorkspaceFile(_Model):
    workspace: Workspace


def _reject_duplicates(names: Any) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{name!r} appears twice")
        seen.add(name)


@dataclass(frozen=True)
class Catalog:
    """Everything in airbyte/, cross-checked. ``fields`` maps source -> stream -> its columns."""

    root: Path
    workspace: Workspace
    streams: Mapping[str, StreamGroup]
    sources: tuple[PostgresSource | MongoSource, ...]
    destinations: tuple[SnowflakeDestination | S3Destination, ...]
    connections: tuple[Connection, ...]
    fields: Mapping[str, Mapping[str, tuple[str, ...]]]

    def source(self, name: str) -> PostgresSource | MongoSource:
        return next(s for s in self.sources if s.name == name)

    def destination(self, name: str) -> SnowflakeDestination | S3Destination:
        return next(d for d in self.destinations if d.name == name)

    def resolve(self, name: str) -> ResolvedConnection:
        """The connection named ``name`` with its source, destination and streams: the one lookup
        of a sync, whose result the engine, its writer and their callers pass on."""
        connection = next((c for c in self.connections if c.name == name), None)
        if connection is None:
            known = ", ".join(c.name for c in self.connections)
            raise UnknownConnectionError(f"unknown connection {name!r}; known: {known}")
        streams = self.streams[connection.source].streams
        if connection.streams is not None:
            wanted = set(connection.streams)
            streams = tuple(s for s in streams if s.name in wanted)
        return ResolvedConnection(
            connection=connection,
            source=self.source(connection.source),
            destination=self.destination(connection.destination),
            streams=streams,
        )

    def selected_fields(self, source: str, stream: Stream) -> tuple[str, ...] | None:
        """The columns to sync when the stream excludes some; None means all of them."""
        if not stream.exclude_columns:
            return None
        kept = [c for c in self.fields[source][stream.name] if c not in stream.exclude_columns]
        return (*kept, *CDC_COLUMNS[self.source(source).kind])

    def publication_sql(self, source: str = "postgres") -> str:
        """The statements a DBA runs once so the CDC slot and publication match the catalog.

        ``publish_via_partition_root`` makes rows of Transaction's partitions arrive as
        ``transaction``, the stream the catalog declares.
        """
        pg = self.source(source)
        if not isinstance(pg, PostgresSource):
            raise CatalogError(f"{source} is not a PostgreSQL source")
        group = self.streams[source]
        tables = ", ".join(f"{group.namespace}.{s.name}" for s in group.streams)
        return (
            f"CREATE PUBLICATION {pg.cdc.publication} FOR TABLE {tables}\n"
            "    WITH (publish_via_partition_root = true);\n"
            f"SELECT pg_create_logical_replication_slot('{pg.cdc.replication_slot}', "
            f"'{pg.cdc.plugin}');\n"
        )


@dataclass(frozen=True)
class ResolvedConnection:
    """A connection of the catalog with everything a sync of it needs, looked up once
    (:meth:`Catalog.resolve`)."""

    connection: Connection
    source: PostgresSource | MongoSource
    destination: SnowflakeDestination | S3Destination
    streams: tuple[Stream, ...]
    """The catalog streams it syncs, in catalog order."""

    @property
    def name(self) -> str:
        return self.connection.name

    @property
    def incremental(self) -> tuple[Stream, ...]:
        return tuple(s for s in self.streams if s.sync_mode.incremental)

    def stream(self, name: str) -> Stream:
        return next(s for s in self.streams if s.name == name)

    @property
    def to_lake(self) -> bool:
        """Whether it writes the lake (an S3 destination), not a warehouse's raw layer."""
        return isinstance(self.destination, S3Destination)

    @property
    def state_key(self) -> str:
        """Where each destination keeps this connection's sync state (slot, positions, cursors)."""
        return f"connection:{self.connection.name}"

    @property
    def publication(self) -> str:
        return self._cdc.publication

    def slot(self, database: str) -> str:
        """The replication slot of this connection in the source ``database``: one per connection
        (each destination confirms its own position) and per database (slots are cluster-wide,
        and two databases of one cluster syncing the same connection, two environments or the
        benchmarks, must not take each other's). A name past PostgreSQL's 63 characters is cut
        and ends with a hash of the whole."""
        base = self._cdc.replication_slot
        slot = re.sub(r"[^a-z0-9_]", "_", f"{base}_{database}_{self.connection.name}".lower())
        if len(slot) > 63:
            slot = f"{slot[:54]}_{hashlib.sha256(slot.encode()).hexdigest()[:8]}"
        return slot

    @property
    def _cdc(self) -> PostgresCdc:
        if not isinstance(self.source, PostgresSource):
            raise CatalogError(
                f"connection {self.name}: source {self.source.name} is not PostgreSQL: it has no "
                "replication slot or publication"
            )
        return self.source.cdc


# --- what exists at the sources -------------------------------------------------------------

_DOLLAR_QUOTE = re.compile(r"\$[A-Za-z_]*\$")
_CREATE_TABLE = re.compile(
    r"\bCREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([\w.\"]+)\s*(\(|PARTITION\s+OF)",
    re.IGNORECASE,
)
_ALTER_COLUMN = re.compile(
    r"\bALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?([\w.\"]+)\s+(ADD|DROP)\s+(?:COLUMN\s+)?"
    r"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?([\w\"]+)",
    re.IGNORECASE,
)
_COLUMN_COMMENT = re.compile(
    r"\bCOMMENT\s+ON\s+COLUMN\s+([\w.\"]+)\.([\w\"]+)\s+IS\s+'((?:[^']|'')*)'", re.IGNORECASE
)
_LABEL = re.compile(r"^([A-Za-z]+):")
_NOT_COLUMNS = {"PRIMARY", "UNIQUE", "CHECK", "CONSTRAINT", "FOREIGN", "EXCLUDE", "LIKE"}


def _strip_sql(text: str) -> str:
    """SQL without comments and with dollar-quoted bodies emptied; string literals kept."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif text[i] == "'":
            end = i + 1
            while (end := text.find("'", end)) >= 0 and text.startswith("''", end):
                end += 2
            end = n if end < 0 else end + 1
            out.append(text[i:end])
            i = end
        elif match := _DOLLAR_QUOTE.match(text, i):
            end = text.find(match[0], match.end())
            out.append("''")
            i = n if end < 0 else end + len(match[0])
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _top_level_items(text: str, start: int) -> list[str]:
    """The comma-separated items of the parenthesised list opening at ``text[start]``."""
    items, depth, i, begin = [], 0, start, start + 1
    while i < len(text):
        char = text[i]
        if char == "'":
            i = text.index("'", i + 1)
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                items.append(text[begin:i])
                return [item.strip() for item in items if item.strip()]
        elif char == "," and depth == 1:
            items.append(text[begin:i])
            begin = i + 1
        i += 1
    raise CatalogError("unbalanced parentheses in a CREATE TABLE statement")


def _identifier(raw: str) -> str:
    return raw[1:-1] if raw.startswith('"') else raw.lower()


def _public_table(raw: str) -> str | None:
    schema, _, table = raw.rpartition(".")
    if schema and _identifier(schema) != "public":
        return None
    return _identifier(table)


def _oltp_scripts(sql_dir: Path) -> list[str]:
    from stripe_platform.oltp.migrate import discover  # the migrations' own ordering rules

    return [_strip_sql(m.sql) for m in discover(sql_dir)]


def oltp_columns(sql_dir: Path = SQL_OLTP_DIR) -> dict[str, tuple[str, ...]]:
    """Tables of the public schema and their columns, as the migrations leave them."""
    tables: dict[str, list[str]] = {}
    for script in _oltp_scripts(sql_dir):
        for match in _CREATE_TABLE.finditer(script):
            table = _public_table(match[1])
            if table is None or match[2] != "(":  # other schemas, partitions
                continue
            tables[table] = [
                _identifier(item.split()[0])
                for item in _top_level_items(script, match.start(2))
                if item.split()[0].upper() not in _NOT_COLUMNS
            ]
        for match in _ALTER_COLUMN.finditer(script):
            table, column = _public_table(match[1]), _identifier(match[3])
            if table not in tables or column.upper() in _NOT_COLUMNS:
                continue
            if match[2].upper() == "ADD":
                tables[table].append(column)
            elif column in tables[table]:
                tables[table].remove(column)
    return {table: tuple(columns) for table, columns in tables.items()}


def oltp_column_comments(sql_dir: Path = SQL_OLTP_DIR) -> dict[tuple[str, str], tuple[str, Path]]:
    """(table, column) -> (its comment, the migration that set it last), public tables only."""
    from stripe_platform.oltp.migrate import discover

    comments = {}
    for migration in discover(sql_dir):
        for match in _COLUMN_COMMENT.finditer(_strip_sql(migration.sql)):
            table = _public_table(match[1])
            if table is not None:
                comments[(table, _identifier(match[2]))] = (
                    match[3].replace("''", "'"),
                    migration.path,
                )
    return comments


def oltp_column_labels(sql_dir: Path = SQL_OLTP_DIR) -> dict[tuple[str, str], str]:
    """(table, column) -> classification label (PII, PCI, QUASI, SECRET, NONE) from the
    migrations' column comments; governance/classification.py maps them to classes."""
    return {
        key: label[1].upper()
        for key, (text, _) in oltp_column_comments(sql_dir).items()
        if (label := _LABEL.match(text))
    }


def document_fields(mongo_dir: Path = MONGO_DIR) -> dict[str, tuple[str, ...]]:
    """Collections and their top-level fields (``_id`` plus the validator's properties)."""
    from stripe_platform.docstore.specs import load_specs  # the specs' own format rules

    fields = {}
    for spec in load_specs(mongo_dir / "collections"):
        properties = spec.validator.get("$jsonSchema", {}).get("properties", {})
        fields[spec.collection] = ("_id", *properties)
    return fields


# --- loading --------------------------------------------------------------------------------


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: invalid YAML: {exc}") from None


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(top level)"


def _validate(model: Any, data: Any, path: Path) -> Any:
    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as exc:
        problems = [f"  {_location(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise CatalogError(f"{path}: invalid\n" + "\n".join(problems)) from None


def _check_streams(
    file: Path,
    streams: Mapping[str, StreamGroup],
    sources: tuple[PostgresSource | MongoSource, ...],
    sql_dir: Path,
    mongo_dir: Path,
    problems: list[str],
) -> dict[str, dict[str, tuple[str, ...]]]:
    """Every stream names a real table or collection, and real fields; returns those fields."""
    existing = {
        "postgres": lambda: oltp_columns(sql_dir),
        "mongodb": lambda: document_fields(mongo_dir),
    }
    what = {"postgres": "sql/oltp table", "mongodb": "mongo/collections spec"}
    for name in streams.keys() - {s.name for s in sources}:
        problems.append(f"{file}: {name}: no source of that name in sources.yaml")
    fields: dict[str, dict[str, tuple[str, ...]]] = {}
    for source in sources:
        if source.name not in streams:
            problems.append(f"{file}: no streams for source {source.name!r}")
            continue
        known = existing[source.kind]()
        fields[source.name] = {}
        for i, stream in enumerate(streams[source.name].streams):
            where = f"{file}: {source.name}.streams[{i}]"
            if stream.name not in known:
                problems.append(f"{where}.name: {stream.name!r} has no {what[source.kind]}")
                continue
            fields[source.name][stream.name] = known[stream.name]
            named = {
                "primary_key": stream.primary_key,
                "cursor_field": (stream.cursor_field,) if stream.cursor_field else (),
                "exclude_columns": stream.exclude_columns,
            }
            for attribute, columns in named.items():
                problems += [
                    f"{where}.{attribute}: {stream.name} has no field {column!r}"
                    for column in columns
                    if column not in known[stream.name]
                ]
    return fields


def _check_connections(
    file: Path,
    connections: tuple[Connection, ...],
    streams: Mapping[str, StreamGroup],
    sources: tuple[PostgresSource | MongoSource, ...],
    destinations: tuple[SnowflakeDestination | S3Destination, ...],
    problems: list[str],
) -> None:
    """Connections name existing sources, destinations and catalog streams."""
    for i, connection in enumerate(connections):
        where = f"{file}: connections[{i}]"
        if connection.source not in {s.name for s in sources}:
            problems.append(f"{where}.source: no source named {connection.source!r}")
        if connection.destination not in {d.name for d in destinations}:
            problems.append(f"{where}.destination: no destination named {connection.destination!r}")
        group = streams.get(connection.source)
        declared = {s.name for s in group.streams} if group else set()
        problems += [
            f"{where}.streams[{j}]: {name!r} is not a catalog stream of {connection.source!r}"
            for j, name in enumerate(connection.streams or ())
            if name not in declared
        ]


def load_catalog(
    path: Path = AIRBYTE_DIR, *, sql_dir: Path = SQL_OLTP_DIR, mongo_dir: Path = MONGO_DIR
) -> Catalog:
    """Load and cross-check the airbyte/ directory; every problem found is in the one error."""
    workspace = _validate(_WorkspaceFile, _read(path / "workspace.yaml"), path / "workspace.yaml")
    catalog_path = path / "catalog.yaml"
    raw_catalog = _read(catalog_path)
    if not isinstance(raw_catalog, dict):
        raise CatalogError(f"{catalog_path}: invalid\n  (top level): expected a mapping")
    groups = {k: v for k, v in raw_catalog.items() if k != "version"}
    _validate(_CatalogFile, {"version": raw_catalog.get("version")}, catalog_path)
    streams = _validate(dict[Name, StreamGroup], groups, catalog_path)
    sources = _validate(_SourcesFile, _read(path / "sources.yaml"), path / "sources.yaml").sources
    destinations = _validate(
        _DestinationsFile, _read(path / "destinations.yaml"), path / "destinations.yaml"
    ).destinations
    connections = _validate(
        _ConnectionsFile, _read(path / "connections.yaml"), path / "connections.yaml"
    ).connections

    problems: list[str] = []
    for file, names in (
        ("sources.yaml", [s.name for s in sources]),
        ("destinations.yaml", [d.name for d in destinations]),
        ("connections.yaml", [c.name for c in connections]),
    ):
        try:
            _reject_duplicates(names)
        except ValueError as exc:
            problems.append(f"{path / file}: name {exc}")
    fields = _check_streams(catalog_path, streams, sources, sql_dir, mongo_dir, problems)
    _check_connections(
        path / "connections.yaml", connections, streams, sources, destinations, problems
    )
    if problems:
        raise CatalogError("invalid airbyte catalog:\n" + "\n".join(problems))
    return Catalog(
        root=path,
        workspace=workspace.workspace,
        streams=streams,
        sources=sources,
        destinations=destinations,
        connections=connections,
        fields=fields,
    )
