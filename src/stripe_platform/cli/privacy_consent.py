"""`privacy consent set|show|rates`, `privacy opt-out`, `privacy non-discrimination` (issue 23,
compliance/consent.py and compliance/non_discrimination.py, docs/compliance.md).

The consent registry per subject and purpose (analytics, ml_training, marketing: opt-in, no record
is no consent) and the CCPA do-not-sell opt-out; every change is kept with its time and source
(here: cli, recorded by the operating-system user or `--by`). An unknown customer or purpose is
refused with exit 1. `privacy non-discrimination` exits 1 when the opt-out flag changes any
feature, limit or decision.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from typing import Annotated

import typer
from rich.table import Table

from stripe_platform.cli.common import command, console, group, settings
from stripe_platform.cli.privacy import privacy_app
from stripe_platform.compliance import consent, non_discrimination

consent_app = group(
    "Consent per subject and purpose (analytics, ml_training, marketing), with its history."
)
privacy_app.add_typer(consent_app, name="consent")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout")]
CustomerOption = Annotated[
    int, typer.Option("--customer", min=1, help="The customer (data subject) id")
]
ByOption = Annotated[
    str | None, typer.Option("--by", help="Who records it (default: the operating-system user)")
]
AtOption = Annotated[
    dt.datetime | None,
    typer.Option("--at", help="When the subject gave or withdrew it (default now; UTC if naive)"),
]


def _actor(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return "unknown"


def _print_json(value) -> None:
    console.print_json(json.dumps(value, default=str))


def _when(value: dt.datetime) -> str:
    return f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


@command(consent_app, "set")
def consent_set(
    customer: CustomerOption,
    purpose: Annotated[
        str, typer.Option("--purpose", help="analytics, ml_training, marketing (or sale)")
    ],
    granted: Annotated[
        bool, typer.Option("--granted/--revoked", help="Consent given or withdrawn")
    ],
    at: AtOption = None,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record a consent given or withdrawn (kept beside the earlier ones; the latest wins)."""
    r = consent.record(settings(), customer, purpose, granted, source="cli", by=_actor(by), at=at)
    if as_json:
        _print_json(r.to_json())
        return
    verb = "granted" if r.granted else "revoked"
    console.print(f"customer {r.customer_id}: {r.purpose} {verb} at {_when(r.recorded_at)}")


@command(consent_app, "show")
def consent_show(
    customer: CustomerOption,
    history: Annotated[
        bool, typer.Option("--history", help="Every record, oldest first, not only what holds")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """What holds now for a subject: each purpose and the do-not-sell flag."""
    s = settings()
    state = consent.subject(s, customer)
    records = consent.history(s, customer) if history else list(state.records)
    if as_json:
        _print_json({**state.to_json(), "records": [r.to_json() for r in records]})
        return
    for purpose, value in state.purposes.items():
        shown = "never asked (no consent)" if value is None else ("granted" if value else "revoked")
        console.print(f"{purpose:<12} {shown}")
    console.print(
        f"{'sale':<12} {'opted out (do not sell)' if state.opted_out else 'not opted out'}"
    )
    table = Table("purpose", "granted", "source", "recorded at", "by")
    for r in records:
        table.add_row(
            r.purpose, str(r.granted).lower(), r.source, _when(r.recorded_at), r.recorded_by
        )
    console.print(table)


@command(consent_app, "rates")
def consent_rates(as_json: JsonOption = False) -> None:
    """Consent and opt-out rates over the customers there are now (the dashboard's KPIs)."""
    rates = consent.rates(settings())
    if as_json:
        _print_json(rates)
        return
    table = Table("purpose", "subjects consenting", "rate")
    for purpose, value in rates["by_purpose"].items():
        table.add_row(purpose, str(value["granted"]), f"{value['rate']:.1%}")
    table.add_row("sale: opted out", str(rates["opted_out"]), f"{rates['opt_out_rate']:.1%}")
    console.print(f"{rates['subjects']} subjects")
    console.print(table)


@command(privacy_app, "opt-out")
def opt_out(
    customer: CustomerOption,
    at: AtOption = None,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """CCPA do not sell or share: the customer leaves every dataset shared with third parties."""
    r = consent.opt_out(settings(), customer, source="cli", by=_actor(by), at=at)
    if as_json:
        _print_json(r.to_json())
        return
    console.print(
        f"customer {r.customer_id}: opted out of sale and sharing since {_when(r.recorded_at)} "
        f"(source {r.source}, by {r.recorded_by})"
    )


@command(privacy_app, "non-discrimination")
def non_discrimination_check(
    end: Annotated[
        dt.datetime | None,
        typer.Option("--end", help="End of the period (default now; UTC if naive)"),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Length of the period")] = (
        non_discrimination.DEFAULT_DAYS
    ),
    no_model: Annotated[
        bool, typer.Option("--no-model", help="Leave the champion out (features and rules only)")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Show that prices, limits and fraud decisions do not depend on the opt-out flag."""
    report = non_discrimination.check(settings(), end=end, days=days, use_champion=not no_model)
    if as_json:
        _print_json(report.to_json())
    else:
        c = report.counterfactual
        console.print(
            f"payments {report.start:%Y-%m-%d} to {report.end:%Y-%m-%d}: {c.payments}, "
            f"opt-out flag flipped for {c.customers_flipped} customers"
        )
        console.print(
            f"  the flag is dropped by the transactions contract: {c.flag_dropped_by_contract}"
        )
        console.print(f"  payments whose features differ: {c.features_differ}")
        console.print(f"  payments whose limit (rules) decisions differ: {c.rule_decisions_differ}")
        console.print(
            f"  model ({c.model}): scores differ {c.scores_differ}, decisions differ "
            f"{c.model_decisions_differ}"
        )
        table = Table("", "customers", "payments", "mean EUR", "median EUR", "declined",
                      "rules flagged", "model flagged")  # fmt: skip
        for name, g in (("opted out", report.opted_out), ("others", report.others)):
            table.add_row(
                name, str(g.customers), str(g.payments), str(g.mean_amount_eur),
                str(g.median_amount_eur), str(g.declined_rate), str(g.rules_flagged_rate),
                str(g.model_flagged_rate),
            )  # fmt: skip
        console.print(table)
        if report.review:
            console.print(f"  to review (|z| >= {non_discrimination.Z_REVIEW}): {report.review}")
        console.print("PASSED" if report.passed else "FAILED")
    if not report.passed:
        raise typer.Exit(1)
