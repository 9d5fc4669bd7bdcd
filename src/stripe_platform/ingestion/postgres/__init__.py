"""PostgreSQL's wire protocol as the embedded engine reads it, below the engine and knowing nothing
of the catalog:

- ``cdc``: publication and replication slot management, the consistent snapshot a new slot
  exports, and polling the slot's changes (``pg_logical_slot_peek_binary_changes``);
- ``pgoutput``: the decoder of the ``pgoutput`` plugin's messages (the changes);
- ``pgcopy``: ``COPY ... (FORMAT binary)`` read straight into Arrow (the snapshot), with its
  compiled loop in ``pgcopy_kernel`` (numba, imported on the first read only);
- ``pgvalues``: the one conversion of PostgreSQL values into the raw layer's Arrow values, shared by
  the snapshot, change and full-refresh paths.
"""
