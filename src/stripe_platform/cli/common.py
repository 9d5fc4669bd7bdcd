"""What every command shares: the two consoles, the `command` decorator that turns an expected
failure into one line and exit 1, command groups, and the settings."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import psycopg
import typer
from rich.console import Console
from rich.markup import escape

from stripe_platform.config import Settings, get_settings
from stripe_platform.errors import PlatformError

# Markup is off unless a call asks for it: text from users, the database or a validation rule
# ("^[a-z_][a-z0-9_]*$") would otherwise lose every "[...]" that looks like a style tag. A call
# that styles passes markup=True and escapes what it interpolates. Soft wrap: a long line (a path,
# a rule) is left for the terminal to wrap, never broken by a newline.
console = Console(markup=False, soft_wrap=True)
err = Console(stderr=True, markup=False, soft_wrap=True)

# Every expected failure of the platform is a PlatformError (errors.py). The one exception from a
# library is psycopg's OperationalError (a server refused, unreachable or gone away): any statement
# of any module can raise it, not only the connect of oltp/db.py, so translating it at one place
# would still leave the others.
EXPECTED_ERRORS = (PlatformError, psycopg.OperationalError)


def command(group: typer.Typer, name: str | None = None) -> Callable:
    """Register a command whose expected failures print one clear line and exit 1."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except EXPECTED_ERRORS as exc:
                err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True)
                raise typer.Exit(1) from None

        return group.command(name)(wrapper)

    return decorate


def group(help: str) -> typer.Typer:
    """A command group (`stripe-platform db ...`); registered with its name in cli/__init__.py."""
    return typer.Typer(help=help, no_args_is_help=True)


def settings() -> Settings:
    return get_settings()
