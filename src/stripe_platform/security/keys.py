"""Where encryption keys come from: the one seam key management plugs into (ARCHITECTURE §6).

The hierarchy (docs/security.md):
- a **key-encryption key (KEK)** per store (``postgres``, ``documents``, ``lake``, ``warehouse``,
  ``subjects``) lives in the key provider and never leaves it on ``aws-kms``: the local keyring
  (development only, a 0600 file under the platform home) or AWS KMS (prod);
- **data keys (DEKs)** per store and table (scope ``<store>/<table>``, e.g. ``postgres/customer``)
  and per data subject (``subjects/<customer id>``) are random 256-bit keys, stored only wrapped by
  their store's KEK (``security.envelope``), in the key schema that data roles cannot read;
- every ciphertext names its key (scope and DEK version), so rotating a KEK is a rewrap of the DEKs
  and never touches the data.

This module holds the contract (errors, value types, the provider protocol) and the two providers.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stripe_platform.errors import PlatformError

log = logging.getLogger(__name__)

STORES = ("postgres", "documents", "lake", "warehouse", "subjects")


class KeyError_(PlatformError, RuntimeError):
    """A key operation failed. The message names the key (and the object when there is one)."""

    def __init__(self, message: str, *, key: str | None = None, obj: str | None = None) -> None:
        self.message, self.key, self.obj = message, key, obj
        where = "".join(
            [
                f" (key {key}" if key else "",
                f", object {obj}" if key and obj else "",
                f" (object {obj}" if obj and not key else "",
                ")" if key or obj else "",
            ]
        )
        super().__init__(message + where)

    def naming(self, obj: str | None) -> KeyError_:
        """The same error naming the object it happened on (when the caller knows it)."""
        if obj is None or self.obj is not None:
            return self
        return type(self)(self.message, key=self.key, obj=obj)


class KeyUnavailable(KeyError_):
    """The key does not exist, was revoked or disabled: nothing is decrypted or written."""


class KeyShredded(KeyUnavailable):
    """A data subject's key was destroyed (crypto-shredding): their data is unreadable for good."""


class UnknownKeyVersion(KeyError_):
    """A ciphertext names a key version this platform does not hold."""


class TamperedCiphertext(KeyError_):
    """Authentication failed (GCM tag, or the ciphertext's header): the data was altered."""


class KmsUnreachable(KeyError_):
    """The key provider could not be reached; nothing falls back to plaintext."""


KeyState = Literal["enabled", "retired", "destroyed"]


@dataclass(frozen=True)
class KeyVersion:
    """One version of a key-encryption key held by the provider."""

    key_id: str  # the platform's name, e.g. "postgres"; the provider maps it to its own id
    version: int  # 1, 2, ...: rotation adds one
    created_at: dt.datetime
    state: KeyState = "enabled"
    provider_ref: str = ""  # e.g. the KMS key ARN of this version; "" for the local keyring


@dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted under one version of a KEK (what is stored; never the key itself)."""

    key_id: str
    version: int
    blob: bytes


class KeyProvider(Protocol):
    """A place that holds KEKs and wraps/unwraps data keys under them.

    ``context`` is bound to the wrapped key (AES-GCM associated data locally, the KMS encryption
    context on AWS): a wrapped key moved to another scope does not unwrap.
    """

    name: str  # "local" | "aws-kms"

    def ensure_kek(self, key_id: str) -> KeyVersion:
        """The current version of ``key_id``, created (version 1) when absent."""
        ...

    def rotate_kek(self, key_id: str) -> KeyVersion:
        """Create and return a new current version; older versions still unwrap until retired."""
        ...

    def kek_versions(self, key_id: str) -> list[KeyVersion]: ...

    def retire_kek(self, key_id: str, version: int) -> None:
        """Stop a version from unwrapping (after a rewrap left nothing under it)."""
        ...

    def wrap(self, key_id: str, plaintext: bytes, context: Mapping[str, str]) -> WrappedKey:
        """Encrypt a data key under the current version of ``key_id``."""
        ...

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        """Raises KeyUnavailable, UnknownKeyVersion, TamperedCiphertext or KmsUnreachable."""
        ...


KEK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _check_kek_name(key_id: str) -> None:
    if not KEK_NAME.match(key_id):
        raise KeyUnavailable(f"{key_id!r} is not a key-encryption key name (a store: {STORES})")


class LocalKeyring:
    """Development only: the KEKs are random 256-bit keys in one JSON file (mode 0600, directory
    0700) under the platform home. Anyone who can read that file holds every key: production uses
    AWS KMS, where the KEKs never leave the service."""

    name = "local"
    _warned = False  # one warning a process, not one a provider

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        if not LocalKeyring._warned:
            LocalKeyring._warned = True
            log.warning(
                "key provider: local keyring %s (development only, not for production: "
                "use STRIPE_PLATFORM_KEY_PROVIDER=aws-kms)",
                self.path,
            )

    # -- the file ----------------------------------------------------------------------------------
    def _load(self) -> dict[str, list[dict]]:
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            return {}
        if mode & 0o077:
            raise KeyUnavailable(
                f"the local keyring {self.path} is accessible to group/others "
                f"(mode {stat.S_IMODE(mode):04o}): refused; it must be 0600 "
                f"(chmod 600 {self.path}) and its keys treated as exposed",
                key="keyring",
            )
        try:
            return json.loads(self.path.read_text())["keks"]
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyUnavailable(
                f"the local keyring {self.path} is not readable ({exc})", key="keyring"
            ) from None

    def _save(self, keks: dict[str, list[dict]]) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        partial = directory / f".{self.path.name}.{os.getpid()}.partial"
        text = json.dumps({"note": "development keyring: not for production", "keks": keks})
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        partial.replace(self.path)  # atomic: a reader sees the old file or the new one

    def _mutate(self, key_id: str, change) -> KeyVersion:
        """Load, change and save under a lock shared with other processes."""
        _check_kek_name(key_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.parent.chmod(0o700)
        with self._lock, open(self.path.parent / ".keyring.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keks = self._load()
            versions = keks.setdefault(key_id, [])
            result, changed = change(versions)
            if changed:
                self._save(keks)
            return result

    @staticmethod
    def _version(entry: dict, key_id: str) -> KeyVersion:
        return KeyVersion(
            key_id, entry["version"], dt.datetime.fromisoformat(entry["created_at"]), entry["state"]
        )

    def _new(self, versions: list[dict], key_id: str) -> KeyVersion:
        entry = {
            "version": max((v["version"] for v in versions), default=0) + 1,
            "key": base64.b64encode(os.urandom(32)).decode(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "state": "enabled",
        }
        versions.append(entry)
        return self._version(entry, key_id)

    # -- the protocol ------------------------------------------------------------------------------
    def ensure_kek(self, key_id: str) -> KeyVersion:
        def change(versions):
            if versions:
                return self._version(versions[-1], key_id), False
            return self._new(versions, key_id), True

        return self._mutate(key_id, change)

    def rotate_kek(self, key_id: str) -> KeyVersion:
        return self._mutate(key_id, lambda versions: (self._new(versions, key_id), True))

    def kek_versions(self, key_id: str) -> list[KeyVersion]:
        return [self._version(e, key_id) for e in self._load().get(key_id, [])]

    def retire_kek(self, key_id: str, version: int) -> None:
        def change(versions):
            entry = self._entry(versions, key_id, version)
            if entry is versions[-1]:
                raise KeyUnavailable(
                    "the current version cannot be retired: rotate first",
                    key=f"{key_id} v{version}",
                )
            entry["state"] = "retired"
            return self._version(entry, key_id), True

        self._mutate(key_id, change)

    def _entry(self, versions: list[dict], key_id: str, version: int) -> dict:
        if not versions:
            raise KeyUnavailable(
                f"no key-encryption key {key_id} in the local keyring {self.path}", key=key_id
            )
        for entry in versions:
            if entry["version"] == version:
                return entry
        raise UnknownKeyVersion(
            f"the local keyring {self.path} holds no such version", key=f"{key_id} v{version}"
        )

    @staticmethod
    def _aad(key_id: str, version: int, context: Mapping[str, str]) -> bytes:
        return json.dumps(
            {"kek": key_id, "kek_version": version, **context}, sort_keys=True
        ).encode()

    def wrap(self, key_id: str, plaintext: bytes, context: Mapping[str, str]) -> WrappedKey:
        current = self.ensure_kek(key_id)
        entry = self._entry(self._load()[key_id], key_id, current.version)
        nonce = os.urandom(12)
        sealed = AESGCM(base64.b64decode(entry["key"])).encrypt(
            nonce, plaintext, self._aad(key_id, current.version, context)
        )
        return WrappedKey(key_id, current.version, nonce + sealed)

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        name = f"{wrapped.key_id} v{wrapped.version}"
        entry = self._entry(self._load().get(wrapped.key_id, []), wrapped.key_id, wrapped.version)
        if entry["state"] != "enabled":
            raise KeyUnavailable(f"key-encryption key version is {entry['state']}", key=name)
        try:
            return AESGCM(base64.b64decode(entry["key"])).decrypt(
                wrapped.blob[:12],
                wrapped.blob[12:],
                self._aad(wrapped.key_id, wrapped.version, context),
            )
        except InvalidTag:
            raise TamperedCiphertext(
                "the wrapped data key does not authenticate (altered, or moved from another "
                f"scope than {dict(context)})",
                key=name,
            ) from None


# KMS error codes -> the platform's errors.
_KMS_UNAVAILABLE = {
    "DisabledException",
    "KMSInvalidStateException",
    "KeyUnavailableException",
    "AccessDeniedException",
}
_KMS_TAMPERED = {"InvalidCiphertextException", "IncorrectKeyException"}
_KMS_STATES: dict[str, KeyState] = {"Enabled": "enabled", "Disabled": "retired"}
_VERSION_TAG = "stripe-platform:version"


class _NotFound(KeyUnavailable):
    """KMS has no such key or alias."""


class _AliasTaken(KeyError_):
    """Another process created the same KEK version first."""


class AwsKmsProvider:
    """AWS KMS: the KEK of store S is the KMS key behind alias ``<prefix>/S``. Every version is a
    KMS key of its own (tagged with its version) with a permanent alias ``<prefix>/S/v<N>``;
    rotation creates a key, gives it the next version alias and repoints ``<prefix>/S`` to it, so
    data keys wrapped under an older version still unwrap (through its own alias) until that
    version is retired (disabled). Nothing lists the account's aliases: the current key's tag gives
    N, and versions 1..N have their aliases.

    The key state is checked before each unwrap (describe_key): a disabled version is refused by
    the platform itself, not only by KMS (moto's KMS does not enforce disabled keys)."""

    name = "aws-kms"

    def __init__(self, settings, *, client=None) -> None:
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "kms",
                region_name=settings.kms_region,
                endpoint_url=settings.kms_endpoint_url,
                config=Config(
                    connect_timeout=3,
                    read_timeout=10,
                    retries={"max_attempts": 2, "mode": "standard"},
                ),
            )
        self._kms = client
        self.prefix = settings.kms_key_alias_prefix
        self._current: dict[str, KeyVersion] = {}
        self._lock = threading.Lock()

    def _alias(self, key_id: str, version: int | None = None) -> str:
        return f"{self.prefix}/{key_id}" + ("" if version is None else f"/v{version}")

    def _call(self, operation: str, key: str, **kwargs):
        """One KMS call, its failures as the platform's errors naming the key."""
        from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:
            return getattr(self._kms, operation)(**kwargs)
        except (BotoConnectionError, HTTPClientError) as exc:
            raise KmsUnreachable(f"AWS KMS is unreachable ({exc})", key=key) from None
        except NoCredentialsError:
            raise KmsUnreachable("no AWS credentials for KMS", key=key) from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            message = exc.response.get("Error", {}).get("Message", "")
            if code in _KMS_TAMPERED:
                raise TamperedCiphertext(
                    f"KMS refused the wrapped data key ({code}: altered, or moved from another "
                    "scope)",
                    key=key,
                ) from None
            if code == "NotFoundException":
                raise _NotFound(f"KMS: no such key ({message})", key=key) from None
            if code == "AlreadyExistsException":
                raise _AliasTaken(f"KMS: {message}", key=key) from None
            if code in _KMS_UNAVAILABLE:
                raise KeyUnavailable(f"KMS: {code}: {message}", key=key) from None
            raise KeyError_(f"KMS {operation} failed ({code}: {message})", key=key) from None

    def _state(self, key_id: str, version: int, meta: dict) -> KeyVersion:
        state = _KMS_STATES.get(meta["KeyState"], "destroyed")
        return KeyVersion(key_id, version, meta["CreationDate"], state, meta["Arn"])

    def _read_current(self, key_id: str) -> KeyVersion | None:
        """The version the alias points to (from its key's tag); None when the KEK is absent."""
        try:
            meta = self._call("describe_key", key_id, KeyId=self._alias(key_id))["KeyMetadata"]
        except _NotFound:
            return None
        tags = self._call("list_resource_tags", key_id, KeyId=meta["KeyId"])["Tags"]
        version = next((int(t["TagValue"]) for t in tags if t["TagKey"] == _VERSION_TAG), None)
        if version is None:
            raise KeyUnavailable(
                f"the KMS key behind {self._alias(key_id)} has no {_VERSION_TAG} tag", key=key_id
            )
        return self._state(key_id, version, meta)

    def _create(self, key_id: str, version: int) -> KeyVersion:
        name = f"{key_id} v{version}"
        meta = self._call(
            "create_key",
            name,
            Description=f"stripe-platform key-encryption key {key_id} v{version}",
            KeyUsage="ENCRYPT_DECRYPT",
            KeySpec="SYMMETRIC_DEFAULT",
            Tags=[
                {"TagKey": "stripe-platform:kek", "TagValue": key_id},
                {"TagKey": _VERSION_TAG, "TagValue": str(version)},
            ],
        )["KeyMetadata"]
        try:
            self._call(
                "create_alias",
                name,
                AliasName=self._alias(key_id, version),
                TargetKeyId=meta["KeyId"],
            )
        except _AliasTaken:
            # Another process created this version first: drop ours.
            self._call("schedule_key_deletion", name, KeyId=meta["KeyId"], PendingWindowInDays=7)
            raise
        return self._state(key_id, version, meta)

    def ensure_kek(self, key_id: str) -> KeyVersion:
        _check_kek_name(key_id)
        with self._lock:
            current = self._read_current(key_id)
            if current is None:
                try:
                    current = self._create(key_id, 1)
                    self._call(
                        "create_alias",
                        key_id,
                        AliasName=self._alias(key_id),
                        TargetKeyId=current.provider_ref,
                    )
                except _AliasTaken:  # created meanwhile by another process
                    current = self._read_current(key_id)
            self._current[key_id] = current
            return current

    def rotate_kek(self, key_id: str) -> KeyVersion:
        _check_kek_name(key_id)
        with self._lock:
            current = self._read_current(key_id)
        if current is None:  # the first version is the new one
            return self.ensure_kek(key_id)
        with self._lock:
            new = self._create(key_id, current.version + 1)
            self._call(
                "update_alias", key_id, AliasName=self._alias(key_id), TargetKeyId=new.provider_ref
            )
            self._current[key_id] = new
            return new

    def kek_versions(self, key_id: str) -> list[KeyVersion]:
        _check_kek_name(key_id)
        current = self._read_current(key_id)
        if current is None:
            return []
        return [self._describe(key_id, v) for v in range(1, current.version + 1)]

    def _describe(self, key_id: str, version: int) -> KeyVersion:
        name = f"{key_id} v{version}"
        try:
            meta = self._call("describe_key", name, KeyId=self._alias(key_id, version))
        except _NotFound:
            if self._read_current(key_id) is not None:
                raise UnknownKeyVersion("KMS holds no such version", key=name) from None
            raise
        return self._state(key_id, version, meta["KeyMetadata"])

    def retire_kek(self, key_id: str, version: int) -> None:
        current = self.ensure_kek(key_id)
        if version == current.version:
            raise KeyUnavailable(
                "the current version cannot be retired: rotate first", key=f"{key_id} v{version}"
            )
        kms_key = self._describe(key_id, version).provider_ref
        self._call("disable_key", f"{key_id} v{version}", KeyId=kms_key.rsplit("/", 1)[-1])

    def wrap(self, key_id: str, plaintext: bytes, context: Mapping[str, str]) -> WrappedKey:
        current = self._current.get(key_id) or self.ensure_kek(key_id)
        blob = self._call(
            "encrypt",
            f"{key_id} v{current.version}",
            KeyId=current.provider_ref,
            Plaintext=plaintext,
            EncryptionContext=dict(context),
        )["CiphertextBlob"]
        return WrappedKey(key_id, current.version, blob)

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        name = f"{wrapped.key_id} v{wrapped.version}"
        version = self._describe(wrapped.key_id, wrapped.version)
        if version.state != "enabled":
            raise KeyUnavailable(f"the KMS key {version.provider_ref} is {version.state}", key=name)
        return self._call(
            "decrypt",
            name,
            KeyId=version.provider_ref,
            CiphertextBlob=wrapped.blob,
            EncryptionContext=dict(context),
        )["Plaintext"]


def key_provider(settings) -> KeyProvider:
    """The provider of the active settings (``settings.key_backend``)."""
    if settings.key_backend == "aws-kms":
        return AwsKmsProvider(settings)
    return LocalKeyring(settings.home_dir / "keys" / "keyring.json")


def pii_key(settings) -> str:
    """LEGACY (before issue 20): the one symmetric PII key of the local keyring file or
    ``STRIPE_PLATFORM_PII_KEY``. Kept only so databases encrypted with it stay readable until the
    background re-encryption moves them to per-table data keys; new code never calls it."""
    import secrets

    if settings.pii_key is not None:
        return settings.pii_key.get_secret_value()
    keyring = settings.home_dir / "keys" / "pii.key"
    if not keyring.exists():
        keyring.parent.mkdir(parents=True, exist_ok=True)
        keyring.parent.chmod(0o700)
        keyring.write_text(secrets.token_urlsafe(48) + "\n")
        keyring.chmod(0o600)
    return keyring.read_text().strip()
