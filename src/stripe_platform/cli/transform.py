"""Transformation: `transform` (dbt build), the brief's OLAP queries, any dbt command."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from stripe_platform.cli.common import command, console, err, settings

commands = typer.Typer()  # merged into the top level


@command(commands)
def transform(
    select: Annotated[
        str | None, typer.Option(help="dbt node selection, e.g. 'tag:fraud' or 'FACT_Revenue+'")
    ] = None,
    full_refresh: Annotated[
        bool, typer.Option("--full-refresh", help="Rebuild incremental models from scratch")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON summary on stdout")] = False,
) -> None:
    """Build the star schema: one `dbt build` (seeds, snapshots, models, tests) on the warehouse."""
    from stripe_platform.transform.dbt import NodeResult, TransformError, build

    s = settings()
    colours = {"success": "green", "pass": "green", "error": "red", "fail": "red", "warn": "yellow"}

    def show(node: NodeResult) -> None:
        # One line per built node; tests only when they do not pass (the summary counts them).
        if as_json or (node.resource_type == "test" and node.status == "pass"):
            return
        colour = colours.get(node.status, "white")
        err.print(
            f"[{colour}]{escape(node.status):<7}[/{colour}] {escape(node.resource_type):<8} "
            f"{escape(node.name):<36} {node.seconds:6.2f}s",
            markup=True,
        )

    err.print(f"dbt build on the {s.warehouse_backend} warehouse...")
    summary = build(s, select=select, full_refresh=full_refresh, on_node=show)
    if as_json:
        console.print_json(data=summary.as_dict())
    else:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items()))
        console.print(f"dbt build ({summary.target}): {counts} in {summary.seconds:.1f}s")
        for node in summary.failures:
            console.print(
                f"[red]{escape(node.resource_type)} {escape(node.name)}[/red]: "
                f"{escape(str(node.message))}",
                markup=True,
            )
    if not summary.success:
        raise TransformError(f"dbt build failed: {len(summary.failures)} node(s) failed")
    if select and not summary.nodes:
        raise TransformError(f"--select {select!r} matched no seed, model, snapshot or test")


@command(commands)
def query(
    name: Annotated[str, typer.Argument(help="One of the brief's analytics queries")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run one of the brief's OLAP queries (dbt_project/analyses) on the marts and print it."""
    from rich.table import Table

    from stripe_platform.transform.analyses import run_analysis

    result = run_analysis(settings(), name)
    if as_json:
        console.print_json(
            data={
                "query": name,
                "columns": result.columns,
                "rows": [list(r) for r in result.rows],
                "seconds": result.seconds,
            },
            default=str,
        )
        return
    table = Table(
        *result.columns, title=f"{name} ({len(result.rows)} rows, {result.seconds * 1000:.0f} ms)"
    )
    for row in result.rows:
        table.add_row(*(str(v) for v in row))
    console.print(f"[cyan]{escape(result.sql)}[/cyan]", markup=True)
    console.print(table, soft_wrap=False)  # a table fits itself to the terminal


@commands.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def dbt(ctx: typer.Context) -> None:
    """Any dbt command on the platform's project and generated profile, e.g. `dbt docs generate`."""
    from stripe_platform.transform.dbt import run_dbt

    if not ctx.args:
        err.print("usage: stripe-platform dbt <dbt command> [args], e.g. dbt docs generate")
        raise typer.Exit(2)
    summary = run_dbt(settings(), *ctx.args)
    raise typer.Exit(0 if summary.success else 1)
