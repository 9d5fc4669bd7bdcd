"""The Debezium PostgreSQL connector's configuration: the ONE place it is rendered, from Settings.

Every runtime registers what :func:`connector_config` returns with Kafka Connect's REST API: the
embedded stack of the test suite and ``stripe-platform kafka up`` (``runtime/kafka.py``), and the
``connect`` service of docker-compose.yml (through the same command). What it fixes, and why:

- ``plugin.name=pgoutput``: PostgreSQL's built-in decoder (the default, decoderbufs, is an
  extension the server does not have).
- The platform's own publication (:data:`PUBLICATION`, over ``streaming.changes.TABLES``, created
  by :func:`ensure_publication` with ``cdc.ensure_publication``: all actions, partitioned tables
  published under their root, so ``transaction_y2026m01`` arrives as ``transaction``, as for the
  embedded source); ``publication.autocreate.mode=disabled``: creating a publication needs a login
  that owns the tables, which the connector's has no reason to be.
- A slot per database (:func:`slot_name`): slots are cluster-wide names, and a connector follows
  one database.
- ``snapshot.mode=no_data``: the stream scores payments made from now on; the ones already in the
  database were scored by the batch path (``ml score``). (``never`` is the older, deprecated
  spelling of the same.)
- ``decimal.handling.mode=string`` (amounts as exact strings: "12.30"), ``time.precision.mode=
  isostring`` (every temporal value an ISO-8601 string; ``timestamptz`` columns, all of the stream's
  timestamps, are ISO-8601 strings in UTC in any mode, with microseconds:
  ``2026-03-04T05:06:07.891000Z``). Ids are JSON numbers.
- Topics ``<topic prefix>.public.<table>`` with :data:`PARTITIONS` partitions (made up front by
  ``runtime.kafka.attach``, else by Connect's topic creation; replication factor 1 on one broker)
  and keyed by customer for
  payments (``message.key.columns``): one customer's payments land in one partition, in commit
  order, so window state stays local to the consumer that owns the partition.
- A heartbeat every ``heartbeat_ms`` that also writes a row of :data:`HEARTBEAT_TABLE` (in the
  publication, not in the topics): PostgreSQL 15's pgoutput sends nothing for transactions that
  touch no published table, so without a published write Debezium would never see a newer
  position while the followed tables are idle and the slot would hold all the WAL written
  meanwhile (measured: a heartbeat alone does not move it).
- JSON without embedded schemas: values are the envelope itself (``before``, ``after``,
  ``source.lsn``, ``op`` c/u/d/r, ``ts_ms``), keys ``{"customerid": ...}``. A delete is followed
  by a null tombstone.
- TLS to PostgreSQL verified against the CA given (``sslmode=verify-full``; a connection string
  asking for less is refused).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from stripe_platform.config import Settings
from stripe_platform.ingestion.postgres.cdc import TableRef
from stripe_platform.ingestion.postgres.cdc import ensure_publication as _ensure_publication
from stripe_platform.streaming.changes import TABLES

CONNECTOR_CLASS: Final = "io.debezium.connector.postgresql.PostgresConnector"
PUBLICATION: Final = "stripe_debezium"
SCHEMA: Final = "public"
PARTITIONS: Final = 4
HEARTBEAT_MS: Final = 10_000
HEARTBEAT_TOPIC_PREFIX: Final = "__debezium-heartbeat"
HEARTBEAT_TABLE: Final = ("debezium", "heartbeat")
"""One row per slot, rewritten at each heartbeat (``heartbeat.action.query``)."""
KEY_COLUMNS: Final = {"transaction": "customerid"}
"""Message keys other than the primary key: payments are keyed (and so partitioned) by customer."""
JSON_CONVERTER: Final = "org.apache.kafka.connect.json.JsonConverter"


def topic(settings: Settings, table: str) -> str:
    """The topic Debezium writes ``table``'s changes to."""
    return f"{settings.kafka_topic_prefix}.{SCHEMA}.{table}"


def topics(settings: Settings) -> dict[str, str]:
    """Table -> topic, for every table the stream follows."""
    return {table: topic(settings, table) for table in TABLES}


def heartbeat_topic(settings: Settings) -> str:
    return f"{HEARTBEAT_TOPIC_PREFIX}.{settings.kafka_topic_prefix}"


def dead_letter_topic(settings: Settings) -> str:
    """Where a consumer puts a message it cannot decode (the Kafka source's poison messages)."""
    return f"{settings.kafka_topic_prefix}.dlq"


