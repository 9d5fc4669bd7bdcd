"""`access snowflake-sql`: the Snowflake statements of the access policy, for review (issue 21).

Permifrost-style: every role, grant, user (with its expiry) and masking-policy body the policy asks
of a Snowflake account, whatever the account holds now (each statement is idempotent). No
connection is made: the statements are rendered from the policy and the settings' database and
warehouse names. `access plan` with warehouse=snowflake keeps only those not already true.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from stripe_platform.cli.access import access_app
from stripe_platform.cli.common import command, console, settings


@command(access_app, "snowflake-sql")
def snowflake_sql(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout")] = False,
    policy_file: Annotated[
        Path | None, typer.Option("--policy", help="Policy file (default: the settings')")
    ] = None,
    database: Annotated[
        str | None,
        typer.Option(help="Snowflake database (default: STRIPE_PLATFORM_SNOWFLAKE_DATABASE)"),
    ] = None,
    warehouse: Annotated[
        str | None,
        typer.Option(help="Snowflake warehouse the roles query with (default: the settings')"),
    ] = None,
) -> None:
    """The Snowflake SQL of the access policy: roles, grants, users with expiry, masking."""
    from stripe_platform.security.access_warehouse import snowflake_statements
    from stripe_platform.security.policy import load_policy

    s = settings()
    update = {
        key: value
        for key, value in (("snowflake_database", database), ("snowflake_warehouse", warehouse))
        if value
    }
    if update:
        s = s.model_copy(update=update)
    policy = load_policy(s, path=policy_file)
    changes = snowflake_statements(s, policy, dt.datetime.now(dt.UTC))
    if as_json:
        console.print_json(data=[c.public() for c in changes])
        return
    for change in changes:
        console.print(f"-- {change.reason}\n{change.statement};")
