"""`catalog`: the data classification catalog (governance/): list it, gate it, scan real values."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.cli.common import command, console, err, settings
from stripe_platform.governance.classification import STORES, DataClass

catalog_app = typer.Typer(
    help="The data classification catalog: every column and field of every store.",
    invoke_without_command=True,
)

StoreOption = Annotated[
    str | None, typer.Option("--store", help=f"Only this store: {', '.join(STORES)}")
]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]


def _store(value: str | None) -> tuple[str, ...]:
    if value is None:
        return STORES
    if value not in STORES:
        raise typer.BadParameter(f"--store {value!r}: one of {', '.join(STORES)}")
    return (value,)


@catalog_app.callback()
def catalog_default(ctx: typer.Context) -> None:
    """Without a subcommand: the catalog (as `catalog list`)."""
    if ctx.invoked_subcommand is None:
        catalog_list(store=None, data_class=None, as_json=False)


@command(catalog_app, "list")
def catalog_list(
    store: StoreOption = None,
    data_class: Annotated[
        str | None,
        typer.Option("--class", help=f"Only this class: {', '.join(c.value for c in DataClass)}"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Every classified column and field, and a summary per store and class."""
    from stripe_platform.governance.classification import load_catalog

    if data_class is not None and data_class not in {c.value for c in DataClass}:
        known = ", ".join(c.value for c in DataClass)
        raise typer.BadParameter(f"--class {data_class!r}: one of {known}")
    catalog = load_catalog()
    stores = _store(store)
    entries = [
        e
        for e in catalog.entries
        if e.store in stores and (data_class is None or e.data_class == data_class)
    ]
    summary = {s: counts for s, counts in catalog.summary().items() if s in stores}
    if as_json:
        console.print_json(
            data={
                "entries": [asdict(e) for e in entries],
                "summary": summary,
                "problems": list(catalog.problems),
            }
        )
        return
    table = Table(title=f"Classification catalog ({len(entries)} fields)")
    for name in ("store", "dataset", "field", "class", "category", "subject"):
        table.add_column(name)
    for e in entries:
        table.add_row(e.store, e.dataset, e.field, e.data_class.value, e.category or "", e.subject)
    console.print(table)
    _print_summary(summary)
    if catalog.problems:
        err.print(f"{len(catalog.problems)} problem(s): run `stripe-platform catalog check`")


def _print_summary(summary: dict[str, dict[str, int]]) -> None:
    table = Table(title="Fields per store and class")
    table.add_column("store")
    for data_class in DataClass:
        table.add_column(data_class.value, justify="right")
    table.add_column("total", justify="right")
    for store, counts in summary.items():
        table.add_row(store, *(str(n) for n in counts.values()), str(sum(counts.values())))
    console.print(table)


@command(catalog_app, "check")
def catalog_check(
    root: Annotated[
        Path | None, typer.Option(help="A checkout to check (default: this repository)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """The CI gate: exit 1 on any column or field unclassified or of an unknown class.

    Also when a mart column is less sensitive than the source columns of its name.
    """
    from stripe_platform.governance.classification import load_catalog

    catalog = load_catalog(root) if root else load_catalog()
    if as_json:
        console.print_json(
            data={"entries": len(catalog.entries), "problems": list(catalog.problems)}
        )
        if catalog.problems:
            raise typer.Exit(1)
        return
    catalog.check()  # raises CatalogError listing the problems: exit 1 through `command`
    console.print(f"catalog ok: {len(catalog.entries)} columns and fields classified")


@command(catalog_app, "scan")
def catalog_scan(
    store: StoreOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Rows sampled per dataset")] = 1000,
    strict: Annotated[bool, typer.Option(help="Exit 1 when a value contradicts its class")] = False,
    as_json: JsonOption = False,
) -> None:
    """Sample real values and report those contradicting their declared class.

    Recognizers: e-mail, phone, IBAN (mod-97), card number (Luhn), IP address. Counts only: no
    sampled value is printed.
    """
    from stripe_platform.governance.scan import scan

    report = scan(settings(), stores=_store(store), limit=limit)
    if as_json:
        console.print_json(data=report.as_dict())
    else:
        for line in report.skipped:
            err.print(f"skipped: {line}")
        if report.findings:
            table = Table(title="Scan findings")
            for name in ("level", "store", "dataset", "field", "declared", "found", "matches"):
                table.add_column(name)
            for f in report.findings:
                table.add_row(
                    f.level,
                    f.store,
                    f.dataset,
                    f.field,
                    f.declared or "-",
                    f.found,
                    f"{f.matches}/{f.sampled}",
                )
            console.print(table)
        sampled = ", ".join(
            f"{s}: {report.datasets.get(s, 0)} datasets, {n} values"
            for s, n in report.sampled.items()
        )
        console.print(
            f"scanned {sampled or 'nothing'}; {len(report.contradictions)} contradiction(s)"
        )
    if strict and report.contradictions:
        raise typer.Exit(1)
