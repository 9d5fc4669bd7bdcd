"""`catalog`: the data classification catalog (governance/): list it, gate it, scan real values."""

from __future__ import annotations

from stripe_platform.cli.common import group

catalog_app = group("The data classification catalog: every column and field of every store.")
