"""`access`: the access policy as code (issue 21, docs/access.md).

    access check                   validate the policy (exit 1 listing every problem as file:line)
    access plan [--target] [--json]     what differs from the policy (exit 2 when something does)
    access apply [--target] [--yes]     make it so (one-time passwords of new logins printed once)
    access expired [--json]        access still usable past its end date (exit 1 when any)
    access revoke-expired [--json] revoke it

Other modules register their commands on ``access_app`` (tokens, MFA, the access log, Snowflake SQL).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from stripe_platform.cli.common import command, console, err, group, settings

access_app = group(
    "Access control as code: the policy, its plan and apply, expiring grants, MFA, tokens, logs."
)

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]
PolicyOption = Annotated[
    Path | None, typer.Option("--policy", help="Policy file (default: the settings' access_policy)")
]
TargetOption = Annotated[
    list[str] | None,
    typer.Option("--target", help="postgres, warehouse or api (repeatable; default: all)"),
]
# `access plan` exit codes: 0 the stores match the policy, 2 they differ (1 is an error).
EXIT_DRIFT = 2


def _policy(policy_file: Path | None):
    from stripe_platform.security.policy import load_policy

    return load_policy(settings(), path=policy_file)


def _notes(targets: list[str] | None) -> list[str]:
    """Skipped targets, and `db grant-temporary` logins (outside the policy) when PostgreSQL is
    planned."""
    from stripe_platform.security.access import load_targets

    modules, notes = load_targets(targets)
    if any(m.NAME == "postgres" for m in modules):
        from stripe_platform.security.access_postgres import temporary_grants

        for user, role, until in temporary_grants(settings()):
            notes.append(
                f"postgres: {user} ({role}) is a temporary grant outside the policy (db "
                f"grant-temporary) until {until:%Y-%m-%d %H:%M} UTC: it expires on its own, "
                "`access expired` lists it afterwards"
            )
    return notes


def _changes_table(changes, title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for column in ("target", "action", "principal", "statement", "reason"):
        table.add_column(column, overflow="fold")
    for c in changes:
        table.add_row(c.target, c.action, c.principal, c.statement or c.object, c.reason)
    return table


@command(access_app, "check")
def access_check(policy_file: PolicyOption = None, as_json: JsonOption = False) -> None:
    """Validate the policy: roles, grants against the schema, users, dates (exit 1 on problems)."""
    from stripe_platform.security.policy import PolicyError, check_policy

    try:
        policy = _policy(policy_file)
    except PolicyError as exc:
        if as_json:
            lines = str(exc).splitlines()
            problems = [line.strip() for line in lines[1:]] or lines
            console.print_json(data={"ok": False, "problems": problems})
            raise typer.Exit(1) from None
        raise
    problems = check_policy(policy, dt.datetime.now(dt.UTC))
    if as_json:
        console.print_json(
            data={
                "ok": not problems,
                "policy": str(policy.source),
                "roles": sorted(policy.roles),
                "users": sorted(policy.users),
                "groups": {g: list(r) for g, r in policy.groups.items()},
                "problems": problems,
            }
        )
    else:
        table = Table(title=f"access policy {policy.source}")
        for column in ("role", "postgres rules", "warehouse", "clear", "api"):
            table.add_column(column, overflow="fold")
        for role in policy.roles.values():
            table.add_row(
                role.name,
                str(len(role.postgres)),
                ", ".join(role.warehouse),
                ", ".join(sorted(role.clear)),
                ", ".join(sorted(role.api)),
            )
        console.print(table)
        for user in policy.users.values():
            until = f" until {user.until:%Y-%m-%d %H:%M} UTC" if user.until else ""
            console.print(f"user {user.name}: {', '.join(user.roles)}{until}")
        for problem in problems:
            err.print(problem)
        if not problems:
            console.print("policy OK")
    if problems:
        raise typer.Exit(1)


@command(access_app, "plan")
def access_plan(
    target: TargetOption = None, policy_file: PolicyOption = None, as_json: JsonOption = False
) -> None:
    """What differs between the policy and the stores, as the statements apply would run.
    Exit 0: nothing differs; 2: something does."""
    from stripe_platform.security.access import load_targets, plan_all

    s = settings()
    policy = _policy(policy_file)
    changes = plan_all(s, policy, dt.datetime.now(dt.UTC), target)
    notes = _notes(target)
    # What enforces the policy where a store has no grants of its own (e.g. DuckDB): in words.
    modules, _ = load_targets(target)
    controls = {m.NAME: m.describe(s, policy) for m in modules if hasattr(m, "describe")}
    if as_json:
        console.print_json(
            data={"changes": [c.public() for c in changes], "notes": notes, "controls": controls}
        )
    else:
        for note in notes:
            err.print(f"note: {note}")
        for name, lines in controls.items():
            for line in lines:
                console.print(f"{name}: {escape(line)}")
        if changes:
            console.print(_changes_table(changes, f"access plan: {len(changes)} change(s)"))
        else:
            console.print("no drift: every target matches the policy")
    if changes:
        raise typer.Exit(EXIT_DRIFT)


@command(access_app, "apply")
def access_apply(
    target: TargetOption = None,
    policy_file: PolicyOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Apply without asking")] = False,
    as_json: JsonOption = False,
) -> None:
    """Make the stores match the policy (each target all or nothing). Refused, nothing applied,
    while the policy grants access whose end date passed. New logins' passwords are printed once."""
    from stripe_platform.security.access import apply_all, plan_all
    from stripe_platform.security.policy import PolicyError, check_policy

    s = settings()
    policy = _policy(policy_file)
    now = dt.datetime.now(dt.UTC)
    problems = check_policy(policy, now)
    if problems:
        raise PolicyError(
            "access apply refused, nothing applied: the policy grants access already ended\n  "
            + "\n  ".join(problems)
        )
    changes = plan_all(s, policy, now, target)
    if not changes:
        if as_json:
            console.print_json(data={"applied": [], "passwords": {}})
        else:
            console.print("nothing to apply: every target matches the policy")
        return
    if not yes:
        console.print(_changes_table(changes, f"access plan: {len(changes)} change(s)"))
        if not typer.confirm("apply these changes?"):
            raise typer.Exit(1)
    applied = apply_all(s, policy, now, target, changes=changes)
    passwords = {c.principal: c.secret for c in applied if c.secret}
    if as_json:
        console.print_json(data={"applied": [c.public() for c in applied], "passwords": passwords})
        return
    counts = Counter(c.target for c in applied)
    console.print(
        f"applied {len(applied)} change(s): "
        + ", ".join(f"{target} {n}" for target, n in sorted(counts.items()))
    )
    for user, password in passwords.items():
        console.print(f"password of new login {user} (shown once): {password}")


