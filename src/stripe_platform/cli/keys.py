"""`keys`: key-encryption keys, data keys, rotation, rewrap, re-encryption, audit and coverage."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.cli.common import command, console, group, settings

keys_app = group("Encryption keys: list, rotate, rewrap, re-encrypt, audit, coverage.")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]


def _envelope():
    from stripe_platform.security.envelope import Envelope

    return Envelope(settings())


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


@command(keys_app, "list")
def keys_list(as_json: JsonOption = False) -> None:
    """The key-encryption keys (versions, state), the data-key scopes (versions, state, the KEK
    version wrapping each) and how many subject keys are live or shredded."""
    envelope = _envelope()
    keks = envelope.keks()
    scopes = envelope.scopes()
    live, shredded = envelope.subject_keys().counts()
    if as_json:
        console.print_json(
            data={
                "provider": envelope.provider.name,
                "keks": {
                    store: [
                        {"version": v.version, "state": v.state, "created_at": v.created_at}
                        for v in versions
                    ]
                    for store, versions in keks.items()
                },
                "data_keys": [asdict(s) for s in scopes],
                "subject_keys": {"live": live, "shredded": shredded},
            },
            default=str,
        )
        return
    table = Table(title=f"Key-encryption keys ({envelope.provider.name})")
    for column in ("store", "version", "state", "created"):
        table.add_column(column)
    for store, versions in keks.items():
        for v in versions:
            table.add_row(store, str(v.version), v.state, _when(v.created_at))
    console.print(table)
    table = Table(title="Data keys")
    for column in ("scope", "purpose", "version", "state", "KEK", "created", "rewrapped"):
        table.add_column(column)
    for s in scopes:
        table.add_row(
            s.scope,
            s.purpose,
            str(s.version),
            s.state,
            f"{s.kek_id} v{s.kek_version}",
            _when(s.created_at),
            _when(s.rewrapped_at),
        )
    console.print(table)
    console.print(f"subject keys: {live} live, {shredded} shredded")


@command(keys_app, "rotate")
def keys_rotate(
    scope: Annotated[
        str | None, typer.Argument(help="Data-key scope <store>/<table>, e.g. postgres/customer")
    ] = None,
    kek: Annotated[
        str | None, typer.Option("--kek", help="Rotate this store's key-encryption key instead")
    ] = None,
) -> None:
    """A new data-key version for SCOPE (older ones still decrypt until re-encryption retires
    them), or with --kek a new KEK version (then `keys rewrap`)."""
    if (scope is None) == (kek is None):
        raise typer.BadParameter("give a SCOPE or --kek STORE (one of them)")
    envelope = _envelope()
    if kek is not None:
        version = envelope.rotate_kek(kek)
        console.print(f"key-encryption key {kek}: version {version.version} is current")
    else:
        key = envelope.rotate(scope)
        console.print(f"{scope}: version {key.version} is current (under KEK v{key.kek_version})")


@command(keys_app, "rewrap")
def keys_rewrap(
    store: Annotated[
        str | None, typer.Option("--store", help="Only this store's KEK (default: every store)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Rotate the KEK(s) and re-wrap every data key under the new version, in one transaction;
    the data is not touched."""
    result = _envelope().rewrap(store)
    if as_json:
        console.print_json(data=asdict(result))
        return
    versions = ", ".join(f"{s} v{v}" for s, v in result.kek_versions.items()) or "no store"
    console.print(f"rewrapped {result.count} data keys under {versions} in {result.seconds:.3f} s")


@command(keys_app, "audit")
def keys_audit(
    since: Annotated[
        dt.datetime | None, typer.Option("--since", help="Only events from this time on")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (the last)")] = 50,
    as_json: JsonOption = False,
) -> None:
    """The key audit trail (every key operation, failures included), oldest first."""
    from stripe_platform.security.envelope import audit_log

    if since is not None and since.tzinfo is None:
        since = since.astimezone()  # a time without zone is local time
    records = audit_log(settings(), since=since, limit=limit)
    if as_json:
        console.print_json(data=[asdict(r) for r in records], default=str)
        return
    table = Table(title=f"Key events ({len(records)})")
    for column in ("at", "actor", "from", "operation", "key", "outcome", "detail"):
        table.add_column(column)
    for r in records:
        key = (r.scope or "") + ("" if r.version is None else f" v{r.version}")
        detail = ", ".join(f"{k}={v}" for k, v in r.detail.items() if v is not None)
        table.add_row(
            _when(r.at), r.actor, r.source_address or "local", r.operation, key, r.outcome, detail
        )
    console.print(table)


@command(keys_app, "reencrypt")
def keys_reencrypt(
    scope: Annotated[
        str | None,
        typer.Option(
            "--scope", help="One scope, e.g. postgres/customer (default: every postgres/*)"
        ),
    ] = None,
    batch_rows: Annotated[int, typer.Option(min=1, help="Rows per committed batch")] = 5000,
    as_json: JsonOption = False,
) -> None:
    """Re-encrypt data under older data-key versions (and the legacy single key) to the current
    version, in committed batches while the platform keeps reading, then retire the old versions.
    Resumable: a killed run continues after its last committed batch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from stripe_platform.security.reencrypt import reencrypt

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), disable=as_json
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(table: str, rows: int, total: int) -> None:
            if table not in tasks:
                tasks[table] = bar.add_task(table, total=total)
            bar.update(tasks[table], advance=rows, total=total)

        result = reencrypt(settings(), scope=scope, batch_rows=batch_rows, progress=progress)
    if as_json:
        console.print_json(
            data={
                "scopes": [asdict(s) for s in result.scopes],
                "legacy_retired": result.legacy_retired,
                "rows": result.rows,
                "seconds": result.seconds,
                "rows_per_second": result.rows_per_second,
            }
        )
        return
    for s in result.scopes:
        resumed = "" if s.resumed_after is None else f", resumed after id {s.resumed_after}"
        retired = ", ".join(f"v{v}" for v in s.retired) or "none"
        console.print(
            f"{s.scope:<28} {s.rows:>9,} rows to v{s.target_version} in {s.seconds:.1f} s"
            f"{resumed}; retired {retired}"
        )
    legacy = "; the legacy single key retired" if result.legacy_retired else ""
    console.print(
        f"{result.rows:,} rows in {result.seconds:.1f} s ({result.rows_per_second:,.0f} rows/s)"
        + legacy
    )


@command(keys_app, "coverage")
def keys_coverage(
    store: Annotated[
        list[str] | None, typer.Option("--store", help="Only these stores (repeatable)")
    ] = None,
    sample: Annotated[int, typer.Option(min=1, help="Values sampled per field")] = 1000,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 unless every checked store is at 100 %")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """The share of the catalog's protected fields (PCI, PII, credentials) encrypted, hashed or
    masked at rest, per store, judged from the stores' real contents."""
    from stripe_platform.security.coverage import STORES, coverage_report, render_coverage

    report = coverage_report(settings(), stores=store or STORES, sample=sample)
    if as_json:
        console.print_json(data=report.as_dict())
    else:
        render_coverage(report, console)
    if strict and report.in_clear:
        raise typer.Exit(1)
