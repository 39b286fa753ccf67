"""Storage by URI: one resolver turns a local path or ``s3://bucket/prefix`` into a filesystem + path.

No other module branches on local vs S3; they call these helpers with URIs (bytes, text, JSON, JSON Lines,
Parquet, whole folders). Every write is all-or-nothing (local files: ``vitune.storage.local``, a temp file
renamed over the target; S3: ``vitune.storage.s3``, a PUT checked by its MD5 or a multipart upload aborted on
failure). ``create_if_absent`` / ``replace_if_match`` / ``delete_if_match`` are the conditional writes a lease
needs. Downloads refuse keys that would land outside their target folder. Which S3 endpoint s3:// URIs mean is
set by ``AWS_ENDPOINT_URL`` or ``vitune.storage.s3.configure_s3``.
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

from vitune.storage import local, s3


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in ("s3", "s3a")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` URI or ``s3://bucket/key`` URI."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise ValueError(f"storage URI {uri!r} has no bucket")
        return s3.filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
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


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` all-or-nothing: a reader sees the old content, or all of the new, never a part."""
    if is_remote(uri):
        s3.put(uri, data)
        return
    local.replace(resolve(uri)[1], data)


def create_if_absent(uri: str, data: bytes) -> str | None:
    """Create the object/file only if nothing is there; its version (S3 ETag, or a local token) or None.

    S3: a PUT with ``If-None-Match: *``. Local: ``O_CREAT | O_EXCL`` then the content, fsynced.
    """
    if is_remote(uri):
        return s3.put_if_absent(uri, data)
    return local.create_if_absent(resolve(uri)[1], data)


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """``(content, version)`` of an object/file, or None when it does not exist."""
    if is_remote(uri):
        return s3.read_versioned(uri)
    return local.read_versioned(resolve(uri)[1])


def replace_if_match(uri: str, data: bytes, version: str) -> str | None:
    """Overwrite only if the current version is ``version``; the new version, or None if it changed.

    S3: a PUT with ``If-Match``, atomic on the server. Local: compare then rename, not atomic between two
    processes (local stores take an OS file lock instead; see ``vitune.features.lease``).
    """
    if is_remote(uri):
        return s3.put_if_match(uri, data, version)
    return local.replace_if_match(resolve(uri)[1], data, version)


def delete_if_match(uri: str, version: str) -> bool:
    """Delete only if the current version is ``version`` (S3 ``If-Match`` on DELETE); whether it was deleted."""
    if is_remote(uri):
        return s3.delete_if_match(uri, version)
    return local.delete_if_match(resolve(uri)[1], version)


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
    return sorted(file_sizes(uri, suffix, recursive))


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
