"""The embedded sync engine: runs a connection of the airbyte/ catalog without Airbyte, into a
raw-layer writer (the warehouse's or the lake's).

- ``sync``: :class:`Engine` (PostgreSQL snapshot, changes and full refresh; MongoDB reads),
  :func:`run_sync`, :func:`follow` and :func:`open_writer`, the entry points re-exported here;
- ``mongo_source``: reading document collections (by cursor field, or change streams).

PostgreSQL's wire protocol (slots, pgoutput, COPY binary) is in ``ingestion.postgres``.
"""

from stripe_platform.ingestion.engine.sync import (
    Engine,
    StreamReport,
    SyncError,
    SyncReport,
    follow,
    open_writer,
    run_sync,
)

__all__ = [
    "Engine",
    "StreamReport",
    "SyncError",
    "SyncReport",
    "follow",
    "open_writer",
    "run_sync",
]
