"""The one settings object. Every backend choice is made here, from the environment.

Variables use the prefix ``STRIPE_PLATFORM_`` (``STRIPE_PLATFORM_PROFILE=compose``); ``MONGODB_URI`` is
also read without the prefix because that is what MongoDB users already export.

Relative paths (the home, the DuckDB file, a local lake, the ``.env`` file) are resolved once, when
the settings are read, against the project directory (the checkout the package is installed from,
``paths.REPO_ROOT``), never against the current directory: every process (a command run from
elsewhere, Airflow's tasks, dbt) then finds the same home. The project directory is where the
platform's own assets (``sql/``, ``airbyte/``, ``dbt_project/``) already come from, and it needs no
record of its own, unlike a "directory of the first start" would.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from stripe_platform.errors import PlatformError
from stripe_platform.paths import REPO_ROOT

ENV_PREFIX = "STRIPE_PLATFORM_"
Profile = Literal["embedded", "compose", "prod"]
DEFAULT_HOME = Path(".platform")
LAKE_FORMS = (
    "accepted forms: a local directory, or s3://bucket/prefix (credentials from the AWS chain)"
)
# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def project_path(path: Path) -> Path:
    """``path`` made absolute: ``~`` expanded, a relative path taken from the project directory."""
    path = path.expanduser()
    return (path if path.is_absolute() else REPO_ROOT / path).resolve()


def _unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot be (created and) written, judged without creating anything."""
    existing = directory
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as exc:  # e.g. a parent that cannot be searched
        return f"{existing} cannot be reached ({exc.strerror})"
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


