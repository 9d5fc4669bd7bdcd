"""The classification catalog: its CI gate on the repository and on broken copies, the scan's
recognizers on values whose nature is known, and a scan of a real PostgreSQL database."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stripe_platform.cli import app
from stripe_platform.governance.classification import CatalogError as ClassificationError
from stripe_platform.governance.classification import (
    DataClass,
    Entry,
    load_catalog,
    most_sensitive,
)
from stripe_platform.governance.scan import (
    ScanReport,
    is_card_number,
    is_email,
    is_iban,
    is_ip_address,
    is_phone,
    scan,
    scan_rows,
)
from stripe_platform.paths import REPO_ROOT

runner = CliRunner()


# --- the gate on the repository --------------------------------------------------------------------


def test_the_gate_passes_on_the_repository() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", "catalog", "check"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "catalog ok" in result.stdout


def test_the_repository_catalog_as_written_in_its_files() -> None:
    catalog = load_catalog()
    assert catalog.problems == ()
    # Classes as declared by hand in sql/oltp/0011, mongo/collections and the marts' YAML.
    expected = {
        ("postgres", "customer", "password"): DataClass.CREDENTIAL,
        ("postgres", "customer", "email"): DataClass.PII,
        ("postgres", "customer", "emailhash"): DataClass.PII_QUASI,
        ("postgres", "customer", "username"): DataClass.PII_QUASI,
        ("postgres", "customer", "countrycode"): DataClass.NON_PERSONAL,
        ("postgres", "paymentinstrument", "pan"): DataClass.PCI,
        ("postgres", "transaction", "ipaddress"): DataClass.PII_QUASI,
        ("postgres", "address", "postalcode"): DataClass.PII_QUASI,
        ("documents", "Customer", "email"): DataClass.PII,
        ("documents", "Log", "lines.message"): DataClass.PII_QUASI,
        ("documents", "UserInteractionData", "location.ip"): DataClass.PII_QUASI,
        ("marts", "DIM_Customer", "UserName"): DataClass.PII,
        ("marts", "FACT_Revenue", "Amount"): DataClass.NON_PERSONAL,
    }
    for (store, dataset, field), data_class in expected.items():
        assert catalog.get(store, dataset, field).data_class == data_class, (dataset, field)
    email = catalog.get("postgres", "customer", "email")
    assert email.category == "user.contact.email"
    assert email.declared_at.startswith("sql/oltp/0011_classification.sql:")
    assert catalog.subject("postgres", "transaction") == "customerid"
    assert catalog.subject("documents", "Customer") == "oltp_id"
    assert catalog.subject("marts", "FACT_Revenue") == "CustomerKey"
    assert catalog.subject("postgres", "currency") is None


def test_streams_take_the_class_of_their_source() -> None:
    catalog = load_catalog()
    lake, raw = "lake", "warehouse_raw"
    # A PostgreSQL column keeps its class; excluded columns (PAN, Password) never reach a stream.
    assert catalog.get(lake, "postgres.customer", "email").data_class == DataClass.PII
    assert catalog.get(raw, "raw.postgres_customer", "email").data_class == DataClass.PII
    fields = {e.field for e in catalog.dataset(lake, "postgres.paymentinstrument")}
    assert "pan" not in fields and "last4" in fields
    assert "password" not in {e.field for e in catalog.dataset(raw, "raw.postgres_customer")}
    # A document object takes its most sensitive sub-field: location.ip is pii_quasi.
    location = catalog.get(lake, "mongodb.userinteractiondata", "location")
    assert location.data_class == DataClass.PII_QUASI
    assert catalog.get(lake, "mongodb.userinteractiondata", "device").data_class == (
        DataClass.NON_PERSONAL
    )
    # The subject the validator does not name lives in the raw layer's _extra JSON.
    assert catalog.subject(lake, "mongodb.userinteractiondata") == "_extra.customer_id"
    # Sync metadata is non-personal.
    meta = catalog.get(raw, "raw.mongodb_customer", "_ab_cdc_cursor")
    assert meta.data_class == DataClass.NON_PERSONAL
    assert {e.field for e in catalog.protected(lake)} == {"email", "fullname", "phone", "line1"} | {
        "customer_email"
    }


def test_lookups_name_what_is_unknown() -> None:
    catalog = load_catalog()
    with pytest.raises(ClassificationError, match="no dataset 'nope' in store postgres"):
        catalog.get("postgres", "nope", "id")
    with pytest.raises(ClassificationError, match="customer has no classified field 'nope'"):
        catalog.get("postgres", "customer", "nope")
    with pytest.raises(ClassificationError, match="unknown store 'oracle'"):
        catalog.for_store("oracle")  # type: ignore[arg-type]


def test_most_sensitive() -> None:
    assert most_sensitive([]) == DataClass.NON_PERSONAL
    assert most_sensitive([DataClass.NON_PERSONAL, DataClass.PII_QUASI]) == DataClass.PII_QUASI
    assert most_sensitive([DataClass.PII, DataClass.PCI, DataClass.PII_QUASI]) == DataClass.PCI


# --- the gate on broken copies ---------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of every declaration the catalog reads."""
    for part in ("sql/oltp", "mongo", "airbyte", "dbt_project/models/marts"):
        shutil.copytree(REPO_ROOT / part, tmp_path / part)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def _gate(root: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["catalog", "check", "--root", str(root)])
    return result.exit_code, result.output


