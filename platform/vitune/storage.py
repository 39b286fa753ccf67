"""Storage by URI: one resolver turns a local path or ``s3://bucket/prefix`` into a filesystem + path.

No other module branches on local vs S3; they call these helpers with URIs (bytes, text, JSON, JSON Lines,
Parquet, whole folders). Every write is all-or-nothing: on local disk a uniquely named temp file is written,
fsynced and renamed over the target (the folder fsynced after); on S3 an object is one PUT checked by its
MD5, or, when large, a multipart upload that is aborted on any failure, so a failed write never leaves a
truncated object. ``create_if_absent`` / ``replace_if_match`` / ``delete_if_match`` are the conditional
writes a lease needs (S3 ``If-None-Match`` / ``If-Match``). Downloads refuse keys that would land outside
their target folder. The S3 endpoint comes from ``AWS_ENDPOINT_URL`` (or ``configure_s3``), credentials from
the usual AWS variables.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_S3_OPTIONS: dict[str, Any] = {}
_S3_CLIENTS: dict[tuple, Any] = {}
_S3_CLIENTS_LOCK = threading.Lock()
TEMP_MARK = ".tmp-"  # in every local temp file's name: a killed writer's leftovers are recognisable
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


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in ("s3", "s3a")


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint, region = _s3_endpoint_region()
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "http"
        kwargs["allow_bucket_creation"] = True
    return pafs.S3FileSystem(**kwargs)


def _s3_endpoint_region() -> tuple[str | None, str]:
    endpoint = _S3_OPTIONS.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    region = _S3_OPTIONS.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region


def s3_client() -> Any:
    """A boto3 S3 client for the configured endpoint (cached per endpoint, region and process)."""
    endpoint, region = _s3_endpoint_region()
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


def _bucket_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(str(uri))
    if not parsed.netloc or not parsed.path.strip("/"):
        raise ValueError(f"storage URI {uri!r} names no object (s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` URI or ``s3://bucket/key`` URI."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise ValueError(f"storage URI {uri!r} has no bucket")
        return _s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"unsupported storage URI scheme {parsed.scheme!r} in {uri!r} (use a local path or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(uri: str) -> str:
    """A local path made absolute against this process's cwd (Ray workers run elsewhere); URIs unchanged."""
    uri = str(uri)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):  # s3://, file://, runs:/, models:/ ...
        return uri
    return os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *[p.strip("/") for p in parts])
    return os.path.join(uri, *parts)


