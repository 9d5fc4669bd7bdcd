"""The DuckDB warehouse file holds personal data: it and its write-ahead log are the user's only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import duckdb
import pyarrow as pa

from stripe_platform.config import load_settings
from stripe_platform.rawlayer import Column, RawStream
from stripe_platform.warehouse import open_raw_writer

CUSTOMER = RawStream(
    namespace="raw",
    name="postgres_customer",
    columns=(Column("id", "integer"), Column("ipaddress", "string")),
    primary_key=("id",),
    mode="append_dedup",
    cdc="postgres",
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write(raw, ids: list[int]) -> None:
    rows = pa.table(
        {"id": ids, "ipaddress": [f"10.0.0.{i}" for i in ids], "_ab_cdc_lsn": ids},
    )
    raw.write(CUSTOMER, rows, sync_id="s", generation_id=1, state=None)


def current_umask() -> int:
    value = os.umask(0o022)
    os.umask(value)
    return value


def test_the_warehouse_its_wal_and_directory_are_private(tmp_path):
    settings = load_settings(home=tmp_path / "home", warehouse="duckdb")
    before = current_umask()
    raw = open_raw_writer(settings)
    try:
        file = settings.warehouse_file
        wal = file.with_name(file.name + ".wal")
        assert file.parent == tmp_path / "home" / "warehouse"
        assert mode(file.parent) == 0o700
        write(raw, [1, 2])
        assert wal.exists()  # the batch is in the log until a checkpoint
        assert (mode(file), mode(wal)) == (0o600, 0o600)
        # A checkpoint removes the log; the next write creates it again, private again.
        raw.conn.execute("CHECKPOINT")
        assert not wal.exists()
        write(raw, [3])
        assert mode(wal) == 0o600
        assert mode(file) == 0o600
    finally:
        raw.conn.close()
    assert current_umask() == before  # the process's umask is left as it was
    assert mode(tmp_path / "home") == 0o777 & ~before  # the home itself is not narrowed


def test_a_warehouse_an_earlier_version_left_readable_is_narrowed(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    legacy = home / "warehouse.duckdb"  # where homes made before kept it
    duckdb.connect(str(legacy)).close()
    legacy.chmod(0o644)
    settings = load_settings(home=home, warehouse="duckdb")
    assert settings.warehouse_file == legacy
    raw = open_raw_writer(settings)
    try:
        write(raw, [1])
        assert mode(legacy) == 0o600
        assert mode(legacy.with_name("warehouse.duckdb.wal")) == 0o600
    finally:
        raw.conn.close()
    assert mode(home) == 0o755  # the home holds it: not narrowed (<home>/pg must stay reachable)


def test_an_existing_warehouse_directory_of_its_own_is_narrowed(tmp_path):
    """<home>/warehouse/ as an earlier version made it (the umask's mode): narrowed to 0700 with
    its file; one holding anything else (here one WAREHOUSE_PATH names, of the same name) is left
    as it is."""
    home = tmp_path / "home"
    own = home / "warehouse"
    own.mkdir(parents=True)
    own.chmod(0o755)
    duckdb.connect(str(own / "warehouse.duckdb")).close()
    (own / "warehouse.duckdb").chmod(0o644)
    settings = load_settings(home=home, warehouse="duckdb")
    assert settings.warehouse_file == own / "warehouse.duckdb"
    open_raw_writer(settings).conn.close()
    assert (mode(own), mode(own / "warehouse.duckdb")) == (0o700, 0o600)

    shared = tmp_path / "warehouse"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "notes.txt").write_text("someone else's")
    elsewhere = load_settings(home=home, warehouse="duckdb", warehouse_path=shared / "w.duckdb")
    open_raw_writer(elsewhere).conn.close()
    assert (mode(shared), mode(shared / "w.duckdb")) == (0o755, 0o600)