def test_the_copy_passes_as_is(tree: Path) -> None:
    code, output = _gate(tree)
    assert code == 0, output
    assert "catalog ok" in output


def test_an_oltp_column_without_its_label_fails_the_gate(tree: Path) -> None:
    migration = tree / "sql/oltp/0011_classification.sql"
    lines = migration.read_text().splitlines(keepends=True)
    migration.write_text("".join(x for x in lines if "Device.Fingerprint" not in x))
    code, output = _gate(tree)
    assert code == 1
    assert "postgres device.fingerprint: unclassified" in output
    assert load_catalog(tree).problems == (
        "sql/oltp: postgres device.fingerprint: unclassified (no COMMENT ON COLUMN with a "
        "PCI:/PII:/QUASI:/SECRET:/NONE: label)",
    )


def test_a_new_column_without_a_label_fails_the_gate(tree: Path) -> None:
    (tree / "sql/oltp/0099_more.sql").write_text("ALTER TABLE Merchant ADD COLUMN Website text;\n")
    assert "postgres merchant.website: unclassified" in _gate(tree)[1]


def test_an_unknown_oltp_label_fails_the_gate(tree: Path) -> None:
    _edit(
        tree / "sql/oltp/0011_classification.sql",
        "COMMENT ON COLUMN Merchant.Name IS 'NONE: business name';",
        "COMMENT ON COLUMN Merchant.Name IS 'PUBLIC: business name';",
    )
    code, output = _gate(tree)
    assert code == 1
    assert re.search(
        r"sql/oltp/0011_classification.sql:\d+: postgres merchant.name: unknown label", output
    )


def test_an_unclassified_document_field_fails_the_gate(tree: Path) -> None:
    spec = tree / "mongo/collections/UserInteractionData.json"
    data = json.loads(spec.read_text())
    del data["classification"]["location.city"]
    spec.write_text(json.dumps(data))
    code, output = _gate(tree)
    assert code == 1
    assert "documents UserInteractionData.location.city: unclassified" in output


def test_an_unknown_class_fails_the_gate(tree: Path) -> None:
    spec = tree / "mongo/collections/Customer.json"
    data = json.loads(spec.read_text())
    data["classification"]["userName"] = "secretish"
    spec.write_text(json.dumps(data))
    _edit(
        tree / "dbt_project/models/marts/DIM_Currency.yml",
        "classification: non_personal",
        "classification: PII",  # the value set before the catalog
    )
    code, output = _gate(tree)
    assert code == 1
    assert "classification.userName: unknown class 'secretish'" in output
    assert "DIM_Currency.CurrencyKey: unknown class 'PII'" in output


def test_a_mart_column_less_sensitive_than_its_source_fails_the_gate(tree: Path) -> None:
    mart = tree / "dbt_project/models/marts/DIM_Customer.yml"
    text = mart.read_text()
    start = text.index("- name: UserName")
    at = text.index("classification: pii", start)
    mart.write_text(text[:at] + "classification: non_personal" + text[at + 19 :])
    code, output = _gate(tree)
    assert code == 1
    assert "DIM_Customer.UserName: non_personal is less sensitive than its source" in output


