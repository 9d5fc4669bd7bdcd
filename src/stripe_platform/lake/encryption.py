"""Server-side encryption of the prod lake's bucket with the lake's KMS key (SSE-KMS by default).

Whole objects, on top of the raw layer's value-level encryption (``security.subjects_layer``),
which is what protects personal values and lets one customer be erased. SSE-KMS covers the
disks and S3's own copies: every object written to the bucket (data files, superseded
generations, sync state), whatever client writes it, is encrypted under the KMS key the platform's
lake KEK alias names, with an S3 Bucket Key so a sync is not a KMS call per object.

What it does not do: S3 decrypts for every principal the bucket and the key policy let read, so it
does not protect against a leaked credential, a copy taken through the API, or an export; it
cannot erase one customer (the key is the whole lake's); and a stand-in (moto) records the
configuration and labels objects without encrypting anything, so a test of it proves the
configuration and the labels, not the cryptography.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError


class LakeEncryptionError(PlatformError, RuntimeError):
    """The lake's bucket encryption cannot be set; the message names the bucket or key."""


def lake_bucket(settings: Settings) -> str:
    root = settings.lake_root
    if not root.startswith("s3://"):
        raise LakeEncryptionError(
            f"the lake {root} is not on S3: server-side encryption is a bucket setting"
        )
    return urlsplit(root).netloc


def lake_key_alias(settings: Settings) -> str:
    """The lake's KEK alias in KMS (``<kms_key_alias_prefix>/lake``)."""
    return f"{settings.kms_key_alias_prefix}/lake"


def bucket_encryption(key_arn: str) -> dict[str, Any]:
    """The bucket's default encryption: SSE-KMS under ``key_arn``, with an S3 Bucket Key."""
    return {
        "Rules": [
            {
                "ApplyServerSideEncryptionByDefault": {
                    "SSEAlgorithm": "aws:kms",
                    "KMSMasterKeyID": key_arn,
                },
                "BucketKeyEnabled": True,
            }
        ]
    }


def apply_bucket_encryption(settings: Settings, s3: Any, kms: Any) -> dict[str, Any]:
    """Make SSE-KMS with the lake's key the default of the lake's bucket (idempotent); returns the
    configuration applied. ``s3`` and ``kms`` are boto3 clients. The alias is resolved to its
    key's ARN, so the bucket keeps naming the same key if the alias is later moved."""
    bucket, alias = lake_bucket(settings), lake_key_alias(settings)
    try:
        arn = kms.describe_key(KeyId=alias)["KeyMetadata"]["Arn"]
    except kms.exceptions.NotFoundException as exc:
        raise LakeEncryptionError(
            f"KMS key {alias} does not exist: create the lake's key first (stripe-platform keys "
            "list creates the store keys)"
        ) from exc
    config = bucket_encryption(arn)
    try:
        s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration=config)
    except s3.exceptions.NoSuchBucket as exc:
        raise LakeEncryptionError(f"lake bucket {bucket} does not exist") from exc
    return config
