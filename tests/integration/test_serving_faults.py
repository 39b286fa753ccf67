"""Fault injection on the live serving app (the README's Reliability rows a–c) and overload/health behaviour.

(a) an engine replica killed under 32-concurrent load: at most 1% of requests fail, the rest are 200, and Serve
replaces the replica; (b) 1,000 requests at 32 concurrency: no non-2xx; (c) a property-based stream of malformed
and hostile requests while well-formed ones run: no well-formed failure, every hostile one a 4xx. Plus: overload
answers 503/429 with Retry-After from `build_app`'s own limits, and `/healthz` turns 503 while no engine replica
can answer. Each test logs its figures (`FIGURES ...`) for the README table.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

MODEL = "vitune-tiny"
APP = "vitune-faults"
CONCURRENCY = 32


def png_data_url(size: tuple[int, int] = (40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE_URL = png_data_url()


def well_formed(i: int) -> dict:
    content: object = f"Question {i}?"
    if i % 4 == 0:
        content = [{"type": "text", "text": f"Question {i}?"}, {"type": "image_url", "image_url": {"url": IMAGE_URL}}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0.7 if i % 2 else 0, "seed": i, "stream": i % 5 == 0}


async def send(http: httpx.AsyncClient, payload: dict) -> int:
    """One request; its status (a stream counts as failed unless it ends with [DONE] and no error)."""
    if not payload.get("stream"):
        r = await http.post("/v1/chat/completions", json=payload)
        return r.status_code
    async with http.stream("POST", "/v1/chat/completions", json=payload) as r:
        lines = [line async for line in r.aiter_lines() if line]
    if r.status_code == 200 and (lines[-1:] != ["data: [DONE]"] or any('"error"' in line for line in lines)):
        return 500
    return r.status_code


async def load(url: str, total: int, on_progress=None) -> list[int]:
    """`total` well-formed requests from CONCURRENCY workers; their statuses (exceptions count as 599)."""
    statuses: list[int] = []
    counter = iter(range(total))

    async def worker(http: httpx.AsyncClient) -> None:
        for i in counter:
            try:
                statuses.append(await send(http, well_formed(i)))
            except httpx.HTTPError:
                statuses.append(599)
            if on_progress:
                on_progress(len(statuses))

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*[worker(http) for _ in range(CONCURRENCY)])
    return statuses


def engine_replicas(app: str) -> dict[str, int]:
    from ray import serve

    states = serve.status().applications[app].deployments["VLMEngine"].replica_states
    return {str(getattr(k, "value", k)): v for k, v in states.items()}


def wait_for(predicate, timeout_s: float, what: str, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s:.0f}s"
        time.sleep(every)


def both_answering() -> bool:
    """Two engine replicas RUNNING, and both answer this process's calls."""
    return engine_replicas(APP).get("RUNNING", 0) == 2 and len(replica_actors(APP, 20)) == 2


def run_lengths(values: list[int]) -> list[tuple[int, int]]:
    """[200, 200, 503, 200] -> [(200, 2), (503, 1), (200, 1)]"""
    runs: list[tuple[int, int]] = []
    for v in values:
        runs[-1:] = [(v, runs[-1][1] + 1)] if runs and runs[-1][0] == v else [*runs[-1:], (v, 1)]
    return runs


def replica_actors(app: str, tries: int = 40) -> set[str]:
    """Names of the engine replicas' actors, as they answer `stats` (the router spreads the calls)."""
    from ray import serve

    handle = serve.get_deployment_handle("VLMEngine", app_name=app)
    return {handle.stats.remote().result()["actor"] for _ in range(tries)}


@pytest.fixture(scope="module")
def fault_app(serve_http, tiny_model_folder):
    """Two engine replicas behind one API replica (so one can be killed while the other serves)."""
    from ray import serve

    url = serve_http.deploy(APP, "/faults", {"model": tiny_model_folder, "served_model_name": MODEL,
                                             "max_batch_size": 16, "max_queued": 16},
                            engine_options={"num_replicas": 2})
    yield url
    serve.delete(APP)


def test_b_1000_requests_at_32_concurrency_all_succeed(fault_app):
    started = time.monotonic()
    statuses = asyncio.run(load(fault_app, 1000))
    seconds = time.monotonic() - started
    non_2xx = [s for s in statuses if not 200 <= s < 300]
    log.warning("FIGURES (b) %d requests at %d concurrency: %d non-2xx in %.1f s (%.1f req/s)", len(statuses),
                CONCURRENCY, len(non_2xx), seconds, len(statuses) / seconds)
    assert len(statuses) == 1000 and not non_2xx, sorted(set(non_2xx))


