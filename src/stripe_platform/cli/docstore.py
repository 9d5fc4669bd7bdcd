"""`mongo`: the document store's collection specs and the brief's document queries."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from stripe_platform.cli.common import command, console, group, settings
from stripe_platform.docstore.queries import QueryError

mongo_app = group("The document store: collection specs and the brief's queries.")


@command(mongo_app, "apply")
def mongo_apply(
    as_json: Annotated[
        bool, typer.Option("--json", help="The report per collection as JSON")
    ] = False,
) -> None:
    """Create the collections, validators, indexes and views of mongo/collections (and, on the
    embedded FerretDB, the indexes on its backend tables that keyed finds and updates use)."""
    from dataclasses import asdict

    from stripe_platform.docstore.client import connect
    from stripe_platform.docstore.specs import apply_specs

    reports = apply_specs(connect(settings()), settings())
    if as_json:
        console.print_json(data=[asdict(r) for r in reports])
        return
    for r in reports:
        made = "created" if r.created else "exists"
        console.print(
            f"{r.collection:<20} {made:<8} indexes +{len(r.indexes_created)}  "
            f"validator: {r.validator}" + (f"  views: {', '.join(r.views)}" if r.views else "")
        )
        if r.backend_indexes:
            backend = []
            for entry in r.backend_indexes:  # "field: index name"
                field, _, name = entry.partition(": ")
                backend.append(
                    f"{field} ({'created' if name in r.backend_indexes_created else 'present'})"
                )
            console.print(f"{'':<20} backend GIN indexes: {', '.join(backend)}")
        for warning in r.warnings:
            console.print(f"{'':<20} warning: {warning}")


@command(mongo_app, "query")
def mongo_query(
    name: Annotated[str, typer.Argument(help="A query in mongo/queries")],
    limit: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Run one of the brief's document queries and print the documents as JSON."""
    from bson import json_util

    from stripe_platform.docstore.client import connect
    from stripe_platform.docstore.queries import load_queries, run_query

    queries = load_queries()
    if name not in queries:
        raise QueryError(f"unknown query {name!r}; known: {', '.join(queries)}")
    results = run_query(connect(settings()), queries[name], limit=limit)
    console.print(f"[cyan]{escape(queries[name].shell)}[/cyan]", markup=True)
    console.print_json(json_util.dumps(results, json_options=json_util.RELAXED_JSON_OPTIONS))
