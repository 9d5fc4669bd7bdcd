"""The audit trail's lake bucket on prod: S3 Object Lock in COMPLIANCE mode (issue 22, docs/audit.md).

The trail's lake copy (audit/trail.py export_lake) goes to a bucket of its own beside the lake's,
``<lake bucket>-audit`` with the lake's prefix: Object Lock and its default retention are whole-bucket
settings, and the raw lake must stay erasable (crypto-shredding, superseded generations), which a
compliance lock would forbid. Locally (a directory lake) the trail goes under the lake root and
nothing is locked.

The configuration, rendered by :func:`bucket_configuration` and applied by :func:`apply`:
- the bucket created with Object Lock enabled (S3 also turns versioning on; set explicitly too);
- default retention COMPLIANCE for ``audit_lake_object_lock_days``: no principal, the root account
  included, can delete a version or shorten its lock before it ends;
- all public access blocked;
- a lifecycle rule: current objects expire after ``audit_retention_days`` (a delete marker) and
  noncurrent versions one day after that, so S3 removes a version once retention and lock are both
  over; the retention job's own deletes of old days are delete markers until then.
:func:`check` reads the bucket back and names every setting that differs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError

AUDIT_SUFFIX = "-audit"


class ObjectLockError(PlatformError, RuntimeError):
    """The audit bucket cannot be configured, or is configured otherwise; the message says how."""


def audit_bucket_root(settings: Settings) -> str:
    """The trail's lake root: ``s3://<lake bucket>-audit/<lake prefix>`` on S3, else the lake root."""
    root = settings.lake_root
    if not root.startswith("s3://"):
        return root
    parts = urlsplit(root)
    return f"s3://{parts.netloc}{AUDIT_SUFFIX}{parts.path}".rstrip("/")


def audit_bucket(settings: Settings) -> str:
    root = audit_bucket_root(settings)
    if not root.startswith("s3://"):
        raise ObjectLockError(
            f"the lake {settings.lake_root} is not on S3: Object Lock is an S3 bucket setting"
        )
    return urlsplit(root).netloc


def bucket_configuration(settings: Settings, *, region: str = "us-east-1") -> dict[str, Any]:
    """The audit bucket's configuration as the boto3 calls' arguments, one key a call."""
    bucket = audit_bucket(settings)
    create: dict[str, Any] = {"Bucket": bucket, "ObjectLockEnabledForBucket": True}
    if region != "us-east-1":  # S3 refuses a LocationConstraint of us-east-1
        create["CreateBucketConfiguration"] = {"LocationConstraint": region}
    return {
        "create_bucket": create,
        "put_bucket_versioning": {
            "Bucket": bucket,
            "VersioningConfiguration": {"Status": "Enabled"},
        },
        "put_object_lock_configuration": {
            "Bucket": bucket,
            "ObjectLockConfiguration": {
                "ObjectLockEnabled": "Enabled",
                "Rule": {
                    "DefaultRetention": {
                        "Mode": "COMPLIANCE",
                        "Days": settings.audit_lake_object_lock_days,
                    }
                },
            },
        },
        "put_public_access_block": {
            "Bucket": bucket,
            "PublicAccessBlockConfiguration": {
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        },
        "put_bucket_lifecycle_configuration": {
            "Bucket": bucket,
            "LifecycleConfiguration": {
                "Rules": [
                    {
                        "ID": "audit-retention",
                        "Status": "Enabled",
                        "Filter": {"Prefix": ""},
                        "Expiration": {"Days": settings.audit_retention_days},
                        "NoncurrentVersionExpiration": {"NoncurrentDays": 1},
                    }
                ]
            },
        },
    }


def apply(settings: Settings, s3: Any, *, region: str = "us-east-1") -> dict[str, Any]:
    """Create (if missing) and configure the audit bucket with ``s3`` (a boto3 client); idempotent.
    An existing bucket made without Object Lock is refused: S3 cannot be trusted to add it to a
    bucket whose older objects would stay unlocked. Returns the configuration applied."""
    config = bucket_configuration(settings, region=region)
    bucket = config["create_bucket"]["Bucket"]
    # Looked up first: in us-east-1 CreateBucket on a bucket one already owns succeeds silently.
    try:
        s3.head_bucket(Bucket=bucket)
        exists = True
    except s3.exceptions.ClientError:
        exists = False
    if not exists:
        s3.create_bucket(**config["create_bucket"])
    else:
        try:
            enabled = s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
        except s3.exceptions.ClientError:
            enabled = {}
        if enabled.get("ObjectLockEnabled") != "Enabled":
            raise ObjectLockError(
                f"audit bucket {bucket} exists without Object Lock: make a new bucket (objects "
                "written before the lock would stay unlocked)"
            )
    for call in (
        "put_bucket_versioning",
        "put_object_lock_configuration",
        "put_public_access_block",
        "put_bucket_lifecycle_configuration",
    ):
        getattr(s3, call)(**config[call])
    return config


def check(settings: Settings, s3: Any) -> list[str]:
    """What differs between the audit bucket and its configuration (empty: as rendered)."""
    config = bucket_configuration(settings)
    bucket = config["create_bucket"]["Bucket"]
    problems = []
    versioning = s3.get_bucket_versioning(Bucket=bucket).get("Status")
    if versioning != "Enabled":
        problems.append(f"{bucket}: versioning is {versioning or 'off'}, not Enabled")
    try:
        lock = s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    except s3.exceptions.ClientError as exc:
        problems.append(f"{bucket}: no Object Lock configuration ({exc})")
    else:
        want = config["put_object_lock_configuration"]["ObjectLockConfiguration"]
        retention = lock.get("Rule", {}).get("DefaultRetention", {})
        # Compared field by field: S3 stand-ins report the unused unit too ("Years": 0).
        if (
            lock.get("ObjectLockEnabled") != "Enabled"
            or retention.get("Mode") != "COMPLIANCE"
            or retention.get("Days") != settings.audit_lake_object_lock_days
            or retention.get("Years")
        ):
            problems.append(f"{bucket}: Object Lock is {lock}, not {want}")
    access = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    if not all(
        access.get(k) for k in config["put_public_access_block"]["PublicAccessBlockConfiguration"]
    ):
        problems.append(f"{bucket}: public access not fully blocked ({access})")
    return problems
