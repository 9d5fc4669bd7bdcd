"""`bench`: every benchmark of bench/, from a repository checkout."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from stripe_platform.cli.common import command
from stripe_platform.runtime.postgres import RuntimeErrorWithHint

commands = typer.Typer()  # merged into the top level


@command(commands)
def bench(
    scale: Annotated[float, typer.Option(help="1 = 1,000,000 payments")] = 1.0,
    runs: Annotated[int, typer.Option(min=1, help="Measured runs, after a warm-up")] = 3,
    only: Annotated[
        str | None,
        typer.Option(help="Comma-separated: seed,ingest,transform,mongo,demo,fault,ml,api,stream"),
    ] = None,
    output_dir: Annotated[
        str | None, typer.Option(help="Where <date>.json and <date>.md go (default bench/results)")
    ] = None,
) -> None:
    """Run every benchmark (bench/run_all.py) on the embedded profile and print the table."""
    import subprocess

    from stripe_platform.paths import REPO_ROOT

    script = REPO_ROOT / "bench" / "run_all.py"
    if not script.exists():
        raise RuntimeErrorWithHint(f"{script} not found: `bench` runs from a repository checkout")
    args = [sys.executable, str(script), "--scale", str(scale), "--runs", str(runs)]
    args += ["--only", only] if only else []
    args += ["--output-dir", output_dir] if output_dir else []
    raise typer.Exit(subprocess.run(args, check=False).returncode)
