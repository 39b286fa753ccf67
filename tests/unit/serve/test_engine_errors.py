"""The engine answers in domain errors (`vitune.serve.errors`); only the HTTP layer gives them statuses and OpenAI's
shape (`vitune.serve.openai.engine_error`, `vitune.serve.relay`), with the bodies the API has always returned."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest
from PIL import Image
from ray.exceptions import ActorUnavailableError

from vitune.config import ServeConfig
from vitune.serve import relay
from vitune.serve.engine import ServingEngine
from vitune.serve.errors import EngineError, GenerationFailed, QueueFull, ReplicaClosing, RequestRejected
from vitune.serve.openai import APIError, engine_error
from vitune.serve.request import ChatRequest


@pytest.fixture(scope="module")
def engine(tiny_model_folder):
    engine = ServingEngine.from_config(ServeConfig(model=tiny_model_folder, warmup=False))
    yield engine
    engine.close()


def body(err: APIError) -> dict:
    return {"status": err.status, **err.body()["error"]}


@pytest.mark.parametrize(("err", "expected"), [
    (RequestRejected("bad seed", "seed", "invalid_value"),
     {"status": 400, "message": "bad seed", "type": "invalid_request_error", "param": "seed", "code": "invalid_value"}),
    (RequestRejected("no fit", "turns"),
     {"status": 400, "message": "no fit", "type": "invalid_request_error", "param": "messages", "code": None}),
    (RequestRejected("no system", "system"), {"status": 400, "param": "messages"}),
    (RequestRejected("two images", "images"), {"status": 400, "param": "messages"}),
    (QueueFull.waiting(7),
     {"status": 429, "message": "this replica already has 7 requests waiting; retry shortly",
      "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}),
    (ReplicaClosing.now(),
     {"status": 503, "message": "the model replica is shutting down", "type": "server_error", "param": None,
      "code": "overloaded"}),
    (GenerationFailed.of("chatcmpl-1"),
     {"status": 500, "message": "generation failed on the server (request id chatcmpl-1); the cause is in the "
      "server log", "type": "server_error", "param": None, "code": "internal_error"}),
    (EngineError("unknown kind"), {"status": 500, "type": "server_error"}),
])
def test_the_http_layer_maps_each_domain_error_to_its_status_and_body(err, expected):
    got = body(engine_error(err))
    assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize("err", [RequestRejected("r", "max_tokens", "context_length_exceeded"), QueueFull.waiting(3),
                                 ReplicaClosing.now(), GenerationFailed.of("chatcmpl-2")])
def test_domain_errors_cross_processes_intact(err):
    back = pickle.loads(pickle.dumps(err))  # they travel in events through Serve's handles
    assert type(back) is type(err) and (back.message, back.param, back.code) == (err.message, err.param, err.code)


def rejection(engine: ServingEngine, chat: ChatRequest) -> dict:
    """What the client gets for a request the engine's admission refuses."""
    with pytest.raises(RequestRejected) as info:
        prepare(engine, chat)
    return body(engine_error(info.value))


def prepare(engine: ServingEngine, chat: ChatRequest):
    """`engine.prepare` as the engine calls it: with the caller's event loop."""
    async def run():
        return engine.prepare(chat)
    return asyncio.run(run())


def image() -> Image.Image:
    return Image.new("RGB", (64, 64), (20, 40, 60))


def test_admission_refusals_keep_the_apis_bodies(engine):
    n = engine.tower.num_patches
    ask = {"from": "human", "value": "<image>\nWhat is it?"}
    over = rejection(engine, ChatRequest(turns=[ask], images=[image()], max_tokens=100_000))
    assert over["param"] == "max_tokens" and over["code"] == "context_length_exceeded"
    assert over["message"].startswith(f"this model's context length is {engine.context_length} tokens; the prompt "
                                      "takes ")
    assert over["message"].endswith(f"(the image {n}) and max_tokens asks for 100000 more")
    long = rejection(engine, ChatRequest(turns=[{"from": "human", "value": "one two three " * 400}]))
    assert long["param"] == "messages" and long["code"] == "context_length_exceeded"
    assert "and the prompt takes" in long["message"] and "(the image" not in long["message"]
    unplaced = rejection(engine, ChatRequest(turns=[{"from": "human", "value": "What is it?"}], images=[image()]))
    assert unplaced == {"status": 400, "message": "the prompt holds 0 image tokens but the request has an image",
                        "type": "invalid_request_error", "param": "messages", "code": None}
    turn_order = rejection(engine, ChatRequest(turns=[{"from": "gpt", "value": "Hi."}]))
    assert turn_order["param"] == "messages" and turn_order["message"].startswith(
        "the messages do not fit this model's 'vicuna_v1' conversation template: ")
    assert rejection(engine, ChatRequest(turns=[ask], images=[image()], max_tokens=0)) == {
        "status": 400, "message": "max_tokens must be at least 1, got 0", "type": "invalid_request_error",
        "param": "max_tokens", "code": None}
    assert rejection(engine, ChatRequest(turns=[ask], images=[image()], temperature=-1))["param"] == "temperature"
    assert rejection(engine, ChatRequest(turns=[ask], images=[image()], top_p=0))["param"] == "top_p"
    assert rejection(engine, ChatRequest(turns=[ask], images=[image()], seed=2**64))["code"] == "invalid_value"