def _ensure_parent(fs: pafs.FileSystem, path: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` all-or-nothing: a reader sees the old content, or all of the new, never a part."""
    if is_remote(uri):
        _s3_put(uri, data)
        return
    _local_replace(resolve(uri)[1], data)


def _local_replace(path: str, data: bytes) -> None:
    """Temp file (unique name: concurrent writers never share one) → fsync → rename → fsync the folder."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TEMP_MARK}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (a crash after it must not bring the old name back)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms that cannot open a folder have no folder fsync either
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _md5_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 - S3's integrity check, not security


def _s3_put(uri: str, data: bytes) -> None:
    """One PUT (the server checks the MD5) or, past ``MULTIPART_THRESHOLD``, a multipart upload that is
    aborted when any part or the completion fails, so no truncated object or orphaned parts are left."""
    bucket, key = _bucket_key(uri)
    client = s3_client()
    if len(data) <= MULTIPART_THRESHOLD:
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=_md5_b64(data))
        return
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        view = memoryview(data)
        parts = []
        for number, start in enumerate(range(0, len(data), MULTIPART_PART_SIZE), start=1):
            chunk = view[start:start + MULTIPART_PART_SIZE]
            etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                      Body=bytes(chunk), ContentMD5=_md5_b64(chunk))["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
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


def create_if_absent(uri: str, data: bytes) -> str | None:
    """Create the object/file only if nothing is there; its version (S3 ETag, or a local token) or None.

    S3: a PUT with ``If-None-Match: *``. Local: ``O_CREAT | O_EXCL`` then the content, fsynced.
    """
    if is_remote(uri):
        bucket, key = _bucket_key(uri)
        try:
            return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise
    path = resolve(uri)[1]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """``(content, version)`` of an object/file, or None when it does not exist."""
    if is_remote(uri):
        bucket, key = _bucket_key(uri)
        client = s3_client()
        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            return None
        return obj["Body"].read(), obj["ETag"]
    try:
        data = Path(resolve(uri)[1]).read_bytes()
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


def replace_if_match(uri: str, data: bytes, version: str) -> str | None:
    """Overwrite only if the current version is ``version``; the new version, or None if it changed.

    S3: a PUT with ``If-Match``, atomic on the server. Local: compare then rename, not atomic between two
    processes (local stores take an OS file lock instead; see ``vitune.features.lease``).
    """
    if is_remote(uri):
        bucket, key = _bucket_key(uri)
        try:
            return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"]
        except Exception as exc:
            if _precondition_failed(exc) or "NoSuchKey" in str(exc):
                return None
            raise
    current = read_versioned(uri)
    if current is None or current[1] != version:
        return None
    _local_replace(resolve(uri)[1], data)
    return hashlib.sha256(data).hexdigest()


def delete_if_match(uri: str, version: str) -> bool:
    """Delete only if the current version is ``version`` (S3 ``If-Match`` on DELETE); whether it was deleted."""
    if is_remote(uri):
        bucket, key = _bucket_key(uri)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=version)
            return True
        except Exception as exc:
            if _precondition_failed(exc) or "NoSuchKey" in str(exc):
                return False
            raise
    current = read_versioned(uri)
    if current is None or current[1] != version:
        return False
    os.remove(resolve(uri)[1])
    return True


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(uri: str, rows: Iterable[Any]) -> None:
    """JSON Lines, one row a line, in one atomic write; values JSON cannot hold are written as strings."""
    write_text(uri, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def read_jsonl(uri: str) -> list[Any]:
    """The rows of a JSON Lines file (blank lines skipped); a bad line raises naming the file and line."""
    rows = []
    for lineno, line in enumerate(read_text(uri).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{uri} line {lineno}: not JSON ({exc})") from None
    return rows


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _to_uri(template_uri: str, path: str) -> str:
    if is_remote(template_uri):
        return f"{urlparse(template_uri).scheme}://{path}"
    return path


def list_files(uri: str, suffix: str | None = None, recursive: bool = True) -> list[str]:
    """All files under ``uri`` (sorted URIs); empty when the folder does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    out = [
        _to_uri(uri, info.path)
        for info in infos
        if info.type == pafs.FileType.File and (suffix is None or info.path.endswith(suffix))
    ]
    return sorted(out)


def file_sizes(uri: str, suffix: str | None = None, recursive: bool = True) -> dict[str, int]:
    """``{file URI: size in bytes}`` of the files under ``uri`` (one listing; empty when it does not exist)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return {}
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return {_to_uri(uri, info.path): info.size for info in infos
            if info.type == pafs.FileType.File and (suffix is None or info.path.endswith(suffix))}


def delete(uri: str) -> None:
    """Delete a file or a whole folder; missing is fine."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def write_parquet(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (a local path or s3:// prefix)."""
    local_dir = Path(local_dir)
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            write_bytes(join(uri, p.relative_to(local_dir).as_posix()), p.read_bytes())


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy every file under ``uri`` into ``local_dir``; returns the local folder."""
    local_dir = Path(local_dir)
    if not is_remote(uri):
        src = resolve(uri)[1]
        if os.path.abspath(src) != os.path.abspath(local_dir):
            shutil.copytree(src, local_dir, dirs_exist_ok=True)
        return local_dir
    _, base = resolve(uri)
    targets = []  # every key checked before the first byte is written
    for file_uri in list_files(uri):
        rel = resolve(file_uri)[1][len(base):]
        targets.append((file_uri, safe_target(local_dir, rel[1:] if rel.startswith("/") else rel)))
    for file_uri, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(file_uri))
    return local_dir


def safe_target(root: str | Path, rel: str) -> Path:
    """``root / rel`` for a key relative to a download root; refuses one that escapes it (``..`` segments,
    an absolute path, a drive or backslash form) instead of writing outside ``root``."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel) or ".." in parts:
        raise ValueError(f"refusing to download key {rel!r}: it escapes the target folder {root}")
    root = Path(root).resolve()
    target = (root / "/".join(p for p in parts if p not in ("", "."))).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"refusing to download key {rel!r}: it resolves outside {root}")
    return target


def local_path(uri: str) -> str | None:
    """The local filesystem path of a local URI, or None for remote storage."""
    return None if is_remote(uri) else resolve(uri)[1]


def pyarrow_target(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for handing a URI to pyarrow / Ray Data readers and writers."""
    return resolve(uri)