def test_a_mart_column_without_a_class_fails_the_gate(tree: Path) -> None:
    mart = tree / "dbt_project/models/marts/FACT_Revenue.yml"
    text = mart.read_text()
    start = text.index("- name: TaxRate")
    at = text.index("            classification: non_personal\n", start)
    mart.write_text(text[:at] + text[at + len("            classification: non_personal\n") :])
    assert "FACT_Revenue.TaxRate: unclassified (no meta.classification)" in _gate(tree)[1]


def test_the_listing_filters_and_its_json() -> None:
    result = runner.invoke(
        app, ["catalog", "list", "--json", "--store", "postgres", "--class", "pci"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [(e["dataset"], e["field"]) for e in data["entries"]] == [("paymentinstrument", "pan")]
    assert set(data["summary"]) == {"postgres"}
    assert (
        data["summary"]["postgres"]["pci"] == 1 and data["summary"]["postgres"]["credential"] == 1
    )
    assert runner.invoke(app, ["catalog", "list", "--class", "secret"]).exit_code == 2


# --- recognizers on values written by hand -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4111 1111 1111 1111", True),  # the Visa test number: Luhn-valid
        ("4111111111111111", True),
        ("5500-0000-0000-0004", True),
        ("4111111111111112", False),  # one digit off: Luhn fails
        ("1234567812345670", False),  # Luhn-valid, but no card network starts with 1
        ("411111111111", False),  # 12 digits: too short
        ("not a card", False),
    ],
)
def test_card_numbers(value: str, expected: bool) -> None:
    assert is_card_number(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("DE89 3704 0044 0532 0130 00", True),
        ("GB82WEST12345698765432", True),
        ("DE89370400440532013001", False),  # mod-97 check fails
        ("GB82WEST12345698765433", False),
        ("XX00123", False),
    ],
)
def test_ibans(value: str, expected: bool) -> None:
    assert is_iban(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("john.doe@stripe.com", True),
        (" Jane_Roe+tag@mail.example.co.uk ", True),
        ("john.doe@", False),
        ("a@b", False),
        ("see john.doe@stripe.com", False),
        ("payments_api", False),
    ],
)
def test_emails(value: str, expected: bool) -> None:
    assert is_email(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("+33 6 12 34 56 78", True),
        ("+4930123456", True),
        ("(555) 123-4567", True),
        ("001-555-123-4567x890", True),
        ("06 12 34 56 78", True),
        ("12345678", False),  # a bare run of digits: an id or an amount
        ("2024-01-15", False),  # a date
        ("10.0.1.7", False),
        ("203.0.113.45", False),  # an IPv4 address has 4 groups of up to 12 digits
        ("06.12.34.56.78", True),
        ("1234.5678", False),
        ("+33", False),
    ],
)
def test_phones(value: str, expected: bool) -> None:
    assert is_phone(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("192.168.1.10", True),
        ("10.0.3.7/32", True),
        ("2001:db8::1", True),
        ("256.1.1.1", False),
        ("10.0.1", False),
        ("12345", False),
    ],
)
def test_ip_addresses(value: str, expected: bool) -> None:
    assert is_ip_address(value) is expected


def test_scan_rows_reports_contradictions_clear_text_and_unknown_fields() -> None:
    entries = [
        Entry("documents", "Doc", "_id", DataClass.NON_PERSONAL),
        Entry("documents", "Doc", "note", DataClass.NON_PERSONAL),
        Entry("documents", "Doc", "email", DataClass.PII),
        Entry("documents", "Doc", "lines.text", DataClass.NON_PERSONAL),
        Entry("documents", "Doc", "where", DataClass.PII_QUASI),
    ]
    rows = [
        {
            "_id": 1,
            "note": "card 4111 1111 1111 1111",  # inside text: not a card value
            "email": b"\x01ciphertext",
            "lines": [{"text": "ok"}, {"text": "4111111111111111"}],
            "where": '{"ip": "10.0.0.1", "contact": "a.b@example.org"}',
            "surprise": "x",
        },
        {"_id": 2, "note": "x@example.com", "email": "clear@example.com", "lines": []},
    ]
    report = ScanReport(limit=10)
    scan_rows(report, "documents", "Doc", entries, rows)
    found = {(f.level, f.field, f.found): (f.matches, f.sampled) for f in report.findings}
    assert found == {
        ("contradiction", "note", "email"): (1, 2),
        ("contradiction", "lines.text", "card_number"): (1, 2),
        ("contradiction", "where.contact", "email"): (1, 1),
        ("info", "email", "clear text"): (1, 2),
        ("unclassified", "surprise", "not in the catalog"): (1, 1),
    }
    assert report.sampled == {"documents": 11}


