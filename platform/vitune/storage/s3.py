"""S3 for ``vitune.storage``: the endpoint s3:// URIs use, its client and pyarrow filesystem, and object writes.

Writes are all-or-nothing: one PUT checked by its MD5, or, past ``MULTIPART_THRESHOLD``, a multipart upload that
is aborted on any failure, so a failed write never leaves a truncated object or orphaned parts. The conditional
writes a lease needs are S3's own: ``If-None-Match: *`` to create, ``If-Match`` to replace or delete. The
endpoint comes from ``AWS_ENDPOINT_URL`` (or ``configure_s3``), credentials from the usual AWS variables.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

T = TypeVar("T")

_S3_OPTIONS: dict[str, Any] = {}
_S3_CLIENTS: dict[tuple, Any] = {}
_S3_CLIENTS_LOCK = threading.Lock()
# Objects up to this size go up in one PUT; larger ones as a multipart upload of parts this size.
MULTIPART_THRESHOLD = 64 * 2**20
MULTIPART_PART_SIZE = 64 * 2**20
S3_MAX_ATTEMPTS = 6  # botocore's standard retry mode: exponential backoff with jitter, ~20 s in all


def configure_s3(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Set the S3 endpoint/region used for s3:// URIs (overrides ``AWS_ENDPOINT_URL``)."""
    _S3_OPTIONS.clear()
    if endpoint_url:
        _S3_OPTIONS["endpoint_url"] = endpoint_url
    if region:
        _S3_OPTIONS["region"] = region


@contextlib.contextmanager
def s3_endpoint(endpoint_url: str | None) -> Iterator[None]:
    """Inside the block, s3:// URIs use ``endpoint_url`` (None: as configured already); restored after."""
    saved = dict(_S3_OPTIONS)
    if endpoint_url:
        _S3_OPTIONS["endpoint_url"] = endpoint_url
    try:
        yield
    finally:
        _S3_OPTIONS.clear()
        _S3_OPTIONS.update(saved)


def _endpoint_region() -> tuple[str | None, str]:
    endpoint = _S3_OPTIONS.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    region = _S3_OPTIONS.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region


def filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for the configured endpoint and region."""
    endpoint, region = _endpoint_region()
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "http"
        kwargs["allow_bucket_creation"] = True
    return pafs.S3FileSystem(**kwargs)


def client() -> Any:
    """A boto3 S3 client for the configured endpoint (cached per endpoint, region and process)."""
    endpoint, region = _endpoint_region()
    key = (endpoint, region, os.getpid())
    with _S3_CLIENTS_LOCK:
        if key not in _S3_CLIENTS:
            # deferred: boto3 is slow to import and only S3 writes need it
            import boto3
            from botocore.config import Config

            _S3_CLIENTS[key] = boto3.client(
                "s3", endpoint_url=endpoint, region_name=region,
                config=Config(retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS}))
        return _S3_CLIENTS[key]


def bucket_key(uri: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://bucket/key`` URI; a URI that names no object raises."""
    parsed = urlparse(str(uri))
    if not parsed.netloc or not parsed.path.strip("/"):
        raise ValueError(f"storage URI {uri!r} names no object (s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


def _md5_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 - S3's integrity check, not security


def put(uri: str, data: bytes) -> None:
    """One PUT (the server checks the MD5) or, past ``MULTIPART_THRESHOLD``, a multipart upload that is
    aborted when any part or the completion fails, so no truncated object or orphaned parts are left."""
    bucket, key = bucket_key(uri)
    s3 = client()
    if len(data) <= MULTIPART_THRESHOLD:
        s3.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=_md5_b64(data))
        return
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        view = memoryview(data)
        parts = []
        for number, start in enumerate(range(0, len(data), MULTIPART_PART_SIZE), start=1):
            chunk = view[start:start + MULTIPART_PART_SIZE]
            etag = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                  Body=bytes(chunk), ContentMD5=_md5_b64(chunk))["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                     MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            log.warning("upload of %s failed: multipart upload %s aborted", uri, upload_id)
        except Exception as exc:  # noqa: BLE001 - the upload's own error is the one to raise
            log.error("upload of %s failed and aborting multipart upload %s failed too (%s): a bucket "
                      "lifecycle rule for incomplete uploads will remove its parts", uri, upload_id, exc)
        raise


def _precondition_failed(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def put_if_absent(uri: str, data: bytes) -> str | None:
    """A PUT with ``If-None-Match: *``: the new object's ETag, or None when an object is there already."""
    bucket, key = bucket_key(uri)
    try:
        return client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
    except Exception as exc:
        if _precondition_failed(exc):
            return None
        raise


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """``(content, ETag)`` of an object, or None when it does not exist."""
    bucket, key = bucket_key(uri)
    s3 = client()
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except s3.exceptions.NoSuchKey:
        return None
    return obj["Body"].read(), obj["ETag"]


def _unless_changed(call: Callable[[], T], changed: T) -> T:
    """``call()`` (a request with ``If-Match``), or ``changed`` when the object is another version or gone."""
    try:
        return call()
    except Exception as exc:
        if _precondition_failed(exc) or "NoSuchKey" in str(exc):
            return changed
        raise


def put_if_match(uri: str, data: bytes, version: str) -> str | None:
    """A PUT with ``If-Match: version``, atomic on the server: the new ETag, or None if the object changed."""
    bucket, key = bucket_key(uri)
    return _unless_changed(
        lambda: client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"], None)


def delete_if_match(uri: str, version: str) -> bool:
    """A DELETE with ``If-Match: version``; whether the object was deleted."""
    bucket, key = bucket_key(uri)

    def delete() -> bool:
        client().delete_object(Bucket=bucket, Key=key, IfMatch=version)
        return True

    return _unless_changed(delete, False)
