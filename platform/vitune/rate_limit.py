"""Request caps for LLM endpoints: requests in flight and requests per second, per process or job-wide, and an
optional token/cost budget.

``LimiterCore`` is the state (leases that expire + a token bucket + the budget); ``LocalLimiter`` waits on it
for the threads of one process; ``RayLimiter`` is a handle to one small async Ray actor that every Ray task asks
for a lease, so the caps hold across a whole job however Ray Data spreads the work. Leases expire (request
timeout + ``LEASE_MARGIN_S``), so a worker that dies mid-request cannot leak a slot.

``Budget``: tokens (prompt + completion) and/or cost (from per-1K prices) the job may spend. Each answer is
charged (``spend``); once the budget is reached no lease is granted and ``acquire`` raises ``BudgetExhausted``.
Requests already in flight still finish, so a job overshoots by at most ``max_concurrency`` answers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from vitune.config import EndpointConfig

# ray is imported where a job-wide limiter is made or used: a judge in a plain process needs only LocalLimiter
log = logging.getLogger(__name__)

LEASE_MARGIN_S = 30.0  # a lease outlives the request timeout by this much before it is reclaimed


class Limiter(Protocol):
    def acquire(self) -> str: ...

    def release(self, lease: str) -> None: ...


class BudgetExhausted(RuntimeError):
    """The job's token/cost budget is spent: no further request is sent."""


@dataclass
class Budget:
    """What a job may spend on an endpoint: ``max_tokens`` (prompt + completion) and/or ``max_cost``."""

    max_tokens: int | None = None
    max_cost: float | None = None
    price_per_1k_prompt: float = 0.0
    price_per_1k_completion: float = 0.0
    tokens: int = 0  # spent so far
    cost: float = 0.0

    def spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens += prompt_tokens + completion_tokens
        self.cost += (prompt_tokens * self.price_per_1k_prompt
                      + completion_tokens * self.price_per_1k_completion) / 1000

    @property
    def exhausted(self) -> bool:
        return ((self.max_tokens is not None and self.tokens >= self.max_tokens)
                or (self.max_cost is not None and self.cost >= self.max_cost))

    def describe(self) -> str:
        limits = [f"{self.tokens} of {self.max_tokens} tokens" if self.max_tokens is not None else "",
                  f"{self.cost:.4f} of {self.max_cost} cost" if self.max_cost is not None else ""]
        return "budget spent: " + ", ".join(x for x in limits if x)


class LimiterCore:
    """Concurrency slots (leases that expire) plus a token bucket; pure state, the callers do the waiting.

    ``burst`` is the bucket size: with burst 1 requests are spaced ``1 / requests_per_second`` apart.
    """

    def __init__(self, max_concurrency: int, requests_per_second: float | None, burst: float = 1.0,
                 lease_ttl_s: float = 600.0, budget: Budget | None = None):
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
        self.budget = budget

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
        """``(lease, 0)`` when granted, else ``(None, seconds worth waiting before trying again)``; raises
        ``BudgetExhausted`` once the budget is spent."""
        if self.budget is not None and self.budget.exhausted:
            raise BudgetExhausted(self.budget.describe())
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

    def spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self.budget is not None:
            self.budget.spend(prompt_tokens, completion_tokens)

    @property
    def in_flight(self) -> int:
        return len(self._leases)


class LocalLimiter:
    """The limits for the threads of one process."""

    def __init__(self, max_concurrency: int, requests_per_second: float | None, burst: float = 1.0,
                 lease_ttl_s: float = 600.0, budget: Budget | None = None):
        self._core = LimiterCore(max_concurrency, requests_per_second, burst, lease_ttl_s, budget)
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

    def spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._cond:
            self._core.spend(prompt_tokens, completion_tokens)


class _LimiterActor:
    """The body of the Ray actor behind ``RayLimiter`` (async: thousands of waiters cost nothing)."""

    def __init__(self, max_concurrency: int, requests_per_second: float | None, burst: float, lease_ttl_s: float,
                 budget: Budget | None = None):
        self._core = LimiterCore(max_concurrency, requests_per_second, burst, lease_ttl_s, budget)
        self._cond = asyncio.Condition()
        self._granted = 0

    async def acquire(self) -> str | None:
        """A lease, or None once the budget is spent (the handle raises ``BudgetExhausted`` in the caller)."""
        async with self._cond:
            while True:
                try:
                    lease, wait = self._core.try_acquire(time.monotonic())
                except BudgetExhausted:
                    return None
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

    async def spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._core.spend(prompt_tokens, completion_tokens)

    async def budget(self) -> str:
        return self._core.budget.describe() if self._core.budget else ""

    async def stats(self) -> dict[str, Any]:
        budget = self._core.budget
        return {"granted": self._granted, "in_flight": self._core.in_flight, "expired": self._core.expired,
                **({"tokens_spent": budget.tokens, "cost_spent": round(budget.cost, 6),
                    "budget_exhausted": budget.exhausted} if budget else {})}


class RayLimiter:
    """Job-wide limits: a handle to one async Ray actor; picklable, so it travels into Ray tasks and actors."""

    def __init__(self, actor: Any):
        self._actor = actor

    @classmethod
    def create(cls, max_concurrency: int, requests_per_second: float | None, burst: float = 1.0,
               lease_ttl_s: float = 600.0, budget: Budget | None = None) -> RayLimiter:
        # deferred: these helpers also run where Ray is not started or installed
        import ray

        actor_cls = ray.remote(num_cpus=0, max_concurrency=10_000)(_LimiterActor)
        return cls(actor_cls.remote(max_concurrency, requests_per_second, burst, lease_ttl_s, budget))

    @classmethod
    def for_endpoint(cls, endpoint: EndpointConfig, budget: Budget | None = None) -> RayLimiter:
        return cls.create(endpoint.max_concurrency, endpoint.requests_per_second,
                          lease_ttl_s=endpoint.timeout_s + LEASE_MARGIN_S, budget=budget)

    def acquire(self) -> str:
        # deferred: these helpers also run where Ray is not started or installed
        import ray

        lease = ray.get(self._actor.acquire.remote())
        if lease is None:
            raise BudgetExhausted(ray.get(self._actor.budget.remote()))
        return lease

    def spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        # deferred: these helpers also run where Ray is not started or installed
        import ray

        # waited on: the next acquire, from any task, must see this answer's cost
        ray.get(self._actor.spend.remote(prompt_tokens, completion_tokens))

    def release(self, lease: str) -> None:
        self._actor.release.remote(lease)  # fire and forget; a lost release expires with its lease

    def stats(self) -> dict[str, Any]:
        # deferred: these helpers also run where Ray is not started or installed
        import ray

        return ray.get(self._actor.stats.remote())

    def shutdown(self) -> None:
        # deferred: these helpers also run where Ray is not started or installed
        import ray

        ray.kill(self._actor)
