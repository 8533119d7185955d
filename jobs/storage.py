"""boto3 access to S3-compatible storage, shared by producer and worker.

Clients are cached per process and thread-safe for the calls used here. The
listing is a generator over pages, so memory stays flat for any prefix size.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from jobs.errors import InputError, StorageNotFoundError, TransientError
from jobs.layout import SUFFIX_FORMATS, is_kernel_artefact
from jobs.s3uri import S3URI
from jobs.settings import Settings

IMAGE_SUFFIXES = tuple(SUFFIX_FORMATS)  # as worker.imageio reads
READ_FORMATS = "PNG, JPEG, TIFF, WebP, JPEG 2000, BMP"
"""The formats those suffixes stand for, as messages name them."""


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str | None, region: str, pool: int):  # type: ignore[no-untyped-def]
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(
            max_pool_connections=pool,
            retries={"max_attempts": 5, "mode": "adaptive"},
            connect_timeout=10,
            read_timeout=60,
        ),
    )


def s3_client(settings: Settings):  # type: ignore[no-untyped-def]
    """A boto3 S3 client for the configured endpoint (cached per process).

    Raises:
        TransientError: the credentials are incomplete (AWS_ACCESS_KEY_ID without AWS_SECRET_ACCESS_KEY, or the
            other way round): boto3 refuses them while building the client, before any request could say so, and
            the message is the one missing credentials get (:func:`translate`).
    """
    try:
        return _client(settings.s3_endpoint_url, settings.s3_region, max(10, settings.io_threads * 2))
    except (NoCredentialsError, PartialCredentialsError) as exc:
        where = f"S3 at {settings.s3_endpoint_url}" if settings.s3_endpoint_url else "AWS S3"
        raise translate(exc, where) from exc  # the cause kept for 'deblur doctor', which words it apart


PERMANENT_ERRORS = {
    "InvalidObjectState": "archived in a storage class that is not read directly (Glacier, Deep Archive); restore "
                          "it first, then 'deblur retry JOB --failed'",
    "KeyTooLongError": "the key is longer than the store allows",
    "InvalidObjectName": "the store refuses the key's name",
    "KMS.DisabledException": "its encryption key (KMS) is disabled; enable it, then 'deblur retry JOB --failed'",
    "KMS.KMSInvalidStateException": "its encryption key (KMS) cannot be used; check it, then 'deblur retry JOB "
                                    "--failed'",
}
"""S3 error codes no retry mends, with what they mean: the image they strike fails alone instead of the whole
batch being retried until it gives up (every other unknown code is taken for a passing fault)."""


def _is_missing(exc: ClientError) -> bool:
    code = exc.response.get("Error", {}).get("Code", "")
    return code in {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def translate(exc: Exception, what: str) -> Exception:
    """Map a boto error to the project's tree: missing → StorageNotFoundError, else transient."""
    if isinstance(exc, ClientError):
        if _is_missing(exc):
            return StorageNotFoundError(f"{what}: not found")
        code = exc.response.get("Error", {}).get("Code", "")
        if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            return StorageNotFoundError(f"{what}: access denied ({code}); check the AWS credentials")
        if code in PERMANENT_ERRORS:  # no retry mends these: the image fails alone, saying what to do
            return InputError(f"{what}: {PERMANENT_ERRORS[code]} (S3 error {code})")
        return TransientError(f"{what}: S3 error {code}: {exc}")
    if isinstance(exc, EndpointConnectionError):
        return TransientError(f"{what}: cannot reach the S3 endpoint ({exc}); check DEBLUR_S3_ENDPOINT_URL")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        # transient for a worker (its tasks wait for the operator to fix the environment), but say what to set
        return TransientError(
            f"{what}: no S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "and DEBLUR_S3_ENDPOINT_URL for a store other than AWS; to try deblur on this machine, "
            "start the local stack first with 'deblur stack up'"
        )
    if isinstance(exc, BotoCoreError):
        return TransientError(f"{what}: {exc}")
    return exc


def check_bucket(client, bucket: str) -> None:  # type: ignore[no-untyped-def]
    """Raise StorageNotFoundError naming the bucket when it does not exist or is not accessible."""
    try:
        client.head_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError) as exc:
        err = translate(exc, f"bucket {bucket!r}")
        if isinstance(err, StorageNotFoundError):
            raise StorageNotFoundError(
                f"bucket {bucket!r} does not exist or is not accessible; create it or fix the URI"
            ) from None
        raise err from None


def object_exists(client, uri: S3URI) -> bool:  # type: ignore[no-untyped-def]
    try:
        client.head_object(Bucket=uri.bucket, Key=uri.key)
        return True
    except ClientError as exc:
        if _is_missing(exc):
            return False
        raise translate(exc, str(uri)) from None


def iter_objects(client, prefix: S3URI, page_size: int = 1000) -> Iterator[tuple[S3URI, int]]:  # type: ignore[no-untyped-def]
    """Yield (uri, size) for every object under ``prefix``, one listing page at a time."""
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(
            Bucket=prefix.bucket, Prefix=prefix.key, PaginationConfig={"PageSize": page_size}
        ):
            for obj in page.get("Contents", ()):
                yield S3URI(prefix.bucket, obj["Key"]), int(obj.get("Size", 0))
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"listing {prefix}") from None


def is_image_key(key: str) -> bool:
    return key.lower().endswith(IMAGE_SUFFIXES)


def is_photograph(key: str) -> bool:
    """Whether a key (or file name) is an image deblur restores: one it reads, and not a kernel PNG it wrote
    next to an earlier output (:func:`jobs.layout.is_kernel_artefact`)."""
    return is_image_key(key) and not is_kernel_artefact(key)


def get_bytes(client, uri: S3URI) -> bytes:  # type: ignore[no-untyped-def]
    try:
        return client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, str(uri)) from None


def put_bytes(client, uri: S3URI, data: bytes, content_type: str = "application/octet-stream") -> None:  # type: ignore[no-untyped-def]
    """Upload ``data``; the store checks it against a SHA-256 sent with it, and keeps that for :func:`stored_sha256`.

    A store that takes no such checksums is served as boto3's own setting says: with
    ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` (or ``request_checksum_calculation`` in the AWS config
    file) none is sent, and ``deblur verify --quick`` reads those outputs back instead.
    """
    checksum = {} if client.meta.config.request_checksum_calculation == "when_required" else {
        "ChecksumAlgorithm": "SHA256"}
    try:
        client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type, **checksum)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, str(uri)) from None


def stored_sha256(client, uri: S3URI) -> str | None:  # type: ignore[no-untyped-def]
    """The hex SHA-256 the store keeps for an object (one HEAD request, no data read).

    None when it keeps none: the object was uploaded without one, or in parts
    (a checksum of checksums), or the store does not keep checksums.

    Raises:
        StorageNotFoundError: no such object.
    """
    try:
        head = client.head_object(Bucket=uri.bucket, Key=uri.key, ChecksumMode="ENABLED")
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, str(uri)) from None
    value = head.get("ChecksumSHA256")
    if not value or "-" in value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    if re.search(r"-\d+\"?$", head.get("ETag", "")) and head.get("ChecksumType") != "FULL_OBJECT":
        # uploaded in parts: a store that does not mark its checksum as composite (moto before 5.1.x) still
        # keeps a checksum of the parts' checksums, which is no file's SHA-256
        return None
    try:
        return base64.b64decode(value, validate=True).hex()
    except ValueError:
        return None
