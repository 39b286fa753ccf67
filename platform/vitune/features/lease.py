"""One writer per feature store: a lease that a run holds while it plans, computes and commits the store.

Two runs on one store must never both write it (two plans of different shard sizes would mix; two
manifests would race). So a run takes the store's lease first; a second run waits for it (up to
``wait_s``, logging who holds it) and then, finding the store complete, does nothing, or gives up with
``StoreBusy`` naming the holder.

- **S3** (``s3://``): the object ``<store>/lease.json`` is created with a conditional PUT
  (``If-None-Match: *``), so exactly one creator wins. It names its holder (host, pid, run id) and an
  expiry; the holder renews it every ``ttl_s / 3`` with ``If-Match`` on its ETag, and deletes it, again
  with ``If-Match``, when done. A lease past its expiry (its holder died or lost the network), or one held
  by a process on this host that no longer exists, is taken over with ``If-Match`` on the stale ETag, so
  two waiters never both take it. A holder whose renewal fails has lost the lease; ``check()`` raises
  before it commits anything.
- **Local folders**: an OS file lock (``flock``) on ``<store>/.lease.lock``; the kernel drops it when its
  holder exits, however it exits, so a killed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from vitune import storage

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
LOCAL_LOCK_FILE = ".lease.lock"
WAIT_ENV = "VITUNE_STORE_LEASE_WAIT_S"
DEFAULT_WAIT_S = 900.0
DEFAULT_TTL_S = 60.0
POLL_S = 1.0


class StoreBusy(RuntimeError):
    """Another run holds the store's lease and did not release it within the wait."""


class LeaseLost(RuntimeError):
    """This run's lease expired or was taken over: it must not commit anything more."""


def wait_from_env() -> float:
    value = os.environ.get(WAIT_ENV)
    return float(value) if value else DEFAULT_WAIT_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class StoreLease:
    """``with StoreLease(uri): ...`` holds the store at ``uri`` for one writer; see the module docstring."""

    def __init__(self, store_uri: str, wait_s: float | None = None, ttl_s: float = DEFAULT_TTL_S):
        self.store_uri = store_uri
        self.wait_s = wait_from_env() if wait_s is None else wait_s
        self.ttl_s = ttl_s
        self.holder = {"run": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.remote = storage.is_remote(store_uri)
        self._etag: str | None = None
        self._lost = False
        self._fd: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a renewal and a check never interleave (the ETag changes in between)
        self._renewer: threading.Thread | None = None
        self.waited_s = 0.0

    # -------------------------------------------------------------------------------------- public
    def __enter__(self) -> StoreLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, waiting up to ``wait_s`` for the holder; raises ``StoreBusy`` after that."""
        t0 = time.monotonic()
        deadline, next_note = t0 + self.wait_s, t0
        while True:
            holder = self._try_local() if not self.remote else self._try_remote()
            if holder is None:
                self.waited_s = time.monotonic() - t0
                log.info("lease on %s taken (run %s, waited %.1fs)", self.store_uri, self.holder["run"], self.waited_s)
                if self.remote:
                    self._renewer = threading.Thread(target=self._renew_loop, name="store-lease", daemon=True)
                    self._renewer.start()
                return
            now = time.monotonic()
            if now >= deadline:
                raise StoreBusy(f"feature store {self.store_uri} is being written by another run "
                                f"({_describe(holder)}); waited {now - t0:.0f}s. Re-run when it has finished "
                                "(a finished store is reused), "
                                f"or raise {WAIT_ENV}")
            if now >= next_note:
                log.info("feature store %s is being written by another run (%s): waiting up to %.0fs more",
                         self.store_uri, _describe(holder), deadline - now)
                next_note = now + 30
            time.sleep(POLL_S)

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this run still holds the lease (call before committing)."""
        if not self.remote:
            return  # the kernel holds a local lock until this process exits
        with self._lock:
            current = storage.read_versioned(self._uri)
            held = not self._lost and current is not None and current[1] == self._etag
        if not held:
            self._lost = True
            raise LeaseLost(f"lease on {self.store_uri} was lost (expired or taken over by another run): "
                            "nothing more is committed by this run; re-run to finish the store")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
        elif self._etag is not None and not self._lost:
            with contextlib.suppress(Exception):  # an unreleased lease only expires: never mask the run's error
                storage.delete_if_match(self._uri, self._etag)
        self._etag = None

    # -------------------------------------------------------------------------------------- local
    def _try_local(self) -> dict[str, Any] | None:
        """Take the flock, or return the holder it names."""
        # deferred: fcntl exists on POSIX only, and only local stores need it
        import fcntl

        path = storage.local_path(storage.join(self.store_uri, LOCAL_LOCK_FILE))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                return {}
            finally:
                os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        self._fd = fd
        return None

    # -------------------------------------------------------------------------------------- S3
    @property
    def _uri(self) -> str:
        return storage.join(self.store_uri, LEASE_FILE)

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s}).encode()

    def _try_remote(self) -> dict[str, Any] | None:
        """Create the lease, or take over a stale one; else return the live holder."""
        etag = storage.create_if_absent(self._uri, self._body())
        if etag is not None:
            self._etag = etag
            return None
        current = storage.read_versioned(self._uri)
        if current is None:
            return {}  # released between our create and read: try again at once next round
        try:
            holder = json.loads(current[0])
        except ValueError:
            holder = {"expires": 0}  # unreadable: treat as stale
        stale = holder.get("expires", 0) < time.time() or (
            holder.get("host") == self.holder["host"] and isinstance(holder.get("pid"), int)
            and holder["pid"] != os.getpid() and not _pid_alive(holder["pid"]))
        if stale:
            etag = storage.replace_if_match(self._uri, self._body(), current[1])
            if etag is not None:
                log.warning("took over the stale lease on %s (%s)", self.store_uri, _describe(holder))
                self._etag = etag
                return None
        return holder

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                try:
                    etag = storage.replace_if_match(self._uri, self._body(), self._etag or "")
                except Exception as exc:  # noqa: BLE001 - a transient error: the next renewal may succeed
                    log.warning("renewing the lease on %s failed (%s); retrying", self.store_uri, exc)
                    continue
                if etag is None:
                    self._lost = True
                    log.error("lease on %s was taken over by another run: this run will not commit",
                              self.store_uri)
                    return
                self._etag = etag


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    left = holder.get("expires")
    until = f", lease expires in {left - time.time():.0f}s" if isinstance(left, int | float) else ""
    return f"run {holder.get('run', '?')} on {holder.get('host', '?')} pid {holder.get('pid', '?')}{until}"
