"""Where encryption keys come from: the one seam key management plugs into.

Development uses a local keyring file under the platform home (never for production, which must set
``STRIPE_PLATFORM_PII_KEY``, later a KMS-backed provider).
"""

from __future__ import annotations

import secrets

from stripe_platform.config import Settings


def pii_key(settings: Settings) -> str:
    """The symmetric key that encrypts personal data (pgcrypto) and keys the email lookup hash."""
    if settings.pii_key is not None:
        return settings.pii_key.get_secret_value()
    keyring = settings.home_dir / "keys" / "pii.key"
    if not keyring.exists():
        keyring.parent.mkdir(parents=True, exist_ok=True)
        keyring.parent.chmod(0o700)
        keyring.write_text(secrets.token_urlsafe(48) + "\n")
        keyring.chmod(0o600)
    return keyring.read_text().strip()
