"""A real Kafka stack for the test session (a plugin of tests/conftest.py: a test asks for the
``kafka_stack`` fixture by name). Registered once in conftest, never imported into test modules:
pytest makes an imported fixture a separate one per module, which started a second stack.

``kafka_stack`` starts, once per session and only when a test asks for it, a Kafka 4.4 broker
(KRaft) and Kafka Connect standalone with the Debezium PostgreSQL connector, on free ports of
127.0.0.1, beside the session's PostgreSQL (tests/conftest.py ``settings``). Debezium follows one
database: the fixture makes a dedicated one, :data:`DATABASE` (a clone of the migrated template,
empty), and points a connector at it (snapshot.mode=no_data: only changes committed after the
start arrive). A test module seeds that database itself and consumes ``<prefix>.public.<table>``;
``kafka_stack.settings`` names the database, the brokers and the topic prefix, so the platform's
own code (``streaming.kafka.KafkaSource(kafka_stack.settings)``, ``streaming.scorer.run``) needs
nothing else. A module that wants a database of its own calls ``kafka_stack.follow(database,
prefix)`` (another connector, its own slot and topics) and ``kafka_stack.unfollow(...)`` after.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from psycopg import sql

from conftest import TEMPLATE_DB
from stripe_platform.config import Settings
from stripe_platform.oltp import db
from stripe_platform.runtime import kafka

DATABASE = "kafka_cdc"
PREFIX = "stripe"
HEARTBEAT_MS = 1_000  # tests watch the heartbeat topic move: once a second, not every 10 s


@dataclass
class Followed:
    """One database followed by a connector, and what its clients need."""

    settings: Settings
    """The session's settings with ``pg_database``, ``kafka_bootstrap_servers`` and
    ``kafka_topic_prefix`` of this database."""
    attached: kafka.Attached

    @property
    def database(self) -> str:
        return self.attached.database

    @property
    def bootstrap_servers(self) -> str:
        return self.attached.bootstrap_servers

    @property
    def topics(self) -> dict[str, str]:
        """Table (``transaction``, ``transactionstatechanges``) -> topic."""
        return self.attached.topics

    @property
    def heartbeat_topic(self) -> str:
        return self.attached.heartbeat_topic

    @property
    def dead_letter_topic(self) -> str:
        return self.attached.dead_letter_topic


@dataclass
class KafkaTestStack(Followed):
    """The session's stack, following :data:`DATABASE`."""

    stack: kafka.KafkaStack = field(default=None)  # type: ignore[assignment]
    base_settings: Settings = field(default=None)  # type: ignore[assignment]

    def follow(self, database: str, prefix: str, *, create: bool = True, **extra: str) -> Followed:
        """Point another connector at ``database`` (cloned from the template first when
        ``create``), writing to topics ``<prefix>.public.<table>``."""
        if create:
            _create_database(self.base_settings, database)
        s = self.base_settings.model_copy(
            update={"pg_database": database, "kafka_topic_prefix": prefix}
        )
        attached = kafka.attach(
            s, self.stack, database=database, heartbeat_ms=HEARTBEAT_MS, extra=extra or None
        )
        return Followed(
            s.model_copy(update={"kafka_bootstrap_servers": attached.bootstrap_servers}), attached
        )

    def unfollow(self, followed: Followed, *, drop: bool = True) -> None:
        """Remove its connector and slot (and the database, when ``drop``)."""
        kafka.detach(followed.settings, self.stack, followed.database)
        if drop:
            with db.connect(self.base_settings, database="postgres", autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(followed.database)
                    )
                )


def _create_database(settings: Settings, database: str) -> None:
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(database), sql.Identifier(TEMPLATE_DB)
            )
        )


@pytest.fixture(scope="session")
def kafka_stack(settings: Settings) -> Iterator[KafkaTestStack]:
    stack = kafka.KafkaStack(settings.home_dir)
    try:  # a failed start stops what did start: a leaked JVM holds ports and a gigabyte
        stack.up()
        _create_database(settings, DATABASE)
        s = settings.model_copy(update={"pg_database": DATABASE, "kafka_topic_prefix": PREFIX})
        attached = kafka.attach(s, stack, database=DATABASE, heartbeat_ms=HEARTBEAT_MS)
        yield KafkaTestStack(
            settings=s.model_copy(update={"kafka_bootstrap_servers": attached.bootstrap_servers}),
            attached=attached,
            stack=stack,
            base_settings=settings,
        )
    finally:
        stack.down()