def test_a_replica_killed_under_load_loses_at_most_one_percent(fault_app):
    import ray

    before = replica_actors(APP)
    assert len(before) == 2, before
    victim = sorted(before)[0]
    total, killed = 600, threading.Event()

    def kill_at_a_third(done: int) -> None:
        if done >= total // 3 and not killed.is_set():
            killed.set()
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    statuses = asyncio.run(load(fault_app, total, kill_at_a_third))
    failed = [s for s in statuses if s != 200]
    assert killed.is_set()
    # Serve replaces the killed replica
    wait_for(lambda: both_answering() and victim not in replica_actors(APP, 10), 90, "a replacement replica")
    log.warning("FIGURES (a) replica killed after %d of %d requests at %d concurrency: %d failed (%.2f%%) %s",
                total // 3, len(statuses), CONCURRENCY, len(failed), 100 * len(failed) / len(statuses),
                sorted(set(failed)))
    assert len(statuses) == total and len(failed) <= total // 100, sorted(set(failed))


def replica_stats(app: str, expect: int = 2, tries: int = 40) -> dict[str, dict]:
    """Each engine replica's `stats`, by actor name (the router spreads the calls; stops once `expect` answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("VLMEngine", app_name=app)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        stats = handle.stats.remote().result()
        seen.setdefault(stats["actor"], stats)
        if len(seen) == expect:
            break
    return seen


def test_a_stream_cut_by_a_lost_replica_resumes_on_another(fault_app):
    """The replica decoding a stream is killed mid-answer: the stream still ends with [DONE], no error, and its
    text is the unstreamed answer's (the API replica ran it again on the other replica and skipped the text
    already sent)."""
    import ray

    wait_for(both_answering, 90, "two engine replicas answering")
    # a sampled request with its own seed (greedy ones end early on the random tiny model): the first seed whose
    # answer is long enough to be cut mid-way
    for seed in range(20):
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                   "max_tokens": 440, "temperature": 0.8, "seed": seed}
        whole = httpx.post(f"{fault_app}/v1/chat/completions", json=payload, timeout=120).json()
        assert "choices" in whole, whole
        if whole["usage"]["completion_tokens"] >= 200:
            break
    assert whole["usage"]["completion_tokens"] >= 200, whole["usage"]
    expected = whole["choices"][0]["message"]["content"]
    parts, victim, lines = [], None, []
    with httpx.stream("POST", f"{fault_app}/v1/chat/completions", json={**payload, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines += [line] if line else []
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            parts += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
            if victim is None and "".join(parts):
                stats = replica_stats(APP)
                busy = [name for name, st in stats.items() if st["running"]]
                assert len(busy) == 1 and len(stats) == 2, stats
                victim, cut_at = busy[0], len("".join(parts))
                survivor, survivor_tokens = next((n, st["tokens"]) for n, st in stats.items() if n != victim)
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    assert victim and lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), lines[-3:]
    resumed = "".join(parts)
    # the other replica decoded the whole answer again (its text up to the cut was checked and skipped)
    redone = replica_stats(APP)[survivor]["tokens"] - survivor_tokens
    assert redone >= whole["usage"]["completion_tokens"], (redone, whole["usage"])
    log.warning("FIGURES stream whose replica was killed when the client had read %d characters (more in flight): "
                "%d characters in all, equal to the unstreamed answer: %s; the other replica decoded %d tokens for it",
                cut_at, len(resumed), resumed == expected, redone)
    assert resumed == expected
    wait_for(both_answering, 90, "a replacement replica")


def test_healthz_is_503_while_no_engine_replica_can_answer(fault_app):
    """Every engine replica killed: /healthz says 503 (with Retry-After) until Serve has replaced them; any
    request that fails meanwhile is a retryable 503, never a 500."""
    import ray

    # both replicas answering (a replacement from an earlier test may be RUNNING before this process's router
    # knows it: killing only the ones that answered would leave it serving, and /healthz rightly 200)
    wait_for(both_answering, 90, "two engine replicas answering")
    assert httpx.get(f"{fault_app}/healthz", timeout=30).status_code == 200
    for name in replica_actors(APP):
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    seen: list[int] = []
    statuses: list[httpx.Response] = []

    def probe() -> bool:
        r = httpx.get(f"{fault_app}/healthz", timeout=30)
        seen.append(r.status_code)
        if r.status_code == 503:
            assert r.headers.get("retry-after") and r.json()["status"] == "unavailable"
        return 503 in seen and r.status_code == 200

    def ask() -> None:
        statuses.append(httpx.post(f"{fault_app}/v1/chat/completions", json=well_formed(1), timeout=120))

    asker = threading.Thread(target=ask)
    asker.start()
    started = time.monotonic()
    try:
        wait_for(probe, 90, "/healthz 503 then 200 again", every=0.1)
    except AssertionError as exc:  # the sequence seen says which half was missed
        raise AssertionError(f"{exc}; /healthz answered {run_lengths(seen)}") from None
    log.warning("FIGURES healthz after every engine replica was killed: %s (status, answers) in %.1f s",
                run_lengths(seen), time.monotonic() - started)
    asker.join(timeout=120)
    assert all(r.status_code == 200 or (r.status_code == 503 and r.headers.get("retry-after")) for r in statuses)


def test_overload_answers_503_or_429_with_retry_after_from_build_app_limits(serve_http, tiny_model_folder):
    """No deployment options given: the queue limits come from the app's args alone (as `build_app` does)."""
    from ray import serve

    url = serve_http.deploy("vitune-overload", "/overload",
                            {"model": tiny_model_folder, "served_model_name": MODEL, "max_batch_size": 1,
                             "max_queued": 1, "max_pending_requests": 2})
    try:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                payload = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 32}
                return await asyncio.gather(*[http.post("/v1/chat/completions", json=payload) for _ in range(16)])

        responses = asyncio.run(burst())
    finally:
        serve.delete("vitune-overload")
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and set(statuses) <= {200, 429, 503}, statuses
    refused = [r for r in responses if r.status_code != 200]
    assert len(refused) >= 16 - (1 + 1 + 2) - 2, statuses  # at most batch + queue + pending held (+ in transit)
    shapes = [(r.status_code, r.headers.get("retry-after"), r.text[:200]) for r in refused]
    assert all(r.headers.get("retry-after") and r.json()["error"]["type"] for r in refused), shapes