# --- a scan of a real PostgreSQL ---------------------------------------------------------------------


def test_scan_flags_emails_planted_in_a_non_personal_column(
    loaded, settings, database, monkeypatch
) -> None:
    s = settings.model_copy(update={"pg_database": database})
    before = scan(s, stores=["postgres"], limit=50)
    assert before.skipped == []
    assert before.datasets == {"postgres": 17}  # the public tables, Consent included
    assert before.contradictions == []  # the brief's records hold nothing their class denies

    merchants = loaded.execute("SELECT ID FROM Merchant ORDER BY ID LIMIT 3").fetchall()
    for (merchant_id,) in merchants:
        loaded.execute(
            "UPDATE Merchant SET Name = %s WHERE ID = %s",
            (f"owner{merchant_id}@example.com", merchant_id),
        )
    after = scan(s, stores=["postgres"], limit=50)
    (finding,) = after.contradictions
    assert (finding.dataset, finding.field, finding.declared, finding.found) == (
        "merchant",
        "name",
        "non_personal",
        "email",
    )
    assert finding.matches == 3
    # Through the command line: --strict turns the contradiction into exit 1, counts only printed.
    monkeypatch.setattr("stripe_platform.cli.governance.settings", lambda: s)
    cli = runner.invoke(
        app, ["catalog", "scan", "--store", "postgres", "--limit", "50", "--strict", "--json"]
    )
    assert cli.exit_code == 1, cli.output
    assert "example.com" not in cli.output
    assert json.loads(cli.output)["contradictions"] == 1


