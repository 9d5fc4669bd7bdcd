"""The one place that knows how to reach the OLTP database on each profile."""

from __future__ import annotations

import psycopg
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