def test_request_timeout_answers_503_and_stops_the_work(serve_http, tiny_model_folder, fault_app):
    """`request_timeout_s` live: a long answer not ready in time is a 503 with Retry-After (code `timeout`), its
    decoding stops on the replica (far fewer tokens than the whole answer), and a short request still succeeds."""
    from ray import serve

    long = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 440,
            "temperature": 0.8}
    # the whole answer's length, from the app without the short timeout: the first seed with a long one
    for seed in range(20):
        t0 = time.perf_counter()
        whole = httpx.post(f"{fault_app}/v1/chat/completions", json={**long, "seed": seed}, timeout=120).json()
        whole_s = time.perf_counter() - t0
        if whole["usage"]["completion_tokens"] >= 200:
            break
    full_tokens = whole["usage"]["completion_tokens"]
    assert full_tokens >= 200, whole["usage"]
    t0 = time.perf_counter()
    httpx.post(f"{fault_app}/v1/chat/completions", json={**long, "max_tokens": 2}, timeout=120).raise_for_status()
    short_s = time.perf_counter() - t0
    # 0.3 s, or less on a machine fast enough to decode the whole answer in about that: between the short and the
    # whole answer's times (their geometric mean), so the short one fits and the long one cannot
    timeout_s = round(min(0.3, max(math.sqrt(whole_s * short_s), 0.02)), 3)
    url = serve_http.deploy("vitune-timeout", "/timeout", {"model": tiny_model_folder, "served_model_name": MODEL,
                                                           "request_timeout_s": timeout_s})
    try:
        short = httpx.post(f"{url}/v1/chat/completions", json={**long, "max_tokens": 2}, timeout=120)
        assert short.status_code == 200, short.text  # in time (and the API replica has the tower's geometry)
        engine = serve.get_deployment_handle("VLMEngine", app_name="vitune-timeout")
        before = engine.stats.remote().result()["tokens"]
        r = httpx.post(f"{url}/v1/chat/completions", json={**long, "seed": seed}, timeout=120)
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert r.json()["error"]["code"] == "timeout", r.text
        wait_for(lambda: engine.stats.remote().result()["running"] == 0, 30, "the timed-out request dropped")
        decoded = engine.stats.remote().result()["tokens"] - before
    finally:
        serve.delete("vitune-timeout")
    log.warning("FIGURES request_timeout_s=%s (whole answer %.2f s, short %.2f s): 503 timeout; %d of the answer's "
                "%d tokens decoded before the replica dropped it", timeout_s, whole_s, short_s, decoded, full_tokens)
    assert 0 < decoded < full_tokens, (decoded, full_tokens)  # it was decoding, and stopped


# -- (c) hostile requests, generated, while well-formed ones run --

def _valid() -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


