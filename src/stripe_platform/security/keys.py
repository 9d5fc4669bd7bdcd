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

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from stripe_platform.errors import PlatformError

STORES = ("postgres", "documents", "lake", "warehouse", "subjects")


class KeyError_(PlatformError, RuntimeError):
    """A key operation failed. The message names the key (and the object when there is one)."""

    def __init__(self, message: str, *, key: str | None = None, obj: str | None = None) -> None:
        self.key, self.obj = key, obj
        where = "".join(
            [
                f" (key {key}" if key else "",
                f", object {obj}" if key and obj else "",
                f" (object {obj}" if obj and not key else "",
                ")" if key or obj else "",
            ]
        )
        super().__init__(message + where)


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


def key_provider(settings) -> KeyProvider:
    """The provider of the active settings (``settings.key_backend``)."""
    raise NotImplementedError("implemented by the keys work (issue 20)")


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
