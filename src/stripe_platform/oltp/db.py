"""The one place that knows how to reach the OLTP database on each profile."""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import SecretStr

from stripe_platform.config import Settings
from stripe_platform.runtime.postgres import EmbeddedPostgres
from stripe_platform.security.keys import pii_key

# The OLTP's encrypted columns (the catalog's PII/PCI bytea columns), by table: each table's data
# key is the scope postgres/<table>. tests/test_column_encryption.py checks this against the catalog.
ENCRYPTED_COLUMNS: dict[str, tuple[str, ...]] = {
    "customer": ("email", "fullname", "phone"),
    "address": ("line1",),
    "paymentinstrument": ("pan",),
}
LOOKUP_SCOPE = "postgres/customer"  # the e-mail's keyed hash (Customer.EmailHash)


def embedded_cluster(settings: Settings) -> EmbeddedPostgres:
    return EmbeddedPostgres(
        settings.home_dir,
        port=settings.pg_port,
        database=settings.pg_database,
        fsync=settings.pg_fsync,
        os_user=settings.pg_os_user,
    )


def _escape_option(value: str) -> str:
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def _target(settings: Settings, database: str | None) -> Settings:
    """The settings of ``database`` (the database whose ``keys`` schema holds its data keys)."""
    if database is None:
        return settings
    if settings.pg_dsn is None:
        return settings.model_copy(update={"pg_database": database})
    dsn = make_conninfo(settings.pg_dsn.get_secret_value(), dbname=database)
    return settings.model_copy(update={"pg_dsn": SecretStr(dsn)})


def _legacy_key(settings: Settings) -> str | None:
    """The single PII key of before per-table keys, when this installation ever had one."""
    if settings.pii_key is None and not (settings.home_dir / "keys" / "pii.key").exists():
        return None
    return pii_key(settings)


@dataclass(frozen=True)
class _Keyring:
    generation: str | None
    options: str


_keyrings: dict[tuple[str, str | None], _Keyring] = {}  # (unkeyed conninfo, legacy key) ->
_keyrings_lock = threading.Lock()


def _generation(conn: psycopg.Connection) -> str | None:
    """The database's key generation (sql/oltp/0013); None before that migration."""
    (ready,) = conn.execute(
        "SELECT to_regprocedure('pii_keyring_generation()') IS NOT NULL"
    ).fetchone()
    return conn.execute("SELECT pii_keyring_generation()").fetchone()[0] if ready else None


def _session_key_options(settings: Settings, database: str | None) -> _Keyring:
    """The ``-c`` options of a keyed session on ``database``: every usable version of each
    postgres/<table> data key, the current version per scope, the lookup key (sql/oltp/0013), and
    the legacy single key until the re-encryption retired it. A database without the keys schema
    (before migration 0013, or the maintenance database) gets the legacy key alone, if any.

    Cached per process and database, with the database's key generation they were read at; the
    generation is read again by every keyed connect (see connect()), so a rotation or retirement
    is seen by the very next session.
    """
    from stripe_platform.security.envelope import shared_envelope

    plain = conninfo(settings, database=database, with_key=False)
    cache_key = (plain, _legacy_key(settings))
    with _keyrings_lock, psycopg.connect(plain, autocommit=True) as conn:
        generation = _generation(conn)
        cached = _keyrings.get(cache_key)
        if cached is not None and cached.generation == generation:
            return cached
        legacy = cache_key[1]
        options = []
        if generation is not None:
            envelope = shared_envelope(_target(settings, database))
            if cached is not None:  # the generation moved: what the envelope holds may be stale
                envelope.forget_cached()
            keys, current = [], []
            for table in ENCRYPTED_COLUMNS:
                scope = f"postgres/{table}"
                versions = envelope.all_versions(scope) or [envelope.data_key(scope)]
                keys += [
                    f"{scope}:{k.version}:{base64.b64encode(k.key).decode()}" for k in versions
                ]
                # Rotation makes the new version the highest; retirement never takes the current.
                current.append(f"{scope}:{max(k.version for k in versions)}")
            lookup = base64.b64encode(envelope.lookup_key(LOOKUP_SCOPE)).decode()
            options = [
                f"-c stripe.pii_keys={','.join(keys)}",
                f"-c stripe.pii_current={','.join(current)}",
                f"-c stripe.pii_lookup_key={lookup}",
            ]
            retired = "SELECT EXISTS (SELECT FROM keys.legacy_key_retired)"
            if legacy is not None and conn.execute(retired).fetchone()[0]:
                legacy = None
        if legacy is not None:
            options.append(f"-c stripe.pii_key={_escape_option(legacy)}")
        # The generation read before the keys: a change in between is caught by the next connect.
        _keyrings[cache_key] = _Keyring(generation, " ".join(options))
        return _keyrings[cache_key]