@command(access_app, "expired")
def access_expired(
    target: TargetOption = None, policy_file: PolicyOption = None, as_json: JsonOption = False
) -> None:
    """Access still usable past its end date, in every target (exit 1 when any)."""
    from stripe_platform.security.access import expired_all

    found = expired_all(settings(), _policy(policy_file), dt.datetime.now(dt.UTC), target)
    if as_json:
        console.print_json(data=[e.public() for e in found])
    elif found:
        table = Table(title=f"{len(found)} access(es) usable past their end date")
        for column in ("target", "principal", "ended", "still", "remedy"):
            table.add_column(column, overflow="fold")
        for e in found:
            table.add_row(
                e.target, e.principal, f"{e.ended_at:%Y-%m-%d %H:%M} UTC", e.still, e.remedy
            )
        console.print(table)
    else:
        console.print("no access is usable past its end date")
    if found:
        raise typer.Exit(1)


@command(access_app, "revoke-expired")
def access_revoke_expired(
    target: TargetOption = None, policy_file: PolicyOption = None, as_json: JsonOption = False
) -> None:
    """Revoke every access still usable past its end date."""
    from stripe_platform.security.access import revoke_expired_all

    revoked = revoke_expired_all(settings(), _policy(policy_file), dt.datetime.now(dt.UTC), target)
    if as_json:
        console.print_json(data=[e.public() for e in revoked])
    elif revoked:
        for e in revoked:
            console.print(f"{e.target}: {e.principal} (ended {e.ended_at:%Y-%m-%d}): {e.remedy}")
    else:
        console.print("nothing expired")
