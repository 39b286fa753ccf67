"""LLM client against the scripted OpenAI-compatible server: retries, give-up, Retry-After, cache, rate caps."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from tests.fake_openai import FakeOpenAI, Reply, fake_openai_fixture  # noqa: F401 - fixture `fake_openai`
from tests.services import free_port
from vitune.config import EndpointConfig
from vitune.llm_client import LLMClient, LLMError, ResponseCache, parse_retry_after
from vitune.rate_limit import Budget, BudgetExhausted, LimiterCore, LocalLimiter

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hi please"}]


def endpoint(server: FakeOpenAI | None = None, **kw) -> EndpointConfig:
    base = dict(base_url=server.base_url if server else "http://127.0.0.1:9/v1", model="fake",
                api_key_env=None, timeout_s=5, max_retries=3, backoff_initial_s=0.01, backoff_max_s=0.05,
                requests_per_second=None, max_concurrency=8)
    return EndpointConfig(**{**base, **kw})


class Sleeps(list):
    """A ``sleep`` that records the delays it was asked for (and really sleeps them)."""

    def __call__(self, s: float) -> None:
        self.append(s)
        time.sleep(s)


def test_backoff_on_429_and_500_then_success(fake_openai):
    fake_openai.queue(Reply(status=429), Reply(status=500))
    fake_openai.responder = lambda req: "hello there"
    sleeps = Sleeps()
    with LLMClient(endpoint(fake_openai), sleep=sleeps) as client:
        res = client.chat(MESSAGES)
    assert res.content == "hello there" and res.attempts == 3 and not res.cached
    assert [r.status for r in fake_openai.chat_requests] == [429, 500, 200]
    assert len(sleeps) == 2 and all(0.005 <= s <= 0.05 for s in sleeps)  # 2^n backoff with jitter, capped
    assert client.stats.retries == 2 and client.stats.requests_sent == 3
    # usage comes back from the server and is summed
    assert (res.prompt_tokens, res.completion_tokens) == (5, 2)
    assert client.stats.prompt_tokens == fake_openai.usage_totals()["prompt_tokens"] == 5
    body = fake_openai.chat_requests[-1].body
    assert body["model"] == "fake" and body["messages"] == MESSAGES and body["max_tokens"] == 1024


def test_gives_up_after_max_retries_with_clear_error(fake_openai):
    fake_openai.fail_next(10, status=503)
    with LLMClient(endpoint(fake_openai, max_retries=2)) as client:
        with pytest.raises(LLMError) as err:
            client.chat(MESSAGES)
    msg = str(err.value)
    assert "gave up after 3 attempts" in msg and "HTTP 503" in msg and fake_openai.base_url in msg
    assert err.value.status == 503 and err.value.attempts == 3
    assert fake_openai.count() == 3 and client.stats.failures == 1


def test_client_errors_are_not_retried(fake_openai):
    fake_openai.queue(Reply(status=400, body={"error": {"message": "bad request: context too long"}}))
    with LLMClient(endpoint(fake_openai)) as client, pytest.raises(LLMError, match="context too long") as err:
        client.chat(MESSAGES)
    assert err.value.status == 400 and fake_openai.count() == 1


def test_retry_after_is_honoured(fake_openai):
    fake_openai.fail_next(1, status=429, retry_after=0.4)
    sleeps = Sleeps()
    t0 = time.monotonic()
    with LLMClient(endpoint(fake_openai, backoff_initial_s=0.0, backoff_max_s=0.0), sleep=sleeps) as client:
        assert client.chat(MESSAGES).content == "OK."
    assert sleeps == [0.4]  # the server's value, not the (zero) backoff
    assert time.monotonic() - t0 >= 0.4
    gap = fake_openai.chat_requests[1].time - fake_openai.chat_requests[0].time
    assert gap >= 0.35


def test_parse_retry_after_forms():
    assert parse_retry_after(httpx.Headers({"Retry-After": "7"})) == 7.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250", "Retry-After": "7"})) == 0.25
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": date}), now=1_000_000) == pytest.approx(30, abs=1)
    assert parse_retry_after(httpx.Headers({})) is None
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None


def test_timeouts_and_unreadable_bodies_are_retried(fake_openai):
    fake_openai.queue(Reply(content="late", delay_s=1.0), Reply(body="{not json"), Reply(body={"choices": []}))
    with LLMClient(endpoint(fake_openai, timeout_s=0.3)) as client:
        res = client.chat(MESSAGES)
    assert res.content == "OK." and res.attempts == 4


def test_connection_errors_are_retried_then_reported():
    ep = endpoint(None, base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    with LLMClient(ep) as client, pytest.raises(LLMError, match="connection error") as err:
        client.chat(MESSAGES)
    assert err.value.attempts == 2


def test_cache_hit_skips_the_network(fake_openai, tmp_path):
    fake_openai.responder = lambda req: f"answer {len(fake_openai.chat_requests)}"
    cache = ResponseCache(str(tmp_path / "cache"))
    with LLMClient(endpoint(fake_openai), cache=cache) as client:
        first = client.chat(MESSAGES, cache_extra="img1.jpg")
        again = client.chat(MESSAGES, cache_extra="img1.jpg")
        other = client.chat(MESSAGES, cache_extra="img2.jpg")  # same prompt, another image: a miss
        hotter = client.chat(MESSAGES, cache_extra="img1.jpg", temperature=1.5)  # sampling params are in the key
    assert fake_openai.count() == 3
    assert again.cached and again.attempts == 0 and again.content == first.content == "answer 1"
    assert (again.prompt_tokens, again.completion_tokens) == (first.prompt_tokens, first.completion_tokens)
    assert not other.cached and not hotter.cached and client.stats.cache_hits == 1
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3
    # a fresh client (another process, a rerun) sees the same cache
    with LLMClient(endpoint(fake_openai), cache=cache) as client2:
        assert client2.chat(MESSAGES, cache_extra="img1.jpg").cached
    assert fake_openai.count() == 3


def test_torn_cache_entry_is_a_miss(fake_openai, tmp_path):
    cache = ResponseCache(str(tmp_path))
    with LLMClient(endpoint(fake_openai), cache=cache) as client:
        client.chat(MESSAGES)
        (entry,) = list(tmp_path.rglob("*.json"))
        entry.write_text('{"content": "half')
        assert not client.chat(MESSAGES).cached
    assert fake_openai.count() == 2


def test_rate_cap_and_concurrency_cap_hold(fake_openai):
    n, rps = 12, 20.0
    fake_openai.responder = lambda req: Reply(content="x", delay_s=0.05)
    with LLMClient(endpoint(fake_openai, requests_per_second=rps, max_concurrency=3)) as client:
        t0 = time.monotonic()
        results = client.chat_many([{"messages": MESSAGES} for _ in range(n)], max_workers=8)
        elapsed = time.monotonic() - t0
    assert all(r.content == "x" for r in results)
    assert elapsed >= (n - 1) / rps * 0.9  # burst 1: n requests span at least (n - 1) intervals
    assert fake_openai.max_in_flight <= 3
    starts = sorted(r.time for r in fake_openai.chat_requests)
    assert starts[-1] - starts[0] >= (n - 1) / rps * 0.8


def test_api_key_from_env_var(fake_openai, monkeypatch):
    monkeypatch.setenv("VITUNE_TEST_KEY", "sk-test-123")
    with LLMClient(endpoint(fake_openai, api_key_env="VITUNE_TEST_KEY")) as client:
        client.chat(MESSAGES)
    with LLMClient(endpoint(fake_openai, api_key_env="VITUNE_UNSET_KEY")) as client:
        client.chat(MESSAGES)
    first, second = fake_openai.chat_requests
    assert first.headers.get("Authorization") == "Bearer sk-test-123"
    assert "Authorization" not in second.headers


def test_limiter_leases_expire_and_tokens_refill():
    core = LimiterCore(max_concurrency=1, requests_per_second=2.0, lease_ttl_s=10.0)
    lease, wait = core.try_acquire(now=100.0)
    assert lease and wait == 0
    assert core.try_acquire(now=100.1)[0] is None  # slot taken
    core.release(lease)
    lease2, wait2 = core.try_acquire(now=100.1)  # slot free, but the bucket needs 0.5 s per token
    assert lease2 is None and wait2 == pytest.approx(0.4)
    lease3, _ = core.try_acquire(now=100.6)
    assert lease3
    # its holder dies without releasing: the slot comes back once the lease expires
    assert core.try_acquire(now=105.0)[0] is None
    assert core.try_acquire(now=110.7)[0] is not None and core.expired == 1


def test_retry_after_is_capped(fake_openai):
    fake_openai.fail_next(1, status=429, retry_after=3600)  # "come back in an hour"
    sleeps = Sleeps()
    with LLMClient(endpoint(fake_openai, max_retry_after_s=0.05), sleep=sleeps) as client:
        assert client.chat(MESSAGES).content == "OK."
    assert sleeps == [0.05]
    date = email.utils.formatdate(time.time() + 7200, usegmt=True)
    fake_openai.queue(Reply(status=503, headers={"Retry-After": date}))
    with LLMClient(endpoint(fake_openai, max_retry_after_s=0.05), sleep=sleeps) as client:
        assert client.chat(MESSAGES).content == "OK."
    assert sleeps == [0.05, 0.05]


def test_the_cache_is_keyed_by_endpoint_and_model(fake_openai, tmp_path):
    cache = ResponseCache(str(tmp_path / "cache"))
    fake_openai.responder = lambda req: f"from A as {req.body['model']}"
    with FakeOpenAI(default_content="from B") as other:
        with LLMClient(endpoint(fake_openai), cache=cache) as a, LLMClient(endpoint(other), cache=cache) as b:
            assert a.chat(MESSAGES).content == "from A as fake"
            answer = b.chat(MESSAGES)  # same model and messages, another endpoint: asked, not served A's answer
            assert answer.content == "from B" and not answer.cached
        with LLMClient(endpoint(fake_openai, model="bigger"), cache=cache) as a2:
            assert a2.chat(MESSAGES).content == "from A as bigger"  # same endpoint, another model: a miss
        # a trailing slash or the host's case is the same endpoint
        with LLMClient(endpoint(fake_openai, base_url=fake_openai.base_url.upper().replace("HTTP", "http") + "/"),
                       cache=cache) as same:
            assert same.chat(MESSAGES).cached
    assert fake_openai.count() == 2 and other.count() == 1


def test_the_key_never_follows_a_redirect_to_another_host(fake_openai, monkeypatch):
    monkeypatch.setenv("VITUNE_TEST_KEY", "sk-secret-1")
    with FakeOpenAI() as elsewhere:
        fake_openai.queue(Reply(status=307, headers={"Location": elsewhere.base_url + "/chat/completions"}))
        with LLMClient(endpoint(fake_openai, api_key_env="VITUNE_TEST_KEY")) as client:
            with pytest.raises(LLMError, match="redirect .* not followed") as err:
                client.chat(MESSAGES)
            # a request built for another origin (however it came to be) is refused before it is sent
            with pytest.raises(LLMError, match="refused to send"):
                client._http.post(elsewhere.base_url + "/chat/completions", json={})
        assert elsewhere.count() == 0 and err.value.attempts == 1
    assert fake_openai.chat_requests[0].headers.get("Authorization") == "Bearer sk-secret-1"


def test_a_spent_budget_stops_requests_but_not_cache_hits(fake_openai, tmp_path):
    budget = Budget(max_tokens=10)
    limiter = LocalLimiter(4, None, budget=budget)
    cache = ResponseCache(str(tmp_path))
    with LLMClient(endpoint(fake_openai), cache=cache, limiter=limiter) as client:
        first = client.chat(MESSAGES)  # 5 prompt + 1 completion word: 6 of 10
        client.chat(MESSAGES, cache_extra="b")  # 12 of 10: spent
        with pytest.raises(BudgetExhausted, match="12 of 10 tokens"):
            client.chat(MESSAGES, cache_extra="c")
        assert client.chat(MESSAGES).content == first.content  # what was paid for is still there, free
    assert fake_openai.count() == 2 and budget.tokens == 12
    cost = Budget(max_cost=0.01, price_per_1k_prompt=1.0, price_per_1k_completion=2.0)
    cost.spend(5, 1)
    assert not cost.exhausted and round(cost.cost, 6) == 0.007
    cost.spend(5, 1)
    assert cost.exhausted
