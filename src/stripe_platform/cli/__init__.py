"""`stripe-platform`: the command line of the platform.

One module per section, each with its commands and command groups; common.py holds what they
share (the `command` decorator, the consoles, the settings). A new section is one module plus one
line below: ``app.add_typer(section.commands)`` for top-level commands, or
``app.add_typer(section.x_app, name="x")`` for a group (made with ``common.group``). ``--help``
lists the top-level commands in the order of these lines, then the groups in theirs.
"""

from __future__ import annotations

import typer

from stripe_platform.cli import (
    access,
    api,
    audit,
    bench,
    compliance,
    docstore,
    governance,
    incidents,
    ingestion,
    kafka,
    keys,
    ml,
    oltp,
    privacy,
    runtime,
    seed,
    streaming,
    tls,
    transform,
)

app = typer.Typer(help="Open data platform for payments.", no_args_is_help=True)

app.add_typer(runtime.commands)
app.add_typer(seed.commands)
app.add_typer(ingestion.commands)
app.add_typer(transform.commands)
app.add_typer(bench.commands)
app.add_typer(api.commands)

app.add_typer(oltp.db_app, name="db")
app.add_typer(docstore.mongo_app, name="mongo")
app.add_typer(ingestion.airbyte_app, name="airbyte")
app.add_typer(ml.ml_app, name="ml")
app.add_typer(streaming.stream_app, name="stream")
app.add_typer(kafka.kafka_app, name="kafka")
app.add_typer(governance.catalog_app, name="catalog")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(tls.tls_app, name="tls")
app.add_typer(access.access_app, name="access")
# Their commands register on `access_app` (tokens, MFA, the access log): imported for that.
from stripe_platform.cli import access_log, access_mfa, access_tokens, access_warehouse  # noqa: E402, F401

app.add_typer(audit.audit_app, name="audit")
app.add_typer(incidents.incidents_app, name="incidents")
from stripe_platform.cli import audit_collect, audit_model, audit_rules  # noqa: E402, F401

app.add_typer(privacy.privacy_app, name="privacy")
app.add_typer(compliance.compliance_app, name="compliance")
# Their commands register on `privacy_app` / `compliance_app`: imported for that.
from stripe_platform.cli import (  # noqa: E402, F401
    compliance_controls,
    compliance_dashboard,
    privacy_breach,
    privacy_consent,
    privacy_requests,
)

__all__ = ["app"]
