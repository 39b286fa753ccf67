"""Local files for ``vitune.storage``, written all-or-nothing, and the versions its conditional writes compare.

A write goes to a uniquely named temp file (``TEMP_MARK`` in its name, so a killed writer's leftovers are
recognisable), fsynced and renamed over the target, the folder fsynced after. A file's version is the SHA-256 of
its content. Replace / delete if unchanged compare then act: not atomic between two processes (local stores take
an OS file lock instead; see ``vitune.features.lease``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

TEMP_MARK = ".tmp-"  # in every local temp file's name: a killed writer's leftovers are recognisable


def replace(path: str, data: bytes) -> None:
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


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def create_if_absent(path: str, data: bytes) -> str | None:
    """``O_CREAT | O_EXCL`` then the content, fsynced: its version, or None when the file exists."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return _version(data)


def read_versioned(path: str) -> tuple[bytes, str] | None:
    """``(content, version)`` of a file, or None when it does not exist."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return data, _version(data)


def _is_version(path: str, version: str) -> bool:
    current = read_versioned(path)
    return current is not None and current[1] == version


def replace_if_match(path: str, data: bytes, version: str) -> str | None:
    """Overwrite (all-or-nothing) if the file's version is ``version``: the new version, or None."""
    if not _is_version(path, version):
        return None
    replace(path, data)
    return _version(data)


def delete_if_match(path: str, version: str) -> bool:
    """Delete if the file's version is ``version``; whether it was deleted."""
    if not _is_version(path, version):
        return False
    os.remove(path)
    return True
