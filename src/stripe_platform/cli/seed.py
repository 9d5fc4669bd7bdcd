"""`seed`: synthetic data into both stores, or activity appended to it."""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any

import typer

from stripe_platform.cli.common import command, console, settings
from stripe_platform.seed.spec import SeedError

commands = typer.Typer()  # merged into the top level


@command(commands)
def seed(
    scale: Annotated[float, typer.Option(help="1 = 1,000,000 transactions")] = 0.05,
    seed: Annotated[int, typer.Option(help="Same seed, same data")] = 42,
    fraud_rate: Annotated[float, typer.Option(help="Planted fraud share, 0.001-0.01")] = 0.005,
    end: Annotated[
        str | None, typer.Option(help="Last day of history (exclusive), YYYY-MM-DD; default today")
    ] = None,
    days: Annotated[int, typer.Option(help="Days of history")] = 730,
    max_documents: Annotated[
        int | None,
        typer.Option(
            help="Cap per large document collection (default: none, every payment gets its "
            "document)"
        ),
    ] = None,
    reset: Annotated[bool, typer.Option(help="Empty both stores first")] = False,
    minutes: Annotated[
        float | None, typer.Option(help="Incremental: append M minutes of activity")
    ] = None,
    tps: Annotated[
        float | None, typer.Option(help="Incremental: N payments/s until stopped")
    ] = None,
    duration: Annotated[float | None, typer.Option(help="With --tps: stop after S seconds")] = None,
) -> None:
    """Generate realistic synthetic data into both stores (or append activity to it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from stripe_platform.docstore.client import connect
    from stripe_platform.oltp import db
    from stripe_platform.oltp.migrate import migrate
    from stripe_platform.runtime import embedded
    from stripe_platform.seed import incremental
    from stripe_platform.seed.dataset import build
    from stripe_platform.seed.load import seed as load_seed
    from stripe_platform.seed.spec import make_spec

    s = settings()
    if minutes is not None or tps is not None:
        if s.profile == "embedded":
            embedded.up(s)
        docs = connect(s)
        report = incremental.run(
            s,
            docs,
            seed=seed,
            minutes=minutes,
            tps=tps,
            duration=duration,
            on_tick=lambda r: (
                console.print(
                    f"tick {r.ticks}: inserted {r.inserted}, updated {r.updated}, deleted {r.deleted}"
                )
                if tps is not None
                else None
            ),
        )
        console.print(
            f"inserted {report.inserted}\nupdated  {report.updated}\ndeleted  {report.deleted}"
        )
        return
    values: dict[str, Any] = {"scale": scale, "seed": seed, "fraud_rate": fraud_rate, "days": days}
    if end:
        try:
            values["end"] = dt.date.fromisoformat(end)
        except ValueError:
            raise SeedError(f"--end {end!r}: expected YYYY-MM-DD") from None
    if max_documents:
        values["max_documents"] = max_documents
    spec = make_spec(**values)  # every argument is checked before anything is written
    if s.profile == "embedded":
        embedded.up(s)
    docs = connect(s)
    with db.connect(s, autocommit=True) as conn:
        migrate(conn)
    with console.status(f"generating {spec.n_transactions:,} transactions (seed {spec.seed})"):
        started = time.monotonic()
        data = build(spec)
    console.print(f"generated in {time.monotonic() - started:.1f}s")
    with Progress(
        TextColumn("{task.description:<22}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(entity: str, rows: int, total: int) -> None:
            if entity not in tasks:
                tasks[entity] = bar.add_task(entity, total=max(total, 1))
            bar.advance(tasks[entity], rows)

        report = load_seed(s, data, docs, reset_first=reset, progress=progress)
    for entity, t in {**report.oltp, **report.documents}.items():
        console.print(
            f"{entity:<22} {t.rows:>10,} rows {t.seconds:7.1f}s {t.rows_per_second:>10,.0f} rows/s"
        )
    if report.resumed_batches:
        console.print(f"resumed: {report.resumed_batches} batch(es) were already committed")
