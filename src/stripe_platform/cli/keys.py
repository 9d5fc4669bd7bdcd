"""`keys`: key-encryption keys, data keys, rotation, rewrap, re-encryption, audit and coverage."""

from __future__ import annotations

from stripe_platform.cli.common import group

keys_app = group("Encryption keys: list, rotate, rewrap, re-encrypt, audit, coverage.")
