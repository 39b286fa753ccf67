"""Storage by URI: one resolver turns a local path or ``s3://bucket/prefix`` into a filesystem + path.

No other module branches on local vs S3; they call these helpers with URIs (bytes, text, JSON, JSON Lines,
Parquet, whole folders); local writes are atomic (temp file + rename). The S3 endpoint comes from
``AWS_ENDPOINT_URL`` (or ``configure_s3``), credentials from the usual AWS variables.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_S3_OPTIONS: dict[str, Any] = {}


def configure_s3(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Set the S3 endpoint/region used for s3:// URIs (overrides ``AWS_ENDPOINT_URL``)."""
    _S3_OPTIONS.clear()
    if endpoint_url:
        _S3_OPTIONS["endpoint_url"] = endpoint_url
    if region:
        _S3_OPTIONS["region"] = region


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in ("s3", "s3a")


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = _S3_OPTIONS.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    region = _S3_OPTIONS.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "http"
        kwargs["allow_bucket_creation"] = True
    return pafs.S3FileSystem(**kwargs)


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
    """Write atomically on local disk (temp file + rename); S3 puts are atomic already."""
    fs, path = resolve(uri)
    _ensure_parent(fs, path)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


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
    for file_uri in list_files(uri):
        rel = resolve(file_uri)[1][len(base):].lstrip("/")
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(file_uri))
    return local_dir


def local_path(uri: str) -> str | None:
    """The local filesystem path of a local URI, or None for remote storage."""
    return None if is_remote(uri) else resolve(uri)[1]


def pyarrow_target(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for handing a URI to pyarrow / Ray Data readers and writers."""
    return resolve(uri)