_NOT_INT = st.one_of(st.text(max_size=5), st.floats(allow_nan=False), st.booleans(), st.none().map(lambda _: []))
_BAD_FIELDS = {
    "seed": st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1), st.text(max_size=4),
                      st.floats(allow_nan=False), st.booleans()),
    "temperature": st.one_of(st.floats(min_value=2.0001, allow_infinity=False), st.floats(max_value=-0.0001,
                             allow_infinity=False), st.text(max_size=4), st.booleans(), st.lists(st.integers())),
    "top_p": st.one_of(st.floats(min_value=1.0001, allow_infinity=False), st.just(0), st.floats(max_value=-1e-9,
                       allow_infinity=False), st.text(max_size=3)),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=100_000), _NOT_INT),
    "n": st.one_of(st.integers(min_value=2), st.integers(max_value=0), st.text(max_size=2)),
    "stop": st.one_of(st.lists(st.text(min_size=1, max_size=3), min_size=5, max_size=8),
                      st.text(min_size=257, max_size=300), st.integers(), st.just([""])),
    "stream": st.one_of(st.integers(), st.text(max_size=4), st.floats(allow_nan=False)),
    "messages": st.one_of(
        st.just([]), st.text(max_size=5), st.integers(),
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["tool", "function", "robot", ""]),
                                        "content": st.text(max_size=5)}), min_size=1, max_size=2),
        st.just([{"role": "assistant", "content": "first"}]),
        st.builds(lambda t: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": t}}]}],
                  st.sampled_from(["data:image/png;base64,@@@", "data:image/png;base64," + "A" * 8,
                                   "http://169.254.169.254/latest/meta-data", "file:///etc/passwd",
                                   "s3://bucket/x.png", "data:image/png," + "x" * 10])),
        st.builds(lambda t: [{"role": "user", "content": f"look {t} <image> here"}], st.text(max_size=5)),
        st.builds(lambda n: [{"role": "user", "content": "x" * n}], st.integers(200_001, 210_000)),
    ),
    "model": st.one_of(st.text(min_size=1, max_size=8).filter(lambda m: m != MODEL), st.integers()),
    "logprobs": st.just(True),
}


@st.composite
def hostile(draw) -> tuple[str, bytes, dict[str, str]]:
    """(what, body, headers): a request that must be answered with a 4xx."""
    kind = draw(st.sampled_from(["field", "field", "field", "raw", "content-type", "constant", "json"]))
    headers = {"content-type": "application/json"}
    if kind == "field":
        name = draw(st.sampled_from(sorted(_BAD_FIELDS)))
        value = draw(_BAD_FIELDS[name])
        body = {**_valid(), name: value}
        return f"{name}={str(value)[:40]!r}", json.dumps(body).encode(), headers
    if kind == "raw":  # any bytes: not JSON, or JSON that is not a request
        raw = draw(st.binary(max_size=64))
        return f"raw {raw[:20]!r}", raw, headers
    if kind == "content-type":
        media = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                      "application/xml", ""]))
        return f"content-type {media!r}", json.dumps(_valid()).encode(), {"content-type": media}
    if kind == "constant":
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        raw = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + constant.encode() + b"}"
        return constant, raw, headers
    obj = draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k != "messages"),
                               st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                                 c, max_size=3),
                                            max_leaves=8), max_size=4))
    return f"json without messages {str(obj)[:40]}", json.dumps(obj).encode(), headers


def test_c_hostile_requests_get_4xx_while_well_formed_ones_succeed(chat_app):
    stop = threading.Event()
    good: list[int] = []

    def well_formed_stream(k: int) -> None:
        with httpx.Client(base_url=chat_app, timeout=120) as http:
            i = k
            while not stop.is_set():
                payload = well_formed(i)
                payload["stream"] = False
                good.append(http.post("/v1/chat/completions", json=payload).status_code)
                i += 8

    runners = [threading.Thread(target=well_formed_stream, args=(k,), daemon=True) for k in range(8)]
    for t in runners:
        t.start()
    bad: list[tuple[str, int, str]] = []
    try:
        with httpx.Client(base_url=chat_app, timeout=60) as http:
            @settings(max_examples=300, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(hostile())
            def check(case: tuple[str, bytes, dict[str, str]]) -> None:
                what, raw, headers = case
                r = http.post("/v1/chat/completions", content=raw, headers=headers)
                bad.append((what, r.status_code, r.text[:200]))
                assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
                error = r.json()["error"]
                assert error["type"] == "invalid_request_error" and error["message"]

            check()
    finally:
        stop.set()
        for t in runners:
            t.join(timeout=120)
    failures = [s for s in good if s != 200]
    log.warning("FIGURES (c) %d hostile requests: %d not 4xx; %d well-formed meanwhile: %d failed", len(bad),
                sum(not 400 <= s < 500 for _, s, _ in bad), len(good), len(failures))
    assert good and not failures, sorted(set(failures))
