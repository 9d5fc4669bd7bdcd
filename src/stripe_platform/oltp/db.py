"""The one place that knows how to reach the OLTP database on each profile."""

from __future__ import annotations

import io

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from stripe_platform.config import Settings
from stripe_platform.runtime.postgres import EmbeddedPostgres
from stripe_platform.security.keys import pii_key


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


def conninfo(
    settings: Settings, *, database: str | None = None, with_key: bool = True, **extra: str
) -> str:
    """libpq connection string for the active profile.

    The PII key travels in the startup packet (``-c stripe.pii_key=...``): startup options are
    never written to the statement log, unlike SET statements or bind parameters.
    """
    if settings.profile == "embedded":
        base = conninfo_to_dict(embedded_cluster(settings).conninfo(database))
    else:
        assert settings.pg_dsn is not None  # guaranteed by Settings validation
        base = conninfo_to_dict(settings.pg_dsn.get_secret_value())
        if database:
            base["dbname"] = database
    if with_key:
        option = f"-c stripe.pii_key={_escape_option(pii_key(settings))}"
        base["options"] = f"{base.get('options', '')} {option}".strip()
    base.update(extra)
    return make_conninfo(**base)


def connect(
    settings: Settings, *, database: str | None = None, autocommit: bool = False, **extra: str
) -> psycopg.Connection:
    return psycopg.connect(conninfo(settings, database=database, **extra), autocommit=autocommit)


COPY_CHUNK_ROWS = 65_536  # rows per CSV chunk handed to COPY: bounds the memory of one write


def _copy_ready(table: pa.Table) -> pa.Table:
    """Columns as PostgreSQL's CSV input reads them, whatever the session's time zone."""
    for i, column in enumerate(table.columns):
        name = table.field(i).name
        if pa.types.is_timestamp(column.type) and column.type.tz is not None:
            # Explicit offset; strftime is ~10x faster than pyarrow's own zoned formatting.
            table = table.set_column(i, name, pc.strftime(column, format="%Y-%m-%d %H:%M:%S%z"))
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