def test_scan_reads_documents_and_the_lake(settings, docdb, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docdb["Merchant"].insert_many(
        [
            {"oltp_id": 1, "name": "Cafe", "industry": "Food", "rating": {"average": 4.0}},
            {"oltp_id": 2, "name": "+33 6 12 34 56 78", "industry": "x", "rating": {"average": 3}},
        ]
    )
    docdb["Customer"].insert_one({"oltp_id": 1, "userName": "jd", "email": "jd@example.com"})
    stream = tmp_path / "lake/raw/postgres/merchant/extracted_date=2026-01-01"
    stream.mkdir(parents=True)
    pq.write_table(
        pa.table({"id": [1, 2], "name": ["Cafe", "DE89 3704 0044 0532 0130 00"]}),
        stream / "s1-0.parquet",
    )
    s = settings.model_copy(
        update={"mongodb_database": docdb.name, "lake_uri": str(tmp_path / "lake")}
    )
    report = scan(s, stores=["documents", "lake"], limit=10)
    assert report.skipped == []
    found = {(f.store, f.dataset, f.field, f.found) for f in report.contradictions}
    assert found == {
        ("documents", "Merchant", "name", "phone"),
        ("lake", "postgres.merchant", "name", "iban"),
    }
    clear = {(f.dataset, f.field) for f in report.findings if f.level == "info"}
    assert clear == {("Customer", "email")}  # pii in clear where ciphertext is expected


# --- the warehouse raw layer on each backend, and stores out of reach ------------------------------

# Two raw tables of the catalog: an e-mail planted in a non_personal column, a pii column in clear
# and a camelCase column (Snowflake stores it upper-cased: the scan must still name it as declared).
RAW_ROWS = {
    "postgres_merchant": (("id", "name"), [(1, "Cafe"), (2, "owner@example.com")]),
    "mongodb_customer": (("userName", "email"), [("jd", "jd@example.com")]),
}


def assert_raw_findings(report) -> None:
    assert report.skipped == []
    assert report.datasets == {"warehouse_raw": 2}
    found = {(f.level, f.dataset, f.field, f.found) for f in report.findings}
    assert found == {
        ("contradiction", "raw.postgres_merchant", "name", "email"),
        ("info", "raw.mongodb_customer", "email", "clear text"),
    }
    assert report.sampled == {"warehouse_raw": 6}


def test_scan_reads_the_raw_layer_on_a_postgresql_warehouse(settings, database, conn) -> None:
    from pydantic import SecretStr

    from stripe_platform.oltp import db

    conn.execute("CREATE SCHEMA raw")
    for table, (columns, rows) in RAW_ROWS.items():
        conn.execute(f'CREATE TABLE raw.{table} ("{columns[0]}" text, "{columns[1]}" text)')
        for row in rows:
            conn.execute(f"INSERT INTO raw.{table} VALUES (%s, %s)", [str(v) for v in row])
    s = settings.model_copy(
        update={
            "warehouse": "postgres",
            "warehouse_dsn": SecretStr(db.conninfo(settings, database=database, with_key=False)),
        }
    )
    assert_raw_findings(scan(s, stores=["warehouse_raw"], limit=10))


def test_scan_reads_the_raw_layer_on_snowflake(settings, snowflake_server, tmp_path) -> None:
    import snowflake.connector
    from pydantic import SecretStr

    server = snowflake_server
    s = settings.model_copy(
        update={
            "home": tmp_path,
            "warehouse": "snowflake",
            "snowflake_account": server["account"],
            "snowflake_user": server["user"],
            "snowflake_password": SecretStr(server["password"]),
            "snowflake_database": "SCAN_TEST",
            "snowflake_host": server["host"],
            "snowflake_port": server["port"],
            "snowflake_protocol": "http",
        }
    )
    with snowflake.connector.connect(**{**server, "database": "SCAN_TEST"}) as sf:
        cursor = sf.cursor()
        cursor.execute("CREATE SCHEMA IF NOT EXISTS RAW")
        for table, (columns, rows) in RAW_ROWS.items():
            names = ", ".join(f'"{c.upper()}" VARCHAR' for c in columns)
            cursor.execute(f'CREATE OR REPLACE TABLE RAW."{table.upper()}" ({names})')
            for row in rows:
                values = ", ".join(f"'{v}'" for v in row)
                cursor.execute(f'INSERT INTO RAW."{table.upper()}" VALUES ({values})')
    assert_raw_findings(scan(s, stores=["warehouse_raw"], limit=10))


def test_scan_lists_stores_not_built_unreachable_or_unreadable(settings, tmp_path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    lake = tmp_path / "lake"
    s = settings.model_copy(
        update={
            "pg_port": free_port,
            "warehouse": "duckdb",
            "warehouse_path": tmp_path / "never-built.duckdb",
            "lake_uri": str(lake),
        }
    )
    report = scan(s, stores=["postgres", "lake", "warehouse_raw"], limit=10)
    assert report.datasets == {}
    postgres, lake_skip, warehouse = report.skipped
    assert postgres.startswith("postgres: not scanned (")
    assert lake_skip.startswith("lake: no Parquet file under ")
    assert warehouse == f"warehouse_raw: no DuckDB warehouse at {tmp_path / 'never-built.duckdb'}"

    # One stream's file damaged: named, and the other streams still scanned.
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = lake / "raw/postgres/merchant/extracted_date=2026-01-01"
    bad = lake / "raw/postgres/customer/extracted_date=2026-01-01"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1], "name": ["a@example.com"]}), good / "s1-0.parquet")
    (bad / "s1-0.parquet").write_bytes(b"not a Parquet file")
    report = scan(s, stores=["lake"], limit=10)
    (skipped,) = report.skipped
    assert skipped.startswith("lake postgres.customer: ") and "s1-0.parquet not readable" in skipped
    assert report.datasets == {"lake": 1}
    assert {(f.dataset, f.field, f.found) for f in report.contradictions} == {
        ("postgres.merchant", "name", "email")
    }
