import subprocess
import sys
from pathlib import Path

import pytest

from stripe_platform.config import SettingsError, load_settings


def test_defaults_select_the_embedded_profile(monkeypatch):
    monkeypatch.delenv("STRIPE_PLATFORM_PROFILE", raising=False)
    monkeypatch.delenv("MONGODB_URI", raising=False)
    s = load_settings()
    assert s.profile == "embedded"
    assert s.pg_database == "stripe"
    assert s.mongodb_uri is None


def test_unknown_profile_names_variable_and_accepted_values(monkeypatch):
    monkeypatch.setenv("STRIPE_PLATFORM_PROFILE", "staging")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "STRIPE_PLATFORM_PROFILE='staging'" in message
    assert "'embedded', 'compose' or 'prod'" in message


def test_bad_port_is_rejected_with_its_variable(monkeypatch):
    monkeypatch.setenv("STRIPE_PLATFORM_PG_PORT", "80")
    with pytest.raises(SettingsError, match="STRIPE_PLATFORM_PG_PORT='80' is not valid"):
        load_settings()


def test_non_embedded_profile_requires_a_dsn(monkeypatch):
    monkeypatch.setenv("STRIPE_PLATFORM_PROFILE", "compose")
    monkeypatch.delenv("STRIPE_PLATFORM_PG_DSN", raising=False)
    with pytest.raises(SettingsError, match="STRIPE_PLATFORM_PG_DSN is required"):
        load_settings()


def test_secrets_are_not_echoed(monkeypatch):
    monkeypatch.setenv("STRIPE_PLATFORM_PII_KEY", "short-secret")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "STRIPE_PLATFORM_PII_KEY" in str(info.value)
    assert "short-secret" not in str(info.value)


def test_cli_fails_at_start_with_a_clear_message(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "STRIPE_PLATFORM_PROFILE": "cloud", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", "status"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1
    assert "STRIPE_PLATFORM_PROFILE='cloud' is not valid" in result.stderr
    assert "Traceback" not in result.stderr


PROJECT_DIR = Path(__file__).resolve().parents[1]  # the checkout these tests run from


@pytest.mark.parametrize(
    "value",
    [
        "ftp://x",
        "file:///tmp/lake",
        "gs://bucket/lake",
        "s3://",
        "s3://Not_A_Bucket/lake",
        "s3://key:secret@bucket/lake",
        "s3://bucket/lake?region=x",
    ],
)
def test_a_lake_uri_of_another_form_stops_naming_the_variable_and_the_forms(monkeypatch, value):
    monkeypatch.setenv("STRIPE_PLATFORM_LAKE_URI", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("STRIPE_PLATFORM_LAKE_URI is not valid")
    assert "a local directory, or s3://bucket/prefix" in message
    assert "secret" not in message


def test_a_lake_directory_that_cannot_be_created_stops_naming_the_variable(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("STRIPE_PLATFORM_LAKE_URI", str(blocker / "lake"))
    with pytest.raises(
        SettingsError,
        match=f"STRIPE_PLATFORM_LAKE_URI is not valid: {blocker} is not a directory; accepted forms",
    ):
        load_settings()
    assert not (blocker.parent / "lake").exists()  # judged without creating anything


def test_accepted_lake_roots(monkeypatch, tmp_path):
    monkeypatch.setenv("STRIPE_PLATFORM_LAKE_URI", "s3://stripe-platform-lake/raw/")
    assert load_settings().lake_root == "s3://stripe-platform-lake/raw"
    monkeypatch.setenv("STRIPE_PLATFORM_LAKE_URI", str(tmp_path / "not" / "yet" / "there"))
    assert load_settings().lake_root == str(tmp_path / "not" / "yet" / "there")
    assert not (tmp_path / "not").exists()


def test_relative_paths_are_taken_from_the_project_directory_not_the_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("HOME", "WAREHOUSE_PATH", "LAKE_URI"):
        monkeypatch.delenv(f"STRIPE_PLATFORM_{name}", raising=False)
    default = load_settings()
    assert default.home_dir == PROJECT_DIR / ".platform"
    assert default.home_origin.startswith("default: .platform in the project directory")
    assert default.lake_root == str(PROJECT_DIR / ".platform" / "lake")
    s = load_settings(
        home=Path("../elsewhere/home"), warehouse_path=Path("w.duckdb"), lake_uri="lk"
    )
    assert s.home_dir == PROJECT_DIR.parent / "elsewhere" / "home"
    assert s.home_origin == "STRIPE_PLATFORM_HOME"
    assert s.warehouse_file == PROJECT_DIR / "w.duckdb"
    assert s.lake_root == str(PROJECT_DIR / "lk")
    assert list(tmp_path.iterdir()) == []
