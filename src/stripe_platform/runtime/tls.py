"""A private certificate authority and server certificate for the embedded cluster (TLS in transit).

Generated once on first start and kept beside the cluster, so clients can verify the server with
``sslmode=verify-full sslrootcert=<home>/tls/ca.crt``. Every server the platform starts (PostgreSQL,
FerretDB, the API, Airflow's api-server, Kafka and Kafka Connect) presents this one certificate and
listens with TLS only; ``security/tls_scan.py`` proves it. The same files in the forms Java wants:
:func:`pem_keystore` (Kafka: key and chain in one PEM file) and :func:`pkcs12_keystore` (Kafka
Connect's REST server, Jetty, which reads no PEM).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stripe_platform.config import Settings

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

VALIDITY = dt.timedelta(days=825)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    def exist(self) -> bool:
        return self.ca_cert.exists() and self.server_cert.exists() and self.server_key.exists()


def tls_files(directory: Path) -> TlsFiles:
    return TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stripe-platform (development)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ensure_certificates(
    directory: Path,
    *,
    names: tuple[str, ...] = ("localhost",),
    addresses: tuple[str, ...] = ("127.0.0.1",),
    ca_common_name: str = "stripe-platform local CA",
) -> TlsFiles:
    """Create a CA and a server certificate for ``names``/``addresses`` (the embedded cluster's
    localhost and 127.0.0.1 by default) unless they already exist."""
    files = tls_files(directory)
    if files.exist():
        return files
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(ca_common_name)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in names]
                + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    # The CA key is not kept: nothing else is ever signed with it.
    files.server_key.write_bytes(_pem_key(server_key))
    files.server_key.chmod(0o600)
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


def ca_file(settings: Settings) -> Path:
    """The CA a client of the platform's own servers verifies them against: the setting
    (compose's /certs/ca.crt), else the embedded runtime's."""
    return settings.tls_ca_file or tls_files(settings.home_dir / "tls").ca_cert


def _write_private(path: Path, data: bytes) -> Path:
    """Write a file holding a private key: created 0600, replaced whole."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    partial.replace(path)
    return path


def pem_keystore(files: TlsFiles, target: Path) -> Path:
    """The server key and certificate in one PEM file (Kafka's ``ssl.keystore.type=PEM``)."""
    return _write_private(target, files.server_key.read_bytes() + files.server_cert.read_bytes())


def pkcs12_keystore(files: TlsFiles, target: Path, password: str) -> Path:
    """The server key and certificate as a PKCS#12 keystore (Jetty, Kafka Connect's REST)."""
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    data = pkcs12.serialize_key_and_certificates(
        b"server",
        key,
        cert,
        [ca],
        serialization.BestAvailableEncryption(password.encode()),
    )
    return _write_private(target, data)
