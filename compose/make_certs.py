"""TLS for docker-compose.yml's PostgreSQL: a private CA and a server certificate for the names the
server is reached by (``postgres`` inside the compose network, ``localhost``/127.0.0.1 through the
published port). Clients verify it with ``sslmode=verify-full sslrootcert=/certs/ca.crt``.

Run once by the ``certs`` service into the ``certs`` volume; an existing set is kept, so the CA
clients trust does not change between ``docker compose up`` runs. The key is handed to the
postgres image's user (uid 999), which PostgreSQL requires of ``ssl_key_file``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAMES = ("postgres", "localhost")
ADDRESSES = ("127.0.0.1",)
VALIDITY = dt.timedelta(days=825)
POSTGRES_UID = 999  # the `postgres` user of the official image


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stripe-platform (docker compose)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_certs(directory: Path, owner_uid: int | None = POSTGRES_UID) -> bool:
    """Write ca.crt, server.crt and server.key unless all three exist; True when written."""
    files = [directory / n for n in ("ca.crt", "server.crt", "server.key")]
    if all(f.exists() for f in files):
        return False
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("stripe-platform compose CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(n) for n in NAMES] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in ADDRESSES
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(NAMES[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = files
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    if owner_uid is not None:
        os.chown(key_file, owner_uid, owner_uid)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for f in (cert_file, ca_file):
        f.chmod(0o644)
    return True


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/certs")
    print(f"{'created' if make_certs(target) else 'kept'} TLS files in {target}")
