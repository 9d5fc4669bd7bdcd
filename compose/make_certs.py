"""TLS for docker-compose.yml's PostgreSQL: a private CA and a server certificate for the names the
server is reached by (``postgres`` inside the compose network, ``localhost``/127.0.0.1 through the
published port). Clients verify it with ``sslmode=verify-full sslrootcert=/certs/ca.crt``.

Run once by the ``certs`` service into the ``certs`` volume; an existing set is kept, so the CA
clients trust does not change between ``docker compose up`` runs. The key is handed to the
postgres image's user (uid 999), which PostgreSQL requires of ``ssl_key_file``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from stripe_platform.runtime.tls import ensure_certificates, tls_files

NAMES = ("postgres", "localhost")
ADDRESSES = ("127.0.0.1",)
POSTGRES_UID = 999  # the `postgres` user of the official image


def make_certs(directory: Path, owner_uid: int | None = POSTGRES_UID) -> bool:
    """Write ca.crt, server.crt and server.key unless all three exist; True when written.
    The same generator as the embedded cluster's, for the compose host names."""
    if tls_files(directory).exist():
        return False
    files = ensure_certificates(
        directory, names=NAMES, addresses=ADDRESSES, ca_common_name="stripe-platform compose CA"
    )
    if owner_uid is not None:
        os.chown(files.server_key, owner_uid, owner_uid)
    for f in (files.server_cert, files.ca_cert):
        f.chmod(0o644)
    return True


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/certs")
    print(f"{'created' if make_certs(target) else 'kept'} TLS files in {target}")