def _identifier(value: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", value.lower())


def slot_name(database: str) -> str:
    """Debezium's replication slot for ``database`` (slot names are unique in the cluster)."""
    return f"debezium_{_identifier(database)}"[:63]


def connector_name(settings: Settings, database: str) -> str:
    return f"stripe-postgres-{settings.kafka_topic_prefix}-{_identifier(database)}"


def ensure_publication(conn: psycopg.Connection, login: str | None = None) -> list[TableRef]:
    """The publication the connector reads in ``conn``'s database: the stream's tables and the
    heartbeat table (created here; ``login``, the connector's role, may write it)."""
    schema, table = (sql.Identifier(part) for part in HEARTBEAT_TABLE)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.{} (slot text PRIMARY KEY, beat timestamptz NOT NULL)"
        ).format(schema, table)
    )
    if login:
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, sql.Identifier(login))
        )
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE ON {}.{} TO {}").format(
                schema, table, sql.Identifier(login)
            )
        )
    return _ensure_publication(conn, PUBLICATION, [*TABLES, HEARTBEAT_TABLE])


def heartbeat_query(database: str) -> str:
    schema, table = HEARTBEAT_TABLE
    return (
        f"INSERT INTO {schema}.{table} (slot, beat) VALUES ('{slot_name(database)}', now()) "
        "ON CONFLICT (slot) DO UPDATE SET beat = EXCLUDED.beat"
    )


def connector_config(
    settings: Settings,
    conninfo: str,
    *,
    password: str | None = None,
    heartbeat_ms: int = HEARTBEAT_MS,
    partitions: int = PARTITIONS,
    replication_factor: int = 1,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The connector's configuration for the database ``conninfo`` names.

    ``conninfo`` is a libpq connection string (host, port, dbname, user, password, sslrootcert)
    as the Connect worker must see it; the login needs REPLICATION and SELECT on the tables.
    ``password`` replaces the conninfo's, e.g. with a Connect config-provider reference
    (``${file:/path:password}``) so the secret is not stored in the connector's configuration.
    ``extra`` overrides single keys (Connect validates the result before starting anything).
    """
    params = conninfo_to_dict(conninfo)
    missing = [key for key in ("host", "dbname", "user") if not params.get(key)]
    if missing:
        raise ValueError(f"the connection string for Debezium lacks {', '.join(missing)}")
    sslmode = str(params.get("sslmode") or "verify-full")
    if sslmode not in ("verify-full", "verify-ca"):
        raise ValueError(
            f"Debezium must reach PostgreSQL over verified TLS: the connection string says "
            f"sslmode={sslmode}; use sslmode=verify-full with sslrootcert=<the CA file>"
        )
    database = str(params["dbname"])
    include = ",".join(f"{SCHEMA}.{table}" for table in TABLES)
    key_columns = ";".join(f"{SCHEMA}.{table}:{column}" for table, column in KEY_COLUMNS.items())
    config = {
        "connector.class": CONNECTOR_CLASS,
        "tasks.max": "1",
        "database.hostname": str(params["host"]),
        "database.port": str(params.get("port") or 5432),
        "database.dbname": database,
        "database.user": str(params["user"]),
        "database.password": password if password is not None else str(params.get("password", "")),
        "database.sslmode": sslmode,
        "plugin.name": "pgoutput",
        "slot.name": slot_name(database),
        "publication.name": PUBLICATION,
        "publication.autocreate.mode": "disabled",
        "topic.prefix": settings.kafka_topic_prefix,
        "table.include.list": include,
        "message.key.columns": key_columns,
        "snapshot.mode": "no_data",
        "decimal.handling.mode": "string",
        "time.precision.mode": "isostring",
        "heartbeat.interval.ms": str(heartbeat_ms),
        "heartbeat.action.query": heartbeat_query(database),
        # Debezium waits this long for changes when its queue is empty: it bounds the idle
        # commit-to-Kafka delay (500 ms by default).
        "poll.interval.ms": "20",
        "topic.creation.default.partitions": str(partitions),
        "topic.creation.default.replication.factor": str(replication_factor),
        "key.converter": JSON_CONVERTER,
        "key.converter.schemas.enable": "false",
        "value.converter": JSON_CONVERTER,
        "value.converter.schemas.enable": "false",
    }
    if params.get("sslrootcert"):
        config["database.sslrootcert"] = str(params["sslrootcert"])
    config.update(extra or {})
    return config
