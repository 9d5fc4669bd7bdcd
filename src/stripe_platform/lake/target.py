"""The lake as a sync destination: a ``rawlayer.RawWriter`` over LakeWriter.

The lake appends (one parquet file per batch); sync state sits beside the data in
``<root>/_stripe_platform/state/<key>.json``, written after the batch's file is durable, so a crash in
between re-delivers that batch as a new file: readers that want one row per key deduplicate on the
primary key, latest by ``_airbyte_generation_id`` then ``_ab_cdc_lsn``/``_ab_cdc_cursor``
(docs/ingestion.md). When a snapshot or
full refresh completes, older generations leave the live prefix for the history prefix
(``LakeWriter.supersede``), as the warehouse deletes them from its tables.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pyarrow as pa

from stripe_platform.lake.writer import LakeWriter
from stripe_platform.rawlayer import (
    RawStream,
    WriteResult,
    dropped_columns,
    source_columns,
)


class LakeRaw:
    # Each batch is a file of its own: the sync engine may write several at once.
    concurrent_writes = True

    def __init__(self, writer: LakeWriter, source: str) -> None:
        self.lake = writer
        self.source = source
        self._parts: dict[str, int] = {}
        self._parts_lock = threading.Lock()
        # stream -> its columns as last recorded (state key "<source>.<stream>.columns"): a file
        # without a column reads as NULL in it (union by name), and the drop is reported once.
        self._columns: dict[str, list[str] | None] = {}

    def _state_path(self, key: str) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
        return f"{self.lake.base}/_stripe_platform/state/{safe}.json"

    def ensure(self, stream: RawStream) -> list[str]:
        return []  # parquet files carry their own schema; readers union by name

    def begin_snapshot(self, stream: RawStream, generation_id: int) -> None:
        pass  # a snapshot's batches are files like any other; finish_overwrite supersedes

    def load_state(self, key: str) -> dict[str, Any] | None:
        data = self.lake.get_bytes(self._state_path(key))
        return None if data is None else json.loads(data)

    def save_state(self, key: str, state: dict[str, Any]) -> None:
        self.lake.put_bytes(self._state_path(key), json.dumps(state, default=str).encode())

    def state(self, stream: RawStream) -> dict[str, Any] | None:
        return self.load_state(f"{self.source}.{stream.name}")

    def write(
        self,
        stream: RawStream,
        batch: pa.Table,
        *,
        sync_id: str,
        generation_id: int,
        state: dict[str, Any] | None,
    ) -> WriteResult:
        columns_key = f"{self.source}.{stream.name}.columns"
        with self._parts_lock:  # two writes never share a file name
            part = self._parts.get(stream.name, 0)
            self._parts[stream.name] = part + 1
            first = stream.name not in self._columns
            if first:
                self._columns[stream.name] = (self.load_state(columns_key) or {}).get("columns")
            previous = self._columns[stream.name]
            self._columns[stream.name] = source_columns(stream)
        if first:
            # Once per sync and stream: what killed writes left (mode 0600, but personal data),
            # in this source's prefix only (other connections may share the lake's root), and
            # only temporaries too old to be a write under way (LakeWriter.sweep_temporary).
            self.lake.sweep_temporary(self.source, stream)
        written = self.lake.write(
            self.source, stream, batch, sync_id=sync_id, generation_id=generation_id, part=part
        )
        if state is not None:
            self.save_state(f"{self.source}.{stream.name}", state)
        if previous != source_columns(stream):
            self.save_state(columns_key, {"columns": source_columns(stream)})
        return WriteResult(written.rows, written.nulled, [], dropped_columns(previous, stream))

    def finish_overwrite(
        self, stream: RawStream, generation_id: int, state: dict[str, Any] | None
    ) -> int:
        """End of a complete snapshot or full refresh: older generations (an earlier snapshot and
        its changes, an attempt that died) leave the live prefix, then the state is saved; returns
        the rows moved to the history prefix. If this fails half-way the state is not saved, and
        the next finish moves what is left."""
        moved = self.lake.supersede(self.source, stream, generation_id)
        if state is not None:
            self.save_state(f"{self.source}.{stream.name}", state)
        return moved.rows
