"""`privacy` commands (issue 23): placeholder until its owner fills it in."""

from __future__ import annotations

from stripe_platform.cli.privacy import privacy_app  # noqa: F401
