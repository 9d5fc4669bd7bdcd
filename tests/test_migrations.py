import shutil

import pytest

from stripe_platform.oltp.migrate import MigrationError, discover, migrate


def test_all_migrations_apply_and_rerun_is_a_no_op(conn):
    versions = [m.version for m in discover()]
    recorded = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert recorded == versions
    assert migrate(conn) == []
    again = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert again == versions


def test_brief_tables_exist(conn):
    tables = {
        r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    }
    for name in (
        "customer",
        "merchant",
        "currency",
        "paymentmethod",
        "device",
        "address",
        "location",
        "transactionstatus",
        "transaction_default",
        "transactionstatechanges",
        "industry",
        "merchantsize",
        "paymentinstrument",
    ):
        assert name in tables
    kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = 'transaction'").fetchone()
    assert kind == ("p",)  # partitioned


def test_failing_migration_leaves_nothing_half_applied(conn, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for m in discover():
        shutil.copy(m.path, good / m.path.name)
    (good / "0901_half.sql").write_text(
        "CREATE TABLE half_applied (id int);\n"
        "INSERT INTO half_applied VALUES (1);\n"
        "ALTER TABLE no_such_table ADD COLUMN x int;\n"
    )
    with pytest.raises(MigrationError, match="0901_half.sql failed and was rolled back"):
        migrate(conn, discover(good))
    assert conn.execute("SELECT to_regclass('half_applied')").fetchone() == (None,)
    assert conn.execute(
        "SELECT count(*) FROM schema_migrations WHERE version = 901"
    ).fetchone() == (0,)


def test_editing_an_applied_migration_is_refused(conn, tmp_path):
    for m in discover():
        shutil.copy(m.path, tmp_path / m.path.name)
    first = sorted(tmp_path.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited later\n")
    with pytest.raises(MigrationError, match="was changed after it was applied"):
        migrate(conn, discover(tmp_path))


def test_badly_named_file_is_reported(tmp_path):
    (tmp_path / "add_things.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="NNNN_snake_name.sql"):
        discover(tmp_path)


def test_migrate_needs_autocommit(settings, database):
    from stripe_platform.oltp import db

    with db.connect(settings, database=database) as c, pytest.raises(ValueError):
        migrate(c)
