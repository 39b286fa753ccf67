"""The serving engine without Ray: a failure tied to one request fails that request alone while its batch goes on,
and repeated failures of the shared step turn the engine's health bad (so Serve replaces the replica)."""

from __future__ import annotations

import asyncio
import time

import pytest
from PIL import Image

from vitune.config import ModelConfig, ServeConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model.folder import save_model_folder
from vitune.model.vision import load_vision_tower
from vitune.model.vlm import build_model
from vitune.serve.engine import ServingEngine
from vitune.serve.errors import GenerationFailed, RequestRejected
from vitune.serve.request import ChatRequest


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = ModelConfig()
    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(cfg.vision)
    model = build_model(cfg, tokenizer, tower.hidden_size)
    folder = save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(tmp_path_factory.mktemp("m") / "m"))
    engine = ServingEngine.from_config(ServeConfig(model=folder, warmup=False, max_batch_size=16,
                                                   batch_wait_timeout_s=0.02, max_batch_wait_s=0.05,
                                                   unhealthy_after_failures=2))
    yield engine
    engine.close()


def good(i: int) -> ChatRequest:
    image = Image.new("RGB", (40 + i, 30), (10 * i, 50, 90)) if i % 2 else None
    text = ("<image>\n" if image else "") + f"Question number {i}?"
    return ChatRequest(turns=[{"from": "human", "value": text}], images=[image] if image else [], max_tokens=12,
                       temperature=0.7, seed=i)


def closed_image() -> Image.Image:
    image = Image.new("RGB", (40, 30))
    image.close()  # any use raises: an image that fails in the tower's preprocessing
    return image


HOSTILE = {
    "seed beyond 64 bits": ChatRequest(turns=[{"from": "human", "value": "hi"}], seed=2**70, temperature=1.0,
                                       max_tokens=4),
    "broken image": ChatRequest(turns=[{"from": "human", "value": "<image>\nhi"}], images=[closed_image()],
                                max_tokens=4),
    "untokenisable turn": ChatRequest(turns=[{"from": "human", "value": None}], max_tokens=4),  # type: ignore[dict-item]
}


async def run_mixed(engine: ServingEngine) -> tuple[list[dict], dict[str, dict]]:
    async def late(chat: ChatRequest, delay: float) -> dict:
        await asyncio.sleep(delay)  # join while the good ones decode
        return await engine.complete(chat)

    goods = [late(good(i), 0.01 * i) for i in range(8)]
    bads = [late(chat, 0.03 + 0.02 * k) for k, chat in enumerate(HOSTILE.values())]
    results = await asyncio.gather(*goods, *bads)
    return list(results[:8]), dict(zip(HOSTILE, results[8:], strict=True))


def test_one_bad_request_fails_alone(engine):
    goods, bads = asyncio.run(run_mixed(engine))
    assert [r["type"] for r in goods] == ["result"] * 8, goods
    assert all(r["completion_tokens"] >= 1 for r in goods)
    seed = bads["seed beyond 64 bits"]["error"]
    assert isinstance(seed, RequestRejected) and seed.param == "seed" and seed.code == "invalid_value"
    untokenisable = bads["untokenisable turn"]["error"]
    assert isinstance(untokenisable, RequestRejected) and untokenisable.code == "invalid_prompt"
    empty = bads["broken image"]
    assert empty["type"] == "error" and isinstance(empty["error"], GenerationFailed)
    # the client sees a request id, never the exception's text
    assert "request id chatcmpl-" in empty["error"].message and "ValueError" not in empty["error"].message
    stats = engine.stats()
    assert stats["batch_failures"] == 0 and stats["request_failures"] >= 1
    assert engine.health() is None


def test_seeded_answers_do_not_depend_on_a_failing_neighbour(engine):
    alone = asyncio.run(engine.complete(good(3)))
    goods, _ = asyncio.run(run_mixed(engine))
    assert goods[3]["text"] == alone["text"]


def test_health_fails_after_repeated_shared_step_failures_and_recovers(engine):
    assert engine.health() is None
    lm = engine.model.lm
    forward = lm.forward

    def broken(*args, **kwargs):  # the decoder itself failing (a device fault), not one request's input
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    lm.forward = broken
    try:
        for _ in range(2):
            out = asyncio.run(engine.complete(good(2)))
            assert isinstance(out["error"], GenerationFailed) and "illegal memory" not in out["error"].message
        assert "decode steps failed" in (engine.health() or "")
    finally:
        lm.forward = forward
    assert asyncio.run(engine.complete(good(2)))["type"] == "result"
    assert engine.health() is None


def test_a_stuck_step_makes_the_engine_unhealthy(engine):
    engine.cfg.stuck_after_s = 0.2
    lm = engine.model.lm
    forward = lm.forward

    def slow(*args, **kwargs):
        time.sleep(0.6)
        return forward(*args, **kwargs)

    lm.forward = slow
    try:
        async def probe() -> str | None:
            chat = good(4)
            chat.max_tokens = 1  # the prefill's forward is the slow step
            task = asyncio.ensure_future(engine.complete(chat))
            await asyncio.sleep(0.45)
            reason = engine.health()
            await task
            return reason

        assert "has run for" in (asyncio.run(probe()) or "")
    finally:
        lm.forward = forward
        engine.cfg.stuck_after_s = 300
    assert engine.health() is None
