"""TLS for docker-compose.yml's servers: a private CA and one server certificate for the names the
servers are reached by (their service names inside the compose network, ``localhost``/127.0.0.1
through the published ports). Clients verify it against ``/certs/ca.crt`` (PostgreSQL's
``sslmode=verify-full sslrootcert=``, MongoDB's ``tlsCAFile``, Kafka's truststore,
``STRIPE_PLATFORM_TLS_CA_FILE`` for the platform's own clients).

Run once by the ``certs`` service into the ``certs`` volume; an existing set is kept while its
certificate names every service (so the CA clients trust does not change between ``docker compose
up`` runs), and remade when a service was added. Beside the PEM files, the forms each server reads,
owned by the user its image runs as (a key file must not be readable by others):

  server.key / server.crt   PostgreSQL (uid 999), Airflow's api-server (root)
  mongo.pem                 MongoDB: key and certificate in one file (uid 999)
  minio/private.key, minio/public.crt   MinIO's --certs-dir (root)
  kafka.pem                 Kafka's PEM keystore (apache/kafka runs as uid 1000)
  connect.p12               Kafka Connect's REST listener, PKCS#12 (Jetty reads no PEM; the
                            Debezium image runs as uid 1001), password $CONNECT_KEYSTORE_PASSWORD
  kafka-client.properties   TLS settings for Kafka's command-line tools (the healthcheck)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from cryptography import x509

from stripe_platform.runtime.tls import (
    ensure_certificates,
    pem_keystore,
    pkcs12_keystore,
    tls_files,
)

NAMES = ("postgres", "mongo", "minio", "kafka", "connect", "airflow-api-server", "localhost")
ADDRESSES = ("127.0.0.1",)
POSTGRES_UID = 999  # the `postgres` user of the official image
MONGO_UID = 999  # the `mongodb` user of the official image
KAFKA_UID = 1000  # apache/kafka's `appuser`
CONNECT_UID = 1001  # the Debezium image's `kafka` user
KAFKA_CLIENT = (
    "security.protocol=SSL\nssl.truststore.type=PEM\nssl.truststore.location=/certs/ca.crt\n"
)


def _names_covered(directory: Path) -> bool:
    cert = x509.load_pem_x509_certificate(tls_files(directory).server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(NAMES) <= set(san.get_values_for_type(x509.DNSName))


def make_certs(
    directory: Path,
    connect_password: str,
    owner_uid: int | None = POSTGRES_UID,
) -> bool:
    """Write the CA, the server certificate and the servers' forms of it unless a set naming
    every service exists; True when written. ``owner_uid`` None (tests): nothing is chowned."""
    files = tls_files(directory)
    if files.exist() and _names_covered(directory):
        return False
    for stale in (files.ca_cert, files.server_cert, files.server_key):
        stale.unlink(missing_ok=True)
    files = ensure_certificates(
        directory, names=NAMES, addresses=ADDRESSES, ca_common_name="stripe-platform compose CA"
    )
    minio = directory / "minio"
    minio.mkdir(exist_ok=True)
    owned = {
        files.server_key: POSTGRES_UID,
        pem_keystore(files, directory / "mongo.pem"): MONGO_UID,
        pem_keystore(files, directory / "kafka.pem"): KAFKA_UID,
        pkcs12_keystore(files, directory / "connect.p12", connect_password): CONNECT_UID,
        shutil.copyfile(files.server_key, minio / "private.key"): 0,
    }
    shutil.copyfile(files.server_cert, minio / "public.crt")
    (directory / "kafka-client.properties").write_text(KAFKA_CLIENT)
    for path in owned:
        path.chmod(0o600)
    if owner_uid is not None:
        for path, uid in owned.items():
            os.chown(path, uid, uid)
    for f in (
        files.server_cert,
        files.ca_cert,
        minio / "public.crt",
        directory / "kafka-client.properties",
    ):
        f.chmod(0o644)
    return True


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/certs")
    password = os.environ.get("CONNECT_KEYSTORE_PASSWORD")
    if not password:  # docker-compose.yml's certs service passes it (a development default)
        sys.exit("CONNECT_KEYSTORE_PASSWORD is not set: the password of Connect's keystore")
    written = make_certs(target, password)
    print(f"{'created' if written else 'kept'} TLS files in {target}")