def _conninfo(settings: Settings, database: str | None, options: str, extra: dict) -> str:
    if settings.profile == "embedded":
        base = conninfo_to_dict(embedded_cluster(settings).conninfo(database))
    else:
        assert settings.pg_dsn is not None  # guaranteed by Settings validation
        base = conninfo_to_dict(settings.pg_dsn.get_secret_value())
        if database:
            base["dbname"] = database
    if options:
        base["options"] = f"{base.get('options', '')} {options}".strip()
    base.update(extra)
    return make_conninfo(**base)


def conninfo(
    settings: Settings, *, database: str | None = None, with_key: bool = True, **extra: str
) -> str:
    """libpq connection string for the active profile.

    A keyed connection (``with_key``) carries the data keys in its startup packet (``-c
    stripe.pii_keys=...``, see _session_key_options): startup options are never written to the
    statement log, unlike SET statements or bind parameters. The keys are read fresh (one
    unkeyed connection checks their generation); connect() does that check in the session itself.
    """
    options = _session_key_options(settings, database).options if with_key else ""
    return _conninfo(settings, database, options, extra)


def connect(
    settings: Settings,
    *,
    database: str | None = None,
    autocommit: bool = False,
    with_key: bool = True,
    **extra: str,
) -> psycopg.Connection:
    """A connection; keyed (the default) with this process's cached keys when the new session
    finds the database's key generation unchanged (one round trip), else with freshly read ones."""
    if with_key:
        cached = _keyrings.get(
            (conninfo(settings, database=database, with_key=False), _legacy_key(settings))
        )
        if cached is not None:
            conn = psycopg.connect(
                _conninfo(settings, database, cached.options, extra), autocommit=autocommit
            )
            try:
                fresh = _generation(conn) == cached.generation
                if not autocommit:
                    conn.rollback()  # leave it idle, as it came
            except BaseException:
                conn.close()
                raise
            if fresh:
                return conn
            conn.close()
    return psycopg.connect(
        conninfo(settings, database=database, with_key=with_key, **extra), autocommit=autocommit
    )


COPY_CHUNK_ROWS = 65_536  # rows per CSV chunk handed to COPY: bounds the memory of one write


def connect_to_table(
    settings: Settings,
    table: str,
    *,
    what: str,
    migration: int,
    error: type[Exception],
    rows: bool = True,
) -> psycopg.Connection:
    """A keyless autocommit connection to a database that has ``table`` (dict rows unless
    ``rows=False``), or ``error`` saying which migration makes it: one check for every part of
    the platform that keeps its state in its own table."""
    from psycopg.rows import dict_row

    conn = connect(settings, with_key=False, autocommit=True)
    (present,) = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    if not present:
        database = conn.info.dbname
        conn.close()
        raise error(
            f"database {database} has no {what} (migration {migration:04d}): run "
            "`stripe-platform db migrate` first"
        )
    if rows:
        conn.row_factory = dict_row
    return conn


def _copy_ready(table: pa.Table) -> pa.Table:
    """Columns as PostgreSQL's CSV input reads them, whatever the session's time zone."""
    for i, column in enumerate(table.columns):
        name = table.field(i).name
        if pa.types.is_timestamp(column.type) and column.type.tz is not None:
            # Explicit offset. Arrow holds zoned timestamps as UTC instants: the zone-less cast's
            # text is the UTC time, ~20x faster than strftime (which resolves the zone a value).
            utc = pc.cast(column.cast(pa.timestamp(column.type.unit)), pa.string())
            table = table.set_column(i, name, pc.binary_join_element_wise(utc, "+00", ""))
        elif pa.types.is_binary(column.type):
            # bytea's text input is hex (\x..); pyarrow would write raw bytes.
            hexed = [None if v is None else "\\x" + v.hex() for v in column.to_pylist()]
            table = table.set_column(i, name, pa.array(hexed, pa.string()))
    return table


def copy_arrow(conn: psycopg.Connection, target: str | sql.Composable, table: pa.Table) -> None:
    """COPY an Arrow table into ``target`` (its columns by name), as CSV written by pyarrow."""
    relation = sql.SQL(target) if isinstance(target, str) else target
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in table.column_names)
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(relation, columns)
    options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    with conn.cursor().copy(statement) as copy:
        for chunk in _copy_ready(table).to_batches(max_chunksize=COPY_CHUNK_ROWS):
            buffer = io.BytesIO()
            pacsv.write_csv(chunk, buffer, options)
            copy.write(buffer.getvalue())
