import subprocess
import sys

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
