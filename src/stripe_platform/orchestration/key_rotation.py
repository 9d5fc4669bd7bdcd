"""The job of the ``security_key_rotation`` DAG, callable without Airflow: the brief's "keys per
database and per table with regular rotation" on a schedule.

One run: every OLTP table's data key gets a new version, the background re-encryption moves the
table's ciphertexts to it and retires the old version (``security.reencrypt``: committed batches,
reads go on, a failed run resumes where it stopped at the next try), then every store's KEK is
rotated and all data keys are re-wrapped under it (the data is not touched). Each step is audited
in ``keys.key_event`` by the envelope itself.
"""

from __future__ import annotations

from typing import Any

from stripe_platform.config import Settings


def rotate_table_keys(settings: Settings) -> dict[str, Any]:
    """New data-key versions for the OLTP's encrypted tables, then their data re-encrypted."""
    from stripe_platform.oltp import db
    from stripe_platform.security.envelope import shared_envelope
    from stripe_platform.security.reencrypt import reencrypt

    envelope = shared_envelope(settings)
    rotated = {}
    for table in db.ENCRYPTED_COLUMNS:
        key = envelope.rotate(f"postgres/{table}")
        rotated[key.scope] = key.version
    result = reencrypt(settings)
    return {
        "rotated": rotated,
        "rows_reencrypted": result.rows_by_table,
        "retired": {s.scope: list(s.retired) for s in result.scopes},
        "seconds": round(result.seconds, 3),
    }


def rewrap_data_keys(settings: Settings) -> dict[str, Any]:
    """Every store's KEK rotated and every data key re-wrapped under the new version."""
    from stripe_platform.security.envelope import shared_envelope

    result = shared_envelope(settings).rewrap()
    return {
        "kek_versions": result.kek_versions,
        "data_keys": result.count,
        "seconds": round(result.seconds, 3),
    }
