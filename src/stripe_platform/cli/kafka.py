"""`kafka`: the Debezium + Kafka path of the change stream. On the embedded profile, a Kafka broker
and Kafka Connect with the Debezium PostgreSQL connector beside the embedded cluster; elsewhere,
the connector registered with the Connect service (docker-compose.yml's `connect`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from stripe_platform.cli.common import command, console, group, settings
from stripe_platform.config import Settings
from stripe_platform.runtime.postgres import RuntimeErrorWithHint

kafka_app = group(
    "Debezium + Kafka: the broker, Kafka Connect and the PostgreSQL connector of the stream."
)

ConnectUrl = Annotated[
    str | None,
    typer.Option(
        "--connect-url",
        help="Kafka Connect's REST URL (compose/prod: the Connect service, e.g. "
        "https://connect:8083); the embedded profile runs its own",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON report on stdout")]


def _external(s: Settings, connect_url: str | None, verb: str) -> str:
    if connect_url is None:
        raise RuntimeErrorWithHint(
            f"the profile is {s.profile!r}: Kafka and Connect run as services there; "
            f"`kafka {verb}` needs their --connect-url"
        )
    return connect_url


@command(kafka_app)
def up(
    connect_url: ConnectUrl = None,
    heartbeat_ms: Annotated[
        int, typer.Option(min=100, help="Debezium's heartbeat interval (ms)")
    ] = 10_000,
    as_json: AsJson = False,
) -> None:
    """Start the broker and Kafka Connect (embedded profile; jars fetched by Maven on first use)
    and point the Debezium connector at the OLTP database; returns once its slot streams."""
    from stripe_platform.oltp.db import embedded_cluster
    from stripe_platform.runtime import kafka

    s = settings()
    if s.profile == "embedded" and connect_url is None:
        if not embedded_cluster(s).status().running:
            raise RuntimeErrorWithHint(
                "the embedded PostgreSQL is not running: run `stripe-platform up` first"
            )
        stack = kafka.embedded_stack(s)
        with console.status("starting the Kafka broker and Kafka Connect"):
            stack.up()
        with console.status("starting the Debezium connector"):
            attached = kafka.attach(s, stack, heartbeat_ms=heartbeat_ms)
        connect = stack.connect_url
    else:
        connect = _external(s, connect_url, "up")
        attached = kafka.attach(s, connect_url=connect, heartbeat_ms=heartbeat_ms)
    info: dict[str, Any] = {
        "bootstrap_servers": attached.bootstrap_servers,
        "connect_url": connect,
        "connector": attached.name,
        "database": attached.database,
        "slot": attached.slot,
        "topics": attached.topics,
        "heartbeat_topic": attached.heartbeat_topic,
        "dead_letter_topic": attached.dead_letter_topic,
    }
    if as_json:
        console.print_json(data=info)
        return
    console.print(f"Kafka broker   {info['bootstrap_servers']}")
    console.print(f"Kafka Connect  {connect}")
    console.print(
        f"connector      {attached.name}: database {attached.database}, slot {attached.slot}"
    )
    for table, topic in attached.topics.items():
        console.print(f"topic          {topic}  ({table})")


@command(kafka_app)
def down(
    connect_url: ConnectUrl = None,
    forget: Annotated[
        bool,
        typer.Option(
            "--forget",
            help="Also remove the connector and drop its replication slot (else the slot keeps "
            "the WAL written meanwhile, so the stream resumes where it stopped)",
        ),
    ] = False,
) -> None:
    """Stop Kafka Connect and the broker (embedded profile; topics and the connector's position
    are kept). Elsewhere, --forget removes the connector from the Connect service."""
    from stripe_platform.runtime import kafka

    s = settings()
    if s.profile == "embedded" and connect_url is None:
        stack = kafka.embedded_stack(s)
        if forget:
            kafka.detach(s, stack)
        console.print("Kafka stopped" if stack.down() else "Kafka was not running")
        if forget:
            stack.forget_positions()
            console.print("connector removed, its slot dropped and its position forgotten")
        return
    url = _external(s, connect_url, "down")
    if not forget:
        raise RuntimeErrorWithHint(
            "Kafka and Connect are services on this profile (docker compose stop); "
            "`kafka down --forget --connect-url URL` removes the connector and its slot"
        )
    removed = kafka.detach(s, connect_url=url)
    console.print(
        "connector removed, its slot dropped" if removed else "no connector; slot dropped"
    )


@command(kafka_app)
def status(connect_url: ConnectUrl = None, as_json: AsJson = False) -> None:
    """Say what runs: the broker, Connect and each connector's state."""
    from stripe_platform.runtime import kafka
    from stripe_platform.runtime.tls import ca_file

    s = settings()
    if s.profile == "embedded" and connect_url is None:
        info = kafka.embedded_stack(s).status().as_dict()
    else:
        url = _external(s, connect_url, "status")
        ca = ca_file(s)
        names = kafka.list_connectors(url, ca=ca)
        info = {
            "connect_url": url,
            "bootstrap_servers": s.kafka_bootstrap_servers,
            "connectors": {name: kafka.connector_state(url, name, ca=ca) for name in names},
        }
    if as_json:
        console.print_json(data=info)
        return
    if "broker_running" in info:
        broker = "running" if info["broker_running"] else "stopped"
        connect = "running" if info["connect_running"] else "stopped"
        console.print(f"broker   {broker}  {info['bootstrap_servers'] or ''}  ({info['versions']})")
        console.print(f"connect  {connect}  {info['connect_url'] or ''}")
    else:
        console.print(f"connect  {info['connect_url']}")
    for name, state in info["connectors"].items():
        tasks = ",".join(state["tasks"]) or "no task"
        line = f"connector {name}: {state['connector']} (tasks {tasks})"
        if state.get("trace"):
            line += f": {kafka.failure_cause(state['trace'])}"
        console.print(line)