def test_the_prompt_budget_counts_each_image_as_its_visual_tokens(engine):
    chat = ChatRequest(turns=[{"from": "human", "value": "<image>\nWhat is it?"}], images=[image()], max_tokens=4)
    job = prepare(engine, chat)
    assert job.prompt_tokens == len(job.row.prompt_ids) - 1 + engine.visual_tokens(64, 64)
    assert engine.info()["image_positions"] == engine.visual_tokens(engine.tower.image_size, engine.tower.image_size)


def test_a_full_queue_and_a_closing_engine_answer_in_events(tiny_model_folder):
    engine = ServingEngine.from_config(ServeConfig(model=tiny_model_folder, warmup=False))
    chat = ChatRequest(turns=[{"from": "human", "value": "Hi?"}], max_tokens=2)

    async def first_event() -> dict:
        return await anext(aiter(engine.generate(chat)))

    engine.cfg.max_batch_size = engine.cfg.max_queued = 0  # no free row, no room to wait: refused (limits are live)
    full = asyncio.run(first_event())
    assert full["type"] == "error" and isinstance(full["error"], QueueFull)
    engine.close()
    closing = asyncio.run(first_event())
    assert closing["type"] == "error" and isinstance(closing["error"], ReplicaClosing)


class Hanging:
    """A handle call that never answers: awaitable, iterable and cancellable like Serve's."""

    def __init__(self) -> None:
        self.cancelled = False

    def __await__(self):
        return asyncio.sleep(3600).__await__()

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        await asyncio.sleep(3600)
        return {}

    def cancel(self) -> None:
        self.cancelled = True


class Answered:
    """A handle call that answers `value` (awaited) or yields `events` (iterated)."""

    def __init__(self, value: object = None, events: list | None = None) -> None:
        self.value, self.events, self.cancelled = value, list(events or []), False

    def __await__(self):
        async def value() -> object:
            return self.value
        return value().__await__()

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


def test_a_timeout_is_one_503_whether_answer_or_stream(engine):
    calls = []

    def call() -> Hanging:
        calls.append(Hanging())
        return calls[-1]

    errors = []
    for attempt in (relay.complete(call, 0.05, "r1"), relay.open_stream(call, 0.05, "r1")):
        with pytest.raises(APIError) as info:
            asyncio.run(attempt)
        errors.append(body(info.value))
    assert errors[0] == errors[1] == body(relay.timed_out(0.05)) == {
        "status": 503, "message": "the model did not answer within 0 s; retry shortly", "type": "server_error",
        "param": None, "code": "timeout"}
    assert all(c.cancelled for c in calls)


class Lost(Answered):
    """A call whose replica is gone: awaiting it, or its first event, raises what Ray raises then."""

    def __await__(self):
        async def value() -> object:
            raise ActorUnavailableError("replica gone", None)
        return value().__await__()

    async def __anext__(self) -> dict:
        raise ActorUnavailableError("replica gone", None)


@pytest.mark.parametrize("streamed", [False, True], ids=["answer", "stream"])
def test_a_lost_replica_is_retried_then_answered_as_overloaded(streamed):
    """Both the whole answer and the stream's first event: a lost replica is tried `RETRIES` more times on
    another, each lost call cancelled; the answer of the first that answers is returned; all lost → 503."""
    answer = {"type": "done", "text": "ok"}
    start = relay.open_stream if streamed else relay.complete
    answered = Answered(events=[answer]) if streamed else Answered(answer)
    calls, made = [Lost(), Lost(), answered], []

    def call() -> Answered:
        made.append(calls[len(made)])
        return made[-1]

    out = asyncio.run(start(call, 5, "r4"))
    assert (out[1] if streamed else out) == answer and made == calls
    assert calls[0].cancelled and calls[1].cancelled and not answered.cancelled
    gone: list[Lost] = []

    def lost() -> Lost:
        gone.append(Lost())
        return gone[-1]

    with pytest.raises(APIError) as info:
        asyncio.run(start(lost, 5, "r5"))
    assert len(gone) == relay.RETRIES + 1 and all(g.cancelled for g in gone)
    assert info.value.status == 503 and info.value.code == "overloaded"


def test_the_relay_maps_the_engines_error_events():
    rejected = {"type": "error", "error": RequestRejected("no fit", "turns")}
    with pytest.raises(APIError) as info:
        asyncio.run(relay.complete(lambda: Answered(rejected), 5, "r2"))
    assert info.value.status == 400 and info.value.param == "messages"
    with pytest.raises(APIError) as info:
        asyncio.run(relay.open_stream(lambda: Answered(events=[rejected]), 5, "r2"))
    assert info.value.status == 400 and info.value.message == "no fit"

    async def stream() -> list[str]:
        events = Answered(events=[{"type": "delta", "text": "Hel"},
                                  {"type": "error", "error": GenerationFailed.of("r3")}])
        start = {"type": "start", "prompt_tokens": 3}
        return [chunk async for chunk in relay.sse_answer(events, Hanging, start, "r3", 0, "m", False, 5)]

    chunks = "".join(asyncio.run(stream())).split("\n\n")
    assert chunks[-2] == "data: [DONE]"
    assert json.loads(chunks[-3].removeprefix("data: ")) == engine_error(GenerationFailed.of("r3")).body()
