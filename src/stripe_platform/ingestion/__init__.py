"""Ingestion: moving the sources' data into the raw layer, by concern.

- ``catalog``: the one stream catalog (airbyte/ YAML, checked against the sources);
  :meth:`~stripe_platform.ingestion.catalog.Catalog.resolve` turns a connection's name into
  everything a sync of it needs, once;
- ``airbyte``: the Airbyte control plane (public API v1: plan and apply the catalog, run jobs);
- ``engine``: the embedded engine that runs a connection without Airbyte;
- ``postgres``: PostgreSQL's wire protocol below the engine (slots and snapshot, pgoutput,
  COPY binary, value conversion).

Nothing is imported here: the command line imports each part only when it needs it.
"""
