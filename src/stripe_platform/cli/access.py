"""`access`: the access policy as code (issue 21, docs/access.md)."""

from __future__ import annotations

from stripe_platform.cli.common import group

access_app = group(
    "Access control as code: the policy, its plan and apply, expiring grants, MFA, tokens, logs."
)