class SettingsError(PlatformError, ValueError):
    """A setting has a value the platform cannot use; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=REPO_ROOT / ".env",
        extra="ignore",
        validate_default=True,
    )

    profile: Profile = Field("embedded", description="Which runtime backs each concern.")
    home: Path = Field(DEFAULT_HOME, description="Where the embedded runtime keeps its state.")

    # OLTP ----------------------------------------------------------------------------------------
    pg_dsn: SecretStr | None = Field(
        None, description="libpq DSN of the OLTP database (compose/prod; embedded derives it)."
    )
    pg_port: int | None = Field(
        None, ge=1024, le=65535, description="Embedded cluster port (default: a free one)."
    )
    pg_database: str = Field("stripe", pattern=r"^[a-z_][a-z0-9_]*$")
    pg_fsync: bool = Field(True, description="Turn off only for throwaway test clusters.")
    pg_os_user: str = Field(
        "postgres", description="Unprivileged OS user that runs the embedded cluster under root."
    )
    partition_months_ahead: int = Field(3, ge=0, le=60)
    partition_retention_months: int = Field(
        36, ge=1, description="Transaction partitions older than this are detached to `archive`."
    )

    # Documents -----------------------------------------------------------------------------------
    mongodb_uri: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices(f"{ENV_PREFIX}MONGODB_URI", "MONGODB_URI"),
        description="A MongoDB server; unset means the embedded document server (FerretDB on the "
        "embedded PostgreSQL cluster).",
    )
    mongodb_database: str = Field("stripe", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    docstore_port: int | None = Field(
        None, ge=1024, le=65535, description="The embedded document server's port (default: free)."
    )

    # Ingestion, warehouse and lake -----------------------------------------------------------------
    ingestion: Literal["embedded", "airbyte"] | None = Field(
        None,
        description="Who runs syncs (default: airbyte on prod, the embedded engine elsewhere).",
    )
    warehouse: Literal["duckdb", "postgres", "snowflake"] | None = Field(
        None, description="Raw layer and marts (default: snowflake on prod, duckdb elsewhere)."
    )
    warehouse_path: Path | None = Field(
        None, description="DuckDB file (default <home>/warehouse/warehouse.duckdb)."
    )
    warehouse_dsn: SecretStr | None = Field(None, description="libpq DSN when warehouse=postgres.")
    snowflake_account: str | None = None
    snowflake_user: str | None = None
    snowflake_password: SecretStr | None = None
    snowflake_database: str = "ANALYTICS"
    snowflake_warehouse: str | None = None
    snowflake_role: str | None = None
    snowflake_schema: str | None = Field(
        None,
        description="The session's default schema. The raw layer and the marts name their schemas "
        "in full; fakesnow (the stand-in) needs one for MERGE in a new session.",
    )
    snowflake_host: str | None = Field(None, description="Only for a local Snowflake stand-in.")
    snowflake_port: int | None = None
    snowflake_protocol: Literal["https", "http"] = "https"
    lake_uri: str | None = Field(None, description="Lake root: a directory or s3://bucket/prefix.")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, a stand-in)."
    )

    # Orchestration -------------------------------------------------------------------------------
    alert_webhook_url: SecretStr | None = Field(
        None, description="Failed Airflow tasks are POSTed here as JSON (unset: logged only)."
    )

    # Machine learning ------------------------------------------------------------------------------
    mlflow_tracking_uri: SecretStr | None = Field(
        None,
        description="MLflow tracking server or store URI; unset means the home's own store "
        "(<home>/mlflow/mlflow.db, artifacts in <home>/mlflow/artifacts).",
    )
    ml_model_name: str = Field(
        "fraud",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
        description="The fraud model's registered name (its champion: models:/<name>@champion).",
    )

    # Real time: the stream scorer and the API ---------------------------------------------------
    stream_source: Literal["embedded", "kafka"] | None = Field(
        None,
        description="Where the stream scorer reads changes: the embedded cluster's replication "
        "slot, or Debezium's topics on Kafka (default: kafka on compose/prod, embedded elsewhere).",
    )
    stream_alert_threshold: float = Field(
        0.9, ge=0, le=1, description="A payment scored at or above this raises a fraud alert."
    )
    stream_lag_alert_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="The supervisor alerts when the stream's slot holds more WAL than this.",
    )
    stream_lag_alert_seconds: float = Field(
        60.0, gt=0, description="...or when its commit-to-score delay (p95) exceeds this."
    )
    kafka_bootstrap_servers: str | None = Field(
        None,
        description="Kafka brokers (host:port,...); the embedded profile's test stack sets its own.",
    )
    kafka_topic_prefix: str = Field(
        "stripe", pattern=r"^[A-Za-z0-9._-]+$", description="Debezium's topic.prefix."
    )
    kafka_consumer_group: str = Field("fraud-stream", pattern=r"^[A-Za-z0-9._-]+$")
    api_host: str = Field("127.0.0.1", description="Where `stripe-platform api` listens.")
    api_port: int = Field(8443, ge=1, le=65535)
    tls_ca_file: Path | None = Field(
        None,
        description="The CA certificate that signs the platform's own servers (Kafka, Kafka "
        "Connect, Airflow, MinIO on compose); unset: the embedded runtime's <home>/tls/ca.crt.",
    )

    # Keys and encryption at rest (security/keys.py, docs/security.md) ---------------------------
    key_provider: Literal["local", "aws-kms"] | None = Field(
        None,
        description="Where the key-encryption keys live: the local keyring file (development "
        "only) or AWS KMS. Unset: local on embedded/compose, aws-kms on prod.",
    )
    kms_endpoint_url: str | None = Field(
        None, description="Only for a KMS stand-in; unset means AWS's regional endpoint."
    )
    kms_region: str = Field("eu-west-1", pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$")
    kms_key_alias_prefix: str = Field(
        "alias/stripe-platform",
        pattern=r"^alias/[A-Za-z0-9/_-]+$",
        description="KMS aliases of the KEKs: <prefix>/<store> (the current version).",
    )
    encrypt_at_rest: bool = Field(
        True,
        description="Field-level encryption of the catalog's personal/card fields on write. "
        "Turn off only to measure its cost (bench).",
    )
    # Access control (issue 21: security/policy.py, api/auth.py, docs/access.md) -----------------
    access_policy: Path = Field(
        Path("access/policy.yaml"),
        description="The access policy as code: roles, users, temporary grants, MFA rules.",
    )
    api_public_url: str | None = Field(
        None,
        description="The API's address as browsers and the IdP reach it (SAML ACS and metadata "
        "URLs, cookies); unset: https://<api_host>:<api_port>.",
    )
    saml_idp_metadata: str | None = Field(
        None,
        description="The identity provider's SAML metadata: a file path or an https:// URL. "
        "Unset: no SSO (the API's SSO routes answer 503; bearer tokens still work).",
    )
    saml_sp_entity_id: str | None = Field(
        None, description="The API's SAML entity id; unset: <api_public_url>/saml/metadata."
    )
    saml_groups_attribute: str = Field(
        "groups", description="The assertion attribute that carries the user's IdP groups."
    )
    api_session_seconds: int = Field(
        8 * 3600, ge=60, le=7 * 24 * 3600, description="An SSO session's lifetime."
    )

    # Audit trail and monitoring (issue 22: audit/, docs/audit.md) ---------------------------------
    audit_retention_days: int = Field(
        365, ge=1, description="How long audit records are kept (PCI-DSS: one year)."
    )
    audit_hot_days: int = Field(
        90,
        ge=1,
        description="How long audit records stay immediately available in PostgreSQL (PCI-DSS: "
        "three months); older ones are in the lake only until the retention ends.",
    )
    audit_checkpoint_records: int = Field(
        10_000, ge=1, description="A signed checkpoint of each stream at least every N records."
    )
    audit_lake_object_lock_days: int = Field(
        365,
        ge=1,
        description="prod: the audit lake bucket's Object Lock default retention (compliance mode).",
    )

    # Privacy and compliance (issue 23: compliance/, docs/compliance.md) ---------------------------
    privacy_gdpr_days: int = Field(
        30, ge=1, description="GDPR: a data-subject request is answered within one month."
    )
    privacy_ccpa_days: int = Field(
        45, ge=1, description="CCPA: a consumer request is answered within 45 days."
    )
    breach_notify_hours: int = Field(
        72,
        ge=1,
        description="GDPR Art. 33: a personal-data breach is notified to the authority within 72 hours.",
    )
    dashboard_trend_days: int = Field(
        30, ge=1, description="The compliance dashboard's trend window (days of daily controls)."
    )

    pii_key: SecretStr | None = Field(
        None,
        min_length=32,
        description="LEGACY single PII key of databases encrypted before per-table data keys; "
        "unset means the local dev keyring file under `home`.",
    )

    @field_validator("home", "warehouse_path", "tls_ca_file", "access_policy")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else project_path(value)

    @field_validator("lake_uri")
    @classmethod
    def _lake_root(cls, value: str | None) -> str | None:
        """A local directory that can be created and written, or ``s3://bucket/prefix``: anything
        else would only fail at the first write of a sync, far from the variable's name."""
        if value is None or not value.strip():
            return None
        value = value.strip()
        if "://" in value:
            parts = urlsplit(value)
            if parts.scheme != "s3":
                problem = f"{parts.scheme}:// is not a lake"
            elif not _BUCKET.match(parts.netloc):
                problem = (
                    "no valid bucket name after s3:// (a user or password does not belong there)"
                )
            elif parts.query or parts.fragment:
                problem = "an s3:// root takes no ?query or #fragment"
            else:
                return value.rstrip("/")
            raise ValueError(f"{problem}; {LAKE_FORMS}")
        root = project_path(Path(value))
        problem = _unwritable(root)
        if problem:
            raise ValueError(f"{problem}; {LAKE_FORMS}")
        return str(root)

    @model_validator(mode="after")
    def _backends_reachable(self) -> Settings:
        if self.profile in ("compose", "prod") and self.pg_dsn is None:
            raise ValueError(
                f"{ENV_PREFIX}PG_DSN is required when {ENV_PREFIX}PROFILE={self.profile} "
                "(the embedded cluster only runs on the `embedded` profile)"
            )
        if self.profile != "embedded" and self.mongodb_uri is None:
            raise ValueError(
                f"MONGODB_URI is required when {ENV_PREFIX}PROFILE={self.profile} "
                "(the embedded document server only runs on the `embedded` profile)"
            )
        if self.warehouse_backend == "postgres" and self.warehouse_dsn is None:
            raise ValueError(
                f"{ENV_PREFIX}WAREHOUSE_DSN is required when {ENV_PREFIX}WAREHOUSE=postgres"
            )
        if self.warehouse_backend == "snowflake" and not (
            self.snowflake_account and self.snowflake_user
        ):
            raise ValueError(
                f"{ENV_PREFIX}SNOWFLAKE_ACCOUNT and {ENV_PREFIX}SNOWFLAKE_USER are required when the "
                "warehouse is snowflake"
            )
        if self.profile == "prod" and self.key_backend != "aws-kms":
            raise ValueError(
                f"{ENV_PREFIX}KEY_PROVIDER=local is refused when {ENV_PREFIX}PROFILE=prod "
                "(the local keyring is for development only): use aws-kms"
            )
        return self

    @property
    def key_backend(self) -> str:
        return self.key_provider or ("aws-kms" if self.profile == "prod" else "local")

    @property
    def stream_backend(self) -> str:
        return self.stream_source or ("embedded" if self.profile == "embedded" else "kafka")

    @property
    def home_dir(self) -> Path:
        """The home, absolute (resolved once, against the project directory)."""
        return self.home

    @property
    def home_origin(self) -> str:
        """Where the home's value comes from, for ``status``."""
        if "home" in self.model_fields_set:
            return f"{ENV_PREFIX}HOME"
        return f"default: {DEFAULT_HOME} in the project directory {REPO_ROOT}"

    @property
    def ingestion_backend(self) -> str:
        return self.ingestion or ("airbyte" if self.profile == "prod" else "embedded")

    @property
    def warehouse_backend(self) -> str:
        return self.warehouse or ("snowflake" if self.profile == "prod" else "duckdb")

    @property
    def warehouse_file(self) -> Path:
        """The DuckDB file, in a directory of its own that can be private (the home cannot always:
        the cluster's OS user must reach ``<home>/pg``). A home made before keeps its file."""
        if self.warehouse_path is not None:
            return self.warehouse_path
        legacy = self.home_dir / "warehouse.duckdb"
        return legacy if legacy.exists() else self.home_dir / "warehouse" / "warehouse.duckdb"

    @property
    def api_url(self) -> str:
        """The API's public base URL (no trailing slash)."""
        if self.api_public_url:
            return self.api_public_url.rstrip("/")
        host = f"[{self.api_host}]" if ":" in self.api_host else self.api_host
        return f"https://{host}:{self.api_port}"

    @property
    def lake_root(self) -> str:
        return self.lake_uri or str(self.home_dir / "lake")

    @model_validator(mode="after")
    def _tls_only(self) -> Settings:
        """TLS on every connection to an endpoint (issue 20): plain http only for a stand-in on
        this machine (moto, fakesnow, a test webhook). The URL is not echoed: it may hold a token."""
        endpoints = {
            "S3_ENDPOINT_URL": self.s3_endpoint_url,
            "KMS_ENDPOINT_URL": self.kms_endpoint_url,
            "ALERT_WEBHOOK_URL": _secret(self.alert_webhook_url),
            "MLFLOW_TRACKING_URI": _secret(self.mlflow_tracking_uri),
        }
        for name, url in endpoints.items():
            if not url or not url.strip():
                continue
            parts = urlsplit(url.strip())
            scheme = parts.scheme.lower()
            if name == "MLFLOW_TRACKING_URI" and scheme not in ("http", "https"):
                continue  # a local store (sqlite:///, file:) or a URI scheme MLflow resolves
            if scheme == "https" or (scheme == "http" and is_loopback(parts.hostname)):
                continue
            raise ValueError(
                f"{ENV_PREFIX}{name} must be an https:// URL ({scheme or 'no'}:// given for "
                f"host {parts.hostname or '?'}): plain http is accepted only for a stand-in on "
                "127.0.0.1, ::1 or localhost"
            )
        if self.snowflake_protocol == "http" and not is_loopback(self.snowflake_host):
            raise ValueError(
                f"{ENV_PREFIX}SNOWFLAKE_PROTOCOL=http is accepted only for a local stand-in: "
                f"{ENV_PREFIX}SNOWFLAKE_HOST must then be 127.0.0.1, ::1 or localhost, not "
                f"{self.snowflake_host or 'Snowflake itself'!r}"
            )
        return self


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost: a stand-in on this machine, where plain http may stay."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _describe(error: dict) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    variable = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
    if field == "mongodb_uri":
        variable = "MONGODB_URI"
    given = error.get("input")
    shown = (
        "" if field.endswith(("_key", "_dsn", "_uri")) or isinstance(given, dict) else f"={given!r}"
    )
    ctx = error.get("ctx") or {}
    if "expected" in ctx:
        return f"{variable}{shown} is not valid: accepted values are {ctx['expected']}"
    message = error["msg"].removeprefix("Value error, ")
    return message if not field else f"{variable}{shown} is not valid: {message}"


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, turning validation errors into one readable message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
