"""Pytest plugin (listed in conftest's pytest_plugins): a real moto KMS server over HTTP, shared per
session, for the aws-kms key provider's tests. Never import its fixtures into test modules."""

import logging
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer


@pytest.fixture(scope="session")
def kms_endpoint() -> Iterator[str]:
    """The URL of moto's server (KMS among its services) on a free loopback port. Tests give each
    provider an alias prefix of its own and credentials of their own (moto accepts any); nothing
    is set globally."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line a request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
