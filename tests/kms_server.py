"""Pytest plugin (listed in conftest's pytest_plugins): a real moto KMS server over HTTP, shared per
session, for the aws-kms key provider's tests. Never import its fixtures into test modules."""
