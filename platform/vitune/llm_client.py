"""A client for any OpenAI-compatible chat endpoint: rate-limited, retried, cached, with token usage.

Used by instruction generation and by the eval judge; the endpoint is only a ``base_url`` (a hosted API,
vLLM, or vitune's own serving app).

- **Limits.** A limiter caps requests in flight and requests per second (token bucket). ``LocalLimiter``
  covers the threads of one process; ``RayLimiter`` is one small async Ray actor that every Ray task asks
  for a lease, so the caps hold across the whole job however Ray Data spreads the work. Leases expire
  (request timeout + margin), so a worker that dies mid-request cannot leak a slot. The slot is released
  before a retry sleeps, so a backing-off request does not block the others.
- **Retries.** 429, 408, 5xx, timeouts, connection errors and unreadable 200 bodies are retried with
  exponential backoff and jitter; ``Retry-After`` (seconds or HTTP date, or ``retry-after-ms``) wins when
  the server sends it. Other 4xx fail at once. Giving up raises ``LLMError`` naming the attempts and the
  last error.
- **Cache.** ``ResponseCache`` keeps one JSON file per request key under a storage URI (local or s3://):
  each file is written whole (atomic rename locally, a single PUT on S3), so many Ray tasks can share it
  and a crash loses only requests in flight. The key hashes the model, the messages, the sampling
  parameters and an optional extra key (e.g. the image).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import httpx

from vitune import storage
from vitune.config import EndpointConfig

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx
LEASE_MARGIN_S = 30.0  # a lease outlives the request timeout by this much before it is reclaimed


class LLMError(RuntimeError):
    """A chat request that failed for good; ``status`` is the last HTTP status (None for network errors)."""

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 0, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.attempts = attempts
        self.retryable = retryable


@dataclass
class ChatResult:
    """One completion: the text plus what it cost. ``attempts`` counts HTTP requests sent (0 on a cache hit)."""

    content: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    cached: bool = False
    attempts: int = 0
    latency_s: float = 0.0


@dataclass
class ClientStats:
    requests_sent: int = 0  # HTTP requests, retries included
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0  # calls that raised LLMError
    prompt_tokens: int = 0  # from `usage` of responses received (cache hits cost nothing)
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# limiting


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
        import asyncio

        self._core = LimiterCore(max_concurrency, requests_per_second, burst, lease_ttl_s)
        self._cond = asyncio.Condition()
        self._granted = 0

    async def acquire(self) -> str:
        import asyncio

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
        import ray

        actor_cls = ray.remote(num_cpus=0, max_concurrency=10_000)(_LimiterActor)
        return cls(actor_cls.remote(max_concurrency, requests_per_second, burst, lease_ttl_s))

    @classmethod
    def for_endpoint(cls, endpoint: EndpointConfig) -> RayLimiter:
        return cls.create(endpoint.max_concurrency, endpoint.requests_per_second,
                          lease_ttl_s=endpoint.timeout_s + LEASE_MARGIN_S)

    def acquire(self) -> str:
        import ray

        return ray.get(self._actor.acquire.remote())

    def release(self, lease: str) -> None:
        self._actor.release.remote(lease)  # fire and forget; a lost release expires with its lease

    def stats(self) -> dict[str, int]:
        import ray

        return ray.get(self._actor.stats.remote())

    def shutdown(self) -> None:
        import ray

        ray.kill(self._actor)


# ----------------------------------------------------------------------------------------------------
# cache


def request_key(model: str, messages: Sequence[dict], params: dict | None = None, extra: str | None = None) -> str:
    """sha256 over the canonical JSON of what determines a completion (plus an optional extra key)."""
    canon = json.dumps({"model": model, "messages": list(messages), "params": params or {}, "extra": extra},
                       sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


class ResponseCache:
    """One JSON file per request key: ``<uri>/<key[:2]>/<key>.json``. A missing or unreadable file is a miss."""

    def __init__(self, uri: str):
        self.uri = str(uri)

    def path(self, key: str) -> str:
        return storage.join(self.uri, key[:2], f"{key}.json")

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.path(key)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # torn or unreadable entry: ask the endpoint again
            log.warning("cache entry %s unreadable (%s); treating as a miss", key, exc)
            return None

    def put(self, key: str, entry: dict) -> None:
        try:
            storage.write_bytes(self.path(key), json.dumps(entry, ensure_ascii=False).encode("utf-8"))
        except OSError as exc:  # a cache that cannot be written costs money later, not correctness now
            log.warning("could not write cache entry %s (%s)", key, exc)


# ----------------------------------------------------------------------------------------------------
# client


def parse_retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (delta-seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class _Attempt:
    """What one HTTP try produced: a result, or an error and whether (and after how long) to retry."""

    result: ChatResult | None = None
    error: str = ""
    status: int | None = None
    retryable: bool = False
    retry_after: float | None = None
    usage: dict = field(default_factory=dict)


class LLMClient:
    """Chat completions against ``endpoint`` with the limiter, retries and cache above; thread-safe."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        *,
        cache: ResponseCache | None = None,
        limiter: Limiter | None = None,
        api_key: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        self.endpoint = endpoint
        self.cache = cache
        self.limiter: Limiter = limiter or LocalLimiter(
            endpoint.max_concurrency, endpoint.requests_per_second, lease_ttl_s=endpoint.timeout_s + LEASE_MARGIN_S)
        if api_key is None and endpoint.api_key_env:
            api_key = os.environ.get(endpoint.api_key_env) or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=endpoint.base_url.rstrip("/"), headers=headers,
                                  timeout=httpx.Timeout(endpoint.timeout_s), transport=transport)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self.stats = ClientStats()

    @classmethod
    def from_config(cls, endpoint: EndpointConfig | dict, cache_uri: str | None = None,
                    limiter: Limiter | None = None) -> LLMClient:
        ep = endpoint if isinstance(endpoint, EndpointConfig) else EndpointConfig.model_validate(endpoint)
        return cls(ep, cache=ResponseCache(cache_uri) if cache_uri else None, limiter=limiter)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry number ``attempt + 1``: the server's ``Retry-After``, else capped 2^n with jitter."""
        ep = self.endpoint
        if retry_after is not None:
            return retry_after
        base = min(ep.backoff_max_s, ep.backoff_initial_s * (2 ** attempt))
        return base * (0.5 + 0.5 * self._rng.random())  # jitter in [base/2, base): spreads synchronized retries

    def chat(
        self,
        messages: Sequence[dict],
        *,
        cache_extra: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        **body: Any,
    ) -> ChatResult:
        """One chat completion (``messages`` in OpenAI form); cached, limited and retried. Raises ``LLMError``."""
        ep = self.endpoint
        params = {"temperature": ep.temperature if temperature is None else temperature,
                  "max_tokens": ep.max_tokens if max_tokens is None else max_tokens, **body}
        key = request_key(ep.model, messages, params, cache_extra) if self.cache else None
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None and isinstance(hit.get("content"), str):
                self._count(cache_hits=1)
                usage = hit.get("usage") or {}
                return ChatResult(content=hit["content"], finish_reason=hit.get("finish_reason"),
                                  prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                  completion_tokens=int(usage.get("completion_tokens") or 0),
                                  model=hit.get("model", ep.model), cached=True, attempts=0)
        payload = {"model": ep.model, "messages": list(messages), **params}
        t0 = time.monotonic()
        last = _Attempt()
        for attempt in range(ep.max_retries + 1):
            last = self._try_once(payload)
            if last.result is not None:
                res = last.result
                res.attempts, res.latency_s = attempt + 1, time.monotonic() - t0
                if key is not None:
                    self.cache.put(key, {"key": key, "model": res.model, "content": res.content,
                                         "finish_reason": res.finish_reason, "usage": last.usage,
                                         "created": time.time()})
                return res
            if not last.retryable:
                self._count(failures=1)
                raise LLMError(f"{ep.base_url}: {last.error} (not retryable)", status=last.status,
                               attempts=attempt + 1)
            if attempt < ep.max_retries:
                delay = self.backoff(attempt, last.retry_after)
                log.debug("retry %d/%d in %.2fs after %s", attempt + 1, ep.max_retries, delay, last.error)
                self._count(retries=1)
                self._sleep(delay)
        self._count(failures=1)
        raise LLMError(f"{ep.base_url}: gave up after {ep.max_retries + 1} attempts; last error: {last.error}",
                       status=last.status, attempts=ep.max_retries + 1, retryable=True)

    def _try_once(self, payload: dict) -> _Attempt:
        lease = self.limiter.acquire()
        try:
            self._count(requests_sent=1)
            resp = self._http.post("/chat/completions", json=payload)
        except httpx.TimeoutException as exc:
            return _Attempt(error=f"timeout ({type(exc).__name__})", retryable=True)
        except httpx.TransportError as exc:
            return _Attempt(error=f"connection error ({type(exc).__name__}: {exc})", retryable=True)
        finally:
            self.limiter.release(lease)
        status = resp.status_code
        if status != 200:
            retryable = status in RETRY_STATUS or status >= 500
            return _Attempt(error=f"HTTP {status}: {resp.text[:300]}", status=status, retryable=retryable,
                            retry_after=parse_retry_after(resp.headers) if retryable else None)
        try:
            data = resp.json()
            choice = data["choices"][0]
            content = (choice.get("message") or {}).get("content") or ""
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            return _Attempt(error=f"unreadable 200 response ({type(exc).__name__}): {resp.text[:300]}",
                            status=status, retryable=True)
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        self._count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        result = ChatResult(content=content, finish_reason=choice.get("finish_reason"), prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, model=data.get("model") or payload["model"])
        return _Attempt(result=result, status=status,
                        usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})

    def chat_many(self, requests: Sequence[dict], max_workers: int = 8) -> list[ChatResult | LLMError]:
        """Run ``chat(**request)`` for each request on a thread pool; results in order, failures as ``LLMError``."""

        def one(req: dict) -> ChatResult | LLMError:
            try:
                return self.chat(**req)
            except LLMError as exc:
                return exc

        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(requests)))) as pool:
            return list(pool.map(one, requests))
