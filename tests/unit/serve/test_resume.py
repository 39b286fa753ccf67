"""Resuming a stream on another replica (`vitune.serve.resume`): the replayed text is checked and skipped, and a
pinned seed makes a sampled request's replay (among other neighbours, on another engine) give the same tokens."""

from __future__ import annotations

import asyncio

import pytest

from vitune.config import ServeConfig
from vitune.serve.engine import ServingEngine
from vitune.serve.openai import SEED_MAX
from vitune.serve.request import ChatRequest
from vitune.serve.resume import Replay, ReplayDiverged, pin_seed, resumable


def test_replay_skips_exactly_what_was_sent_across_differently_cut_deltas():
    replay = Replay()
    assert [replay.fresh(t) for t in ("Hel", "lo, w")] == ["Hel", "lo, w"]
    replay.restart()  # the replica was lost: the new try sends the same text in other pieces
    assert [replay.fresh(t) for t in ("H", "ello", ", wor", "ld")] == ["", "", "or", "ld"]
    replay.finished()
    assert replay.sent == "Hello, world"


@pytest.mark.parametrize("deltas", [["Help"], ["Hel", "p!"], ["", "X"]])
def test_a_replay_that_differs_is_refused(deltas):
    replay = Replay()
    replay.fresh("Hello")
    replay.restart()
    with pytest.raises(ReplayDiverged, match="differs"):
        for t in deltas:
            replay.fresh(t)


def test_a_replay_that_ends_short_is_refused():
    replay = Replay()
    replay.fresh("Hello")
    replay.restart()
    replay.fresh("Hell")
    with pytest.raises(ReplayDiverged, match="1 characters short"):
        replay.finished()


def test_pin_seed_gives_sampled_requests_their_own_seed_only():
    sampled, greedy, seeded = (ChatRequest(turns=[], temperature=0.7), ChatRequest(turns=[], temperature=0),
                               ChatRequest(turns=[], temperature=0.7, seed=5))
    for chat in (sampled, greedy, seeded):
        pin_seed(chat)
    assert sampled.seed is not None and 0 <= sampled.seed <= SEED_MAX
    assert greedy.seed is None and seeded.seed == 5


def _engine(folder: str) -> ServingEngine:
    return ServingEngine.from_config(ServeConfig(model=folder, warmup=False, max_batch_size=8,
                                                 batch_wait_timeout_s=0.02, max_batch_wait_s=0.05))


@pytest.fixture(scope="module")
def two_engines(tiny_model_folder):
    """Two engines over one model folder: two replicas, as the resume sees them."""
    engines = (_engine(tiny_model_folder), _engine(tiny_model_folder))
    yield engines
    for e in engines:
        e.close()


async def _deltas(engine: ServingEngine, chat: ChatRequest) -> list[str]:
    return [ev["text"] async for ev in engine.generate(chat) if ev["type"] == "delta"]


async def _with_neighbours(engine: ServingEngine, chat: ChatRequest) -> list[str]:
    others = [ChatRequest(turns=[{"from": "human", "value": f"Other {i}?"}], max_tokens=24, temperature=1.0)
              for i in range(5)]
    results = await asyncio.gather(_deltas(engine, chat), *[engine.complete(o) for o in others])
    return results[0]


def test_a_pinned_sampled_stream_resumes_on_another_engine_to_the_same_text(two_engines):
    first, second = two_engines
    chat = ChatRequest(turns=[{"from": "human", "value": "Tell me about the picture."}], max_tokens=40,
                       temperature=1.0, top_p=0.95)
    pin_seed(chat)
    text = "".join(asyncio.run(_deltas(first, chat)))
    assert len(text) > 4, text
    # the client got part of the answer from the first replica, then that replica was lost
    replay = Replay()
    sent = replay.fresh(text[: len(text) // 2])
    replay.restart()
    rest = "".join(replay.fresh(t) for t in asyncio.run(_with_neighbours(second, chat)))
    replay.finished()
    assert sent + rest == text and rest, (sent, rest, text)


class Lost(Exception):
    """Stands for the replica-lost errors (RayActorError, ...) the API replica passes to `resumable`."""


class Events:
    """A streamed call's events as Serve's generator gives them: async iteration and `cancel()`."""

    def __init__(self, items: list, hang: bool = False) -> None:
        self.items, self.hang, self.cancelled = list(items), hang, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        if self.hang:
            await asyncio.sleep(3600)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


def _delta(text: str) -> dict:
    return {"type": "delta", "text": text}


START, FINISH = {"type": "start", "prompt_tokens": 3}, {"type": "finish", "finish_reason": "stop",
                                                         "completion_tokens": 4}


async def _collect(events, again, timeout_s: float = 5.0) -> list[dict]:
    return [ev async for ev in resumable(events, again, (Lost,), 2, timeout_s, "req-1")]


def test_resumable_resumes_on_another_call_and_skips_the_text_sent():
    first = Events([_delta("Hel"), Lost("replica died")])  # its start was read by the caller already
    second = Events([START, _delta("Hello"), _delta(" world"), FINISH])
    out = asyncio.run(_collect(first, lambda: second))
    assert [ev.get("text") for ev in out] == ["Hel", "lo", " world", None] and out[-1] == FINISH
    assert not second.cancelled


def test_resumable_gives_up_after_its_retries_and_refuses_a_different_replay():
    calls = iter([Events([START, Lost()]), Events([START, Lost()]), Events([START, _delta("x")])])
    with pytest.raises(Lost):
        asyncio.run(_collect(Events([_delta("a"), Lost()]), lambda: next(calls)))
    with pytest.raises(ReplayDiverged):
        asyncio.run(_collect(Events([_delta("abc"), Lost()]), lambda: Events([START, _delta("abd"), FINISH])))


def test_resumable_bounds_the_resumed_call_and_cancels_it():
    hanging = Events([], hang=True)
    with pytest.raises(TimeoutError):
        asyncio.run(_collect(Events([_delta("a"), Lost()]), lambda: hanging, timeout_s=0.2))
    assert hanging.cancelled


def test_resumable_cancels_the_call_when_the_caller_stops_early():
    events = Events([_delta("a"), _delta("b"), FINISH])

    async def first_only() -> None:
        gen = resumable(events, lambda: None, (Lost,), 2, 5.0, "req-1")
        assert (await gen.__anext__())["text"] == "a"
        await gen.aclose()

    asyncio.run(first_only())
    assert events.cancelled
