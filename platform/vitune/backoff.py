"""Calls to a service that may be down for a while: retried with exponential backoff, or held and replayed.

``Backoff`` is what the MLflow tracker (``vitune.tracking.Tracker``) sends every call through, so one failed
call never turns tracking off for the rest of a job:

- a call the job can do without for now (a metric, a param) is **held** while the service is down: nothing
  is sent until the backoff has passed; then the held calls go first, in order, and the new one after them.
  Metrics keep the step and time they were logged with, so a run's history has no gap after an outage;
- a call the job needs (opening the run, the end-of-run tags and artifacts, registering the model, closing
  the run) is **retried**, sleeping the backoff between tries, for up to ``retry_s``; then it is given up
  with a warning and the job goes on;
- an error about the request itself (an HTTP 4xx other than 408/429: a bad value, a name that exists) is not
  a failure of the service: that one call is dropped with a warning and nothing is held or retried.

The backoff doubles from ``initial_s`` up to ``max_s`` on each failed try and resets once the service answers.
One warning per outage, one line when it is over.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_request_error(exc: BaseException) -> bool:
    """An error the service gives for this request (4xx but 408/429), which retrying cannot fix."""
    status = getattr(exc, "get_http_status_code", None)  # MlflowException and its REST subclass
    if not callable(status):
        return False
    try:
        code = int(status())
    except (TypeError, ValueError):
        return False
    return 400 <= code < 500 and code not in (408, 429)


class Backoff:
    """Runs calls to one service; see the module docstring. Not thread-safe: one per tracker, used by one thread."""

    def __init__(self, service: str, retry_s: float, initial_s: float = 1.0, max_s: float = 30.0,
                 max_held: int = 10_000, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.service = service
        self.retry_s = retry_s
        self.initial_s = initial_s
        self.max_s = max_s
        self.max_held = max_held
        self._sleep = sleep
        self._clock = clock
        self._held: deque[tuple[str, Callable[[], object]]] = deque()
        self._delay = initial_s
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._replayed = 0  # held calls sent since the outage began
        self.dropped = 0  # held calls lost because more than max_held piled up

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def call(self, what: str, fn: Callable[[], T], critical: bool = False) -> T | None:
        """``fn()``'s result, or None when it was held (not critical), dropped or given up."""
        deadline = self._clock() + self.retry_s
        while True:
            if not critical and self._clock() < self._retry_at:
                self._hold(what, fn)
                return None
            try:
                self._replay()
                result = fn()
            except Exception as exc:  # noqa: BLE001 - the caller's job goes on whatever the service says
                if is_request_error(exc):
                    self._recovered()  # it answered: the service is up
                    log.warning("%s refused %s: %s", self.service, what, exc)
                    return None
                self._failed(what, exc)
                if not critical:
                    self._hold(what, fn)
                    return None
                now = self._clock()
                if now >= deadline:
                    log.warning("%s: gave up on %s after %.0f s of retries (%s)", self.service, what,
                                self.retry_s, exc)
                    return None
                self._sleep(max(0.0, min(self._retry_at, deadline) - now))
                continue
            self._recovered()
            return result

    def flush(self) -> bool:
        """Send the held calls, retrying like a critical call; True when none are left."""
        self.call("the held calls", lambda: None, critical=True)
        return not self._held

    def _replay(self) -> None:
        while self._held:
            what, fn = self._held[0]
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                if not is_request_error(exc):
                    raise
                log.warning("%s refused held %s: %s", self.service, what, exc)
            self._held.popleft()
            self._replayed += 1

    def _hold(self, what: str, fn: Callable[[], object]) -> None:
        if len(self._held) >= self.max_held:
            self._held.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("%s: %d held calls dropped (more than %d waiting)", self.service, self.dropped,
                            self.max_held)
        self._held.append((what, fn))

    def _failed(self, what: str, exc: BaseException) -> None:
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
            log.warning("%s not answering (%s failed: %s); retrying with backoff, holding what can wait",
                        self.service, what, exc)
        else:
            self._delay = min(self.max_s, self._delay * 2)
        self._retry_at = now + self._delay

    def _recovered(self) -> None:
        if self._down_since is not None:
            log.info("%s answers again after %.0f s; %d held calls sent", self.service,
                     self._clock() - self._down_since, self._replayed)
        self._down_since = None
        self._replayed = 0
        self._delay = self.initial_s
        self._retry_at = 0.0
