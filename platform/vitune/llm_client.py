"""A client for any OpenAI-compatible chat endpoint: rate-limited, retried, cached, with token usage.

Used by instruction generation and by the eval judge; the endpoint is only a ``base_url`` (a hosted API,
vLLM, or vitune's own serving app).

- **Limits.** A limiter (``vitune.rate_limit``) caps requests in flight and requests per second: per process
  by default, job-wide with a ``RayLimiter``. The slot is released before a retry sleeps, so a backing-off
  request does not block the others.
- **Retries.** 429, 408, 5xx, timeouts, connection errors and unreadable 200 bodies are retried with
  exponential backoff and jitter; ``Retry-After`` (seconds or HTTP date, or ``retry-after-ms``) wins when
  the server sends it, capped at ``max_retry_after_s`` (a server asking for an hour does not park a worker
  for an hour). Other 4xx fail at once. Giving up raises ``LLMError`` naming the attempts and the last error.
- **The key.** ``Authorization`` goes only to the configured ``base_url``'s scheme, host and port: redirects
  are not followed (a 3xx is an error naming where it pointed), and a request to any other origin is refused
  before it is sent.
- **Budget.** A limiter may carry a token/cost budget (``vitune.rate_limit.Budget``): once it is spent no
  request is sent and ``chat`` raises ``BudgetExhausted``; what each answer cost is charged to it.
- **Cache.** ``ResponseCache`` keeps one JSON file per request key under a storage URI (local or s3://):
  each file is written whole (atomic rename locally, a single PUT on S3), so many Ray tasks can share it
  and a crash loses only requests in flight. The key hashes the endpoint (``base_url``), the model, the
  messages, the sampling parameters and an optional extra key (e.g. the image): one cache can serve several
  endpoints, and an answer from one is never taken for another's.
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from vitune import storage
from vitune.config import EndpointConfig
from vitune.rate_limit import LEASE_MARGIN_S, Limiter, LocalLimiter

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx


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
# cache


def endpoint_origin(base_url: str) -> str:
    """``scheme://host:port`` of a URL, lower-cased, the port explicit: what a request must go to."""
    url = httpx.URL(base_url)
    return f"{url.scheme.lower()}://{(url.host or '').lower()}:{url.port or {'http': 80, 'https': 443}.get(url.scheme)}"


def request_key(model: str, messages: Sequence[dict], params: dict | None = None, extra: str | None = None,
                endpoint: str = "") -> str:
    """sha256 over the canonical JSON of what determines a completion: the endpoint (its ``base_url``), the model,
    the messages, the parameters and an optional extra key."""
    canon = json.dumps({"endpoint": endpoint.rstrip("/").lower(), "model": model, "messages": list(messages),
                        "params": params or {}, "extra": extra},
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
        self._origin = endpoint_origin(endpoint.base_url)
        # the key goes to base_url's origin only: no redirects, and any other origin is refused before sending
        self._http = httpx.Client(base_url=endpoint.base_url.rstrip("/"), headers=headers,
                                  timeout=httpx.Timeout(endpoint.timeout_s), transport=transport,
                                  follow_redirects=False, event_hooks={"request": [self._same_origin]})
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

    def _same_origin(self, request: httpx.Request) -> None:
        if endpoint_origin(str(request.url)) != self._origin:
            raise LLMError(f"refused to send a request to {request.url.scheme}://{request.url.host}: the endpoint "
                           f"is {self.endpoint.base_url} (its key goes nowhere else)")

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry number ``attempt + 1``: the server's ``Retry-After`` (at most
        ``max_retry_after_s``), else capped 2^n with jitter."""
        ep = self.endpoint
        if retry_after is not None:
            if retry_after > ep.max_retry_after_s:
                log.info("%s asked to wait %.0f s; waiting %.0f s (endpoint.max_retry_after_s)", ep.base_url,
                         retry_after, ep.max_retry_after_s)
            return min(retry_after, ep.max_retry_after_s)
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
        """One chat completion (``messages`` in OpenAI form); cached, limited and retried. Raises ``LLMError``,
        or ``BudgetExhausted`` once the limiter's budget is spent (nothing more is sent)."""
        ep = self.endpoint
        params = {"temperature": ep.temperature if temperature is None else temperature,
                  "max_tokens": ep.max_tokens if max_tokens is None else max_tokens, **body}
        key = request_key(ep.model, messages, params, cache_extra, ep.base_url) if self.cache else None
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
            # read (and charged to a budget) before the slot is freed: a waiting request sees this answer's cost
            return self._read(resp, payload)
        except httpx.TimeoutException as exc:
            return _Attempt(error=f"timeout ({type(exc).__name__})", retryable=True)
        except httpx.TransportError as exc:
            return _Attempt(error=f"connection error ({type(exc).__name__}: {exc})", retryable=True)
        finally:
            self.limiter.release(lease)

    def _read(self, resp: httpx.Response, payload: dict) -> _Attempt:
        status = resp.status_code
        if resp.is_redirect:
            return _Attempt(error=f"HTTP {status} redirect to {resp.headers.get('location')!r}, not followed: set "
                                  f"endpoint.base_url to where the API is", status=status)
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
        spend = getattr(self.limiter, "spend", None)  # a limiter with a budget charges what the answer cost
        if spend is not None:
            spend(prompt_tokens, completion_tokens)
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
