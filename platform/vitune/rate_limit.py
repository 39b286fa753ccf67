"""Request caps for LLM endpoints: requests in flight and requests per second, per process or job-wide.

``LimiterCore`` is the state (leases that expire + a token bucket); ``LocalLimiter`` waits on it for the
threads of one process; ``RayLimiter`` is a handle to one small async Ray actor that every Ray task asks for
a lease, so the caps hold across a whole job however Ray Data spreads the work. Leases expire (request
timeout + ``LEASE_MARGIN_S``), so a worker that dies mid-request cannot leak a slot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any, Protocol

from vitune.config import EndpointConfig

# ray is imported where a job-wide limiter is made or used: a judge in a plain process needs only LocalLimiter
log = logging.getLogger(__name__)

LEASE_MARGIN_S = 30.0  # a lease outlives the request timeout by this much before it is reclaimed


class Limiter(Protocol):
    def acquire(self) -> str: ...

    def release(self, lease: str) -> None: ...


class LimiterCore:
    """Concurrency slots (leases that expire) plus a token bucket; pure state, the callers do the waiting.

    ``burst`` is the bucket size: with burst 1 requests are spaced ``1 / requests_per_second`` apart.
    """

    def __init__(self, max_concurrency: int, requests_per_second: float | None, burst: float = 1.0,
                 lease_ttl_s: float = 600.0):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if requests_per_second is not None and requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be > 0 or None, got {requests_per_second}")
        self.max_concurrency = max_concurrency
        self.rate = requests_per_second
        self.burst = max(1.0, burst)
        self.lease_ttl_s = lease_ttl_s
        self._tokens = self.burst
        self._stamp: float | None = None
        self._leases: dict[str, float] = {}  # lease id -> expiry time
        self.expired = 0  # leases reclaimed because their holder never released them

    def _refill(self, now: float) -> None:
        if self.rate is None:
            return
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def _expire(self, now: float) -> None:
        for lease, deadline in list(self._leases.items()):
            if deadline <= now:
                del self._leases[lease]
                self.expired += 1
                log.warning("limiter lease %s expired without release; slot reclaimed", lease)

    def try_acquire(self, now: float) -> tuple[str | None, float]:
        """``(lease, 0)`` when granted, else ``(None, seconds worth waiting before trying again)``."""
        self._expire(now)
        self._refill(now)
        if len(self._leases) >= self.max_concurrency:
            return None, max(0.001, min(self._leases.values()) - now)
        if self.rate is not None and self._tokens < 1.0:
            return None, (1.0 - self._tokens) / self.rate
        if self.rate is not None:
            self._tokens -= 1.0
        lease = uuid.uuid4().hex
        self._leases[lease] = now + self.lease_ttl_s
        return lease, 0.0

    def release(self, lease: str) -> None:
        self._leases.pop(lease, None)

    @property
    def in_flight(self) -> int:
        return len(self._leases)


class LocalLimiter:
    """The limits for the threads of one process."""

    def __init__(self, max_concurrency: int, requests_per_second: float | None, burst: float = 1.0,
                 lease_ttl_s: float = 600.0):
        self._core = LimiterCore(max_concurrency, requests_per_second, burst, lease_ttl_s)
        self._cond = threading.Condition()

    def acquire(self) -> str:
        with self._cond:
            while True:
                lease, wait = self._core.try_acquire(time.monotonic())
                if lease is not None:
                    return lease
                self._cond.wait(timeout=wait)

    def release(self, lease: str) -> None:
        with self._cond:
            self._core.release(lease)
            self._cond.notify_all()


class _LimiterActor:
    """The body of the Ray actor behind ``RayLimiter`` (async: thousands of waiters cost nothing)."""

    def __init__(self, max_concurrency: int, requests_per_second: float | None, burst: float, lease_ttl_s: float):
        self._core = LimiterCore(max_concurrency, requests_per_second, burst, lease_ttl_s)
        self._cond = asyncio.Condition()
        self._granted = 0

    async def acquire(self) -> str:
        async with self._cond:
            while True:
                lease, wait = self._core.try_acquire(time.monotonic())
                if lease is not None:
                    self._granted += 1
                    return lease
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout=wait)
                except TimeoutError:
                    pass

    async def release(self, lease: str) -> None:
        async with self._cond:
            self._core.release(lease)
            self._cond.notify_all()

    async def stats(self) -> dict[str, int]:
        return {"granted": self._granted, "in_flight": self._core.in_flight, "expired": self._core.expired}


class RayLimiter:
    """Job-wide limits: a handle to one async Ray actor; picklable, so it travels into Ray tasks and actors."""

    def __init__(self, actor: Any):
        self._actor = actor

    @classmethod
    def create(cls, max_concurrency: int, requests_per_second: float | None, burst: float = 1.0,
               lease_ttl_s: float = 600.0) -> RayLimiter:
        # deferred: these helpers also run where Ray is not started or installed
        import ray

        actor_cls = ray.remote(num_cpus=0, max_concurrency=10_000)(_LimiterActor)
        return cls(actor_cls.remote(max_concurrency, requests_per_second, burst, lease_ttl_s))

    @classmethod
    def for_endpoint(cls, endpoint: EndpointConfig) -> RayLimiter:
        return cls.create(endpoint.max_concurrency, endpoint.requests_per_second,
                          lease_ttl_s=endpoint.timeout_s + LEASE_MARGIN_S)

    def acquire(self) -> str:
        # deferred: these helpers also run where Ray is not started or installed
        import ray

        return ray.get(self._actor.acquire.remote())

    def release(self, lease: str) -> None:
        self._actor.release.remote(lease)  # fire and forget; a lost release expires with its lease

    def stats(self) -> dict[str, int]:
        # deferred: these helpers also run where Ray is not started or installed
        import ray

        return ray.get(self._actor.stats.remote())

    def shutdown(self) -> None:
        # deferred: these helpers also run where Ray is not started or installed
        import ray

        ray.kill(self._actor)
