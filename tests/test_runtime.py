"""The embedded cluster: lifecycle, TLS, SCRAM-only access and JSON audit logs."""

import json
import stat
import time
from urllib.parse import quote

import psycopg
import pymongo
import pytest
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from stripe_platform.config import load_settings
from stripe_platform.oltp import db
from stripe_platform.runtime import postgres
from stripe_platform.runtime.postgres import RuntimeErrorWithHint


@pytest.fixture
def own_cluster(fresh_home):
    s = load_settings(home=fresh_home, pg_fsync=False)
    cluster = db.embedded_cluster(s)
    yield s, cluster
    cluster.down()


def test_up_is_idempotent_and_data_survives_down_up(own_cluster):
    s, cluster = own_cluster
    first = cluster.up()
    assert first.running and first.port
    again = cluster.up()
    assert again.pid == first.pid and again.port == first.port

    with db.connect(s, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('still here')")
    assert cluster.down() is True
    assert cluster.status().running is False
    assert cluster.down() is False  # stopping a stopped cluster is harmless

    restarted = cluster.up()
    assert restarted.port == first.port
    with db.connect(s) as conn:
        assert conn.execute("SELECT v FROM kept").fetchone() == ("still here",)


def test_server_settings_for_cdc_tls_and_audit(settings):
    with db.connect(settings) as conn:
        values = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (
                    [
                        "wal_level",
                        "ssl",
                        "log_connections",
                        "log_disconnections",
                        "log_statement",
                        "log_destination",
                        "password_encryption",
                        "listen_addresses",
                    ],
                ),
            ).fetchall()
        )
    assert values == {
        "wal_level": "logical",
        "ssl": "on",
        "log_connections": "on",
        "log_disconnections": "on",
        "log_statement": "all",
        "log_destination": "jsonlog",
        "password_encryption": "scram-sha-256",
        "listen_addresses": "127.0.0.1",
    }


def test_tls_required_and_verifiable(settings):
    # verify-full: the server certificate chains to the generated CA and names 127.0.0.1.
    with db.connect(settings, sslmode="verify-full") as conn:
        ssl = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        used, version = ssl.fetchone()
    assert used is True and version.startswith("TLSv1.")
    with db.connect(settings, sslmode="require") as conn:
        assert conn.info.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="reject"):
        db.connect(settings, sslmode="disable")


def test_password_authentication_is_enforced(settings):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        db.connect(settings, password="wrong")


def test_audit_log_is_json_with_session_metadata(settings):
    with (
        db.connect(settings, application_name="audit-probe") as conn,
        pytest.raises(psycopg.errors.UndefinedTable),
    ):
        conn.execute("SELECT * FROM CustomerInteractions")
    log_dir = db.embedded_cluster(settings).status().audit_log_dir
    deadline = time.monotonic() + 10
    entry = None
    while entry is None and time.monotonic() < deadline:
        for path in sorted(log_dir.glob("*.json")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if (
                    record.get("application_name") == "audit-probe"
                    and record.get("error_severity") == "ERROR"
                ):
                    entry = record
        time.sleep(0.1)
    assert entry is not None, "the failing statement was not logged"
    assert entry["state_code"] == "42P01"
    assert entry["user"] == "postgres" and entry["dbname"] == "stripe"
    assert entry["remote_host"] == "127.0.0.1"
    assert entry["statement"] == "SELECT * FROM CustomerInteractions"
    for field in ("timestamp", "pid", "session_id", "session_start", "message"):
        assert entry[field]


def test_pii_key_never_reaches_the_audit_log(settings, conn):
    from stripe_platform.security.keys import pii_key

    conn.execute("SELECT pii_encrypt('probe')")
    log_dir = db.embedded_cluster(settings).status().audit_log_dir
    text = "".join(p.read_text() for p in log_dir.glob("*.json"))
    assert "pii_encrypt('probe')" in text
    assert pii_key(settings) not in text


def test_missing_server_binaries_give_the_install_hint(monkeypatch):
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres.glob, "glob", lambda pattern: [])
    with pytest.raises(RuntimeErrorWithHint, match="apt-get install postgresql"):
        postgres.find_bindir()


def test_connecting_before_up_says_what_to_do(tmp_path):
    s = load_settings(home=tmp_path)
    with pytest.raises(RuntimeErrorWithHint, match="stripe-platform up"):
        db.conninfo(s)


# -- the embedded document server (FerretDB) ------------------------------------------------------------
def test_document_server_needs_tls_and_the_platform_login(settings):
    """TLS only on 127.0.0.1, and no command without the stripe_docstore password: a wrong one
    and none at all are refused (the launcher scrubs libpq's defaults, which FerretDB would
    otherwise fall back on), and a client without TLS never gets an answer."""
    from stripe_platform.docstore.client import embedded_server

    server = embedded_server(settings)
    status = server.status()
    assert status.running and status.port is not None
    assert stat.S_IMODE(server.password_file.stat().st_mode) == 0o600
    ca = settings.home_dir / "tls" / "ca.crt"

    good = pymongo.MongoClient(server.uri(), serverSelectionTimeoutMS=5000)
    assert good.admin.command("ping")["ok"] == 1
    good.close()

    wrong = server.uri().replace(quote(server.password(), safe=""), "not-the-password")
    anonymous = f"mongodb://127.0.0.1:{status.port}/?tls=true&tlsCAFile={ca}"
    for uri in (wrong, anonymous):
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
        with pytest.raises(OperationFailure, match="password authentication failed"):
            client.stripe.Transaction.find_one()
        client.close()

    plain = pymongo.MongoClient(
        f"mongodb://127.0.0.1:{status.port}/", serverSelectionTimeoutMS=2000
    )
    with pytest.raises(ServerSelectionTimeoutError):
        plain.admin.command("ping")
    plain.close()
