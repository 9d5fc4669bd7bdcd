"""`audit`: the audit trail (issue 22, docs/audit.md): collect, verify, retention, rules, model."""

from __future__ import annotations

from stripe_platform.cli.common import group

audit_app = group(
    "The audit trail: collect the logs, verify the hash chain, retention, detection rules, the "
    "log anomaly model."
)
