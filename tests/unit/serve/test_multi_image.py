"""Several images per request, `image_url.detail` and the image limits, without Ray or HTTP: OpenAI requests go
through `chat_request_from_openai` (the API replica's checks) into a `ServingEngine` of a tiny pad model and of a
tiny anyres model (LLaVA-NeXT tiles, a count per image size), and each refusal is a 400 in OpenAI's shape."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vitune.config import ModelConfig, ServeConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model.folder import save_model_folder
from vitune.model.vision import encode_image_tiles, load_vision_tower
from vitune.model.vlm import build_model
from vitune.serve.engine import ServingEngine
from vitune.serve.errors import RequestRejected
from vitune.serve.openai import APIError, engine_error, parse_request
from vitune.serve.request import ChatRequest, chat_request_from_openai, load_image
from vitune.vision_recipe import VisionRecipe, parse_grid_pinpoints, visual_tokens

GRID_PX = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-1.6's grid at the tiny tower's 32-px tiles
FAST = {"warmup": False, "batch_wait_timeout_s": 0.02, "max_batch_wait_s": 0.05}


def _recipe() -> VisionRecipe:
    return VisionRecipe(tower="vitune-tiny-vit", pretrained=None, feature_layer=-2, select="patch",
                        image_mode="anyres", image_size=32, patch_size=8, hidden_size=64,
                        grid_pinpoints=parse_grid_pinpoints(GRID_PX, 32))


def _sharpen(model) -> None:
    """Random weights large enough that what the images hold changes the greedy answer."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3, generator=gen)


def _folder(tmp_path_factory, anyres: bool) -> str:
    cfg = ModelConfig()
    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(cfg.vision, recipe=_recipe() if anyres else None)
    model = build_model(cfg, tokenizer, tower.hidden_size, recipe=tower.recipe if anyres else None).eval()
    _sharpen(model)
    out = tmp_path_factory.mktemp("anyres" if anyres else "pad") / "model"
    return save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(out), include_lm=True)


@pytest.fixture(scope="module")
def pad_folder(tmp_path_factory) -> str:
    return _folder(tmp_path_factory, anyres=False)


@pytest.fixture(scope="module")
def anyres_folder(tmp_path_factory) -> str:
    return _folder(tmp_path_factory, anyres=True)


@pytest.fixture(scope="module")
def pad_engine(pad_folder):
    engine = ServingEngine.from_config(ServeConfig(model=pad_folder, **FAST))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def anyres_engine(anyres_folder):
    # warmup on: the anyres warmup (tiles + sizes) runs too
    engine = ServingEngine.from_config(ServeConfig(model=anyres_folder, **{**FAST, "warmup": True}))
    yield engine
    engine.close()


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header says `width` x `height` and whose pixel data is a few garbage bytes (built in
    microseconds): decoding it would fail as corrupt, so a size refusal proves nothing was decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_part(image: Image.Image | str, detail: str | None = None) -> dict:
    url = image if isinstance(image, str) else png_url(image)
    return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}


def user(text: str, *images: Image.Image | str | dict) -> dict:
    parts = [p if isinstance(p, dict) else image_part(p) for p in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def chat_of(engine: ServingEngine, messages: list[dict], **body) -> ChatRequest:
    req = parse_request({"messages": messages, "max_tokens": 6, "temperature": 0, **body})
    return asyncio.run(chat_request_from_openai(req, engine.cfg, engine.info()))


def refusal(coro) -> APIError:
    with pytest.raises(APIError) as info:
        asyncio.run(coro)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


def prepare(engine: ServingEngine, chat: ChatRequest):
    async def run():
        return engine.prepare(chat)
    return asyncio.run(run())


def image_spans(engine: ServingEngine, chat: ChatRequest) -> list[int]:
    """The lengths of the runs of image positions in the engine's spliced prompt for `chat`, in order."""
    job = prepare(engine, chat)
    features = encode_image_tiles(engine.tower, job.images, job.base_only)
    extra = {"image_sizes": job.row.image_sizes} if engine.anyres else {}
    with torch.no_grad():
        mask = engine.model.splice(torch.tensor([job.row.prompt_ids]), None, features, **extra).image_mask[0]
    runs, current = [], 0
    for hit in mask.tolist():
        if hit:
            current += 1
        elif current:
            runs, current = [*runs, current], 0
    return runs + ([current] if current else [])


A, B = noise(90, 40, 1), noise(30, 70, 2)  # different sizes: an anyres model gives them different counts


@pytest.mark.parametrize("which", ["pad", "anyres"])
def test_two_images_in_one_message_and_across_messages_are_both_used(which, request):
    engine = request.getfixturevalue(f"{which}_engine")
    one_message = chat_of(engine, [user("Compare them.", A, B)])
    across = chat_of(engine, [user("First?", A), {"role": "assistant", "content": "A picture."},
                              user("And this one?", B)])
    # each image_url part is one <image> of its message's turn, in front of its text (the prompt policy's
    # image_first), in order over the messages
    assert one_message.turns[0]["value"] == "<image>\n<image>\nCompare them."
    assert [t["value"] for t in across.turns] == ["<image>\nFirst?", "A picture.", "<image>\nAnd this one?"]
    counts = [visual_tokens(engine.tower.recipe, *im.size) for im in (A, B)]
    if which == "anyres":
        assert one_message.images[0].size == A.size  # an anyres image keeps its size (its tiles depend on it)
        assert counts[0] != counts[1]
    for chat in (one_message, across):
        assert image_spans(engine, chat) == counts  # two spans, each of its own image's count, in order
        job = prepare(engine, chat)
        assert job.prompt_tokens == len(job.row.prompt_ids) - 2 + sum(counts)
    answers = {name: asyncio.run(engine.complete(chat)) for name, chat in {
        "both": one_message, "first only": chat_of(engine, [user("Compare them.", A)]),
        "swapped": chat_of(engine, [user("Compare them.", B, A)])}.items()}
    assert all(a["type"] == "result" for a in answers.values()), answers
    assert answers["both"]["prompt_tokens"] == prepare(engine, one_message).prompt_tokens
    assert answers["both"]["text"] != answers["first only"]["text"]  # the second image is used
    assert answers["both"]["text"] != answers["swapped"]["text"]  # in its order


@pytest.mark.parametrize("which", ["pad", "anyres"])
def test_a_mixed_batch_of_0_1_and_2_image_requests_decodes_each_as_alone(which, request):
    engine = request.getfixturevalue(f"{which}_engine")
    chats = [
        [user("No picture here?")],
        [user("What is it?", noise(40, 30, 3))],
        [user("Two?", noise(200, 20, 4), noise(33, 80, 5))],
        [user("Low and high?", image_part(noise(64, 64, 6), "low"), noise(50, 50, 7))],
        [user("One more?", noise(20, 90, 8))],
        [user("And two low?", image_part(noise(70, 30, 9), "low"), image_part(noise(30, 70, 10), "low"))],
    ]
    alone = [asyncio.run(engine.complete(chat_of(engine, messages))) for messages in chats]

    async def together() -> list[dict]:
        async def late(messages: list[dict], delay: float) -> dict:
            await asyncio.sleep(delay)  # join while the earlier ones decode
            req = parse_request({"messages": messages, "max_tokens": 6, "temperature": 0})
            return await engine.complete(await chat_request_from_openai(req, engine.cfg, engine.info()))
        return await asyncio.gather(*(late(m, 0.005 * i) for i, m in enumerate(chats)))

    before = engine.stats()["max_batch"]
    batched = asyncio.run(together())
    assert [r["type"] for r in batched] == ["result"] * len(chats), batched
    assert [(r["text"], r["prompt_tokens"]) for r in batched] == [(r["text"], r["prompt_tokens"]) for r in alone]
    assert max(before, 2) <= engine.stats()["max_batch"]  # rows with different image counts decoded together
    assert engine.stats()["request_failures"] == 0


def test_detail_low_gives_the_base_view_count_for_an_anyres_recipe(anyres_engine, pad_engine):
    recipe = anyres_engine.tower.recipe
    base = recipe.grid * recipe.grid  # the base view's patch tokens (anyres keeps patch tokens only)
    for size in [(90, 40), (30, 70), (20, 300), (32, 32)]:
        assert visual_tokens(recipe, *size, base_only=True) == base < visual_tokens(recipe, *size)
    image = noise(90, 40, 11)
    low = chat_of(anyres_engine, [user("Low?", image_part(image, "low"))])
    high = chat_of(anyres_engine, [user("Low?", image_part(image, "high"))])
    auto = chat_of(anyres_engine, [user("Low?", image)])
    assert low.details == ["low"] and low.images[0].size == (32, 32)  # the base view, made in the API replica
    assert high.images[0].size == auto.images[0].size == (90, 40)
    assert image_spans(anyres_engine, low) == [base]
    assert image_spans(anyres_engine, high) == image_spans(anyres_engine, auto) == [visual_tokens(recipe, 90, 40)]
    answers = [asyncio.run(anyres_engine.complete(chat)) for chat in (low, high)]
    assert [a["type"] for a in answers] == ["result", "result"]
    assert answers[1]["prompt_tokens"] - answers[0]["prompt_tokens"] == visual_tokens(recipe, 90, 40) - base
    # a pad model has one view per image: low changes nothing
    pad = pad_engine.tower.recipe
    assert visual_tokens(pad, 90, 40, base_only=True) == visual_tokens(pad, 90, 40) == pad.tokens_per_tile
    pad_low = chat_of(pad_engine, [user("Low?", image_part(image, "low"))])
    pad_auto = chat_of(pad_engine, [user("Low?", image)])
    assert pad_low.images[0].tobytes() == pad_auto.images[0].tobytes()
    assert asyncio.run(pad_engine.complete(pad_low))["text"] == asyncio.run(pad_engine.complete(pad_auto))["text"]


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (10000, 10000), (5000, 5000)],
                         ids=["PIL's-bomb-error", "PIL's-bomb-warning", "over-max_image_pixels"])
def test_an_image_whose_header_is_too_large_is_refused_before_decoding(width, height):
    url = "data:image/png;base64," + base64.b64encode(header_only_png(width, height)).decode()
    cfg = ServeConfig(model="unused")  # max_image_pixels 16M by default
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # handled inside, never escaping
        err = refusal(load_image(url, cfg, "messages[0].content[0].image_url"))
    assert err.code == "image_too_large" and err.param == "messages[0].content[0].image_url", err.message
    assert f"over the limit of {cfg.max_image_pixels}" in err.message
    if width == 5000:
        assert "5000x5000" in err.message  # the header's own size
        # the same bytes under a larger limit reach the decoder, which finds the garbage pixel data: the refusal
        # above came from the header alone
        assert refusal(load_image(url, ServeConfig(model="unused", max_image_pixels=30_000_000))).code == \
            "invalid_image"
    # in a request: the second image refuses it, naming its part, before the model sees anything
    req = parse_request({"messages": [user("Both?", noise(20, 20, 1), url)], "max_tokens": 4})
    err = refusal(chat_request_from_openai(req, cfg))
    assert err.code == "image_too_large" and err.param == "messages[0].content[1].image_url"


def test_too_many_images_is_a_400_naming_the_first_part_over_the_limit(pad_engine):
    cfg = ServeConfig(model="unused", max_images_per_request=3)
    bad = "data:image/png;base64,@@"  # never decoded: the count refuses the request first
    req = parse_request({"messages": [user("a", bad, bad), {"role": "assistant", "content": "b"},
                                      user("c", bad, bad)], "max_tokens": 4})
    err = refusal(chat_request_from_openai(req, cfg))
    assert err.code == "too_many_images" and err.param == "messages[2].content[1]", (err.param, err.message)
    assert "at most 3 images" in err.message
    assert refusal(chat_request_from_openai(parse_request({"messages": [user("a", bad)]}),
                                            ServeConfig(model="unused", max_images_per_request=0))).code == \
        "too_many_images"
    # the engine holds the same limit for a ChatRequest from elsewhere (its default, 4)
    five = ChatRequest(turns=[{"from": "human", "value": "<image>\n" * 5 + "five?"}],
                       images=[noise(20, 20, i) for i in range(5)], max_tokens=2)
    with pytest.raises(RequestRejected) as info:
        prepare(pad_engine, five)
    api = engine_error(info.value)
    assert (api.status, api.param, api.code) == (400, "messages", "too_many_images")


def test_too_many_visual_tokens_is_a_400_and_its_batch_neighbour_still_answers(anyres_folder):
    recipe = _recipe()
    big, small = noise(96, 32, 12), noise(32, 32, 13)
    high = visual_tokens(recipe, *big.size)
    limit = high + recipe.tokens_per_tile  # the big image and a low one fit; the big one and a high one not
    assert visual_tokens(recipe, *small.size) > recipe.tokens_per_tile
    engine = ServingEngine.from_config(ServeConfig(model=anyres_folder, max_visual_tokens_per_request=limit, **FAST))
    try:
        over = chat_of(engine, [user("Too much?", big, small)])
        fits = chat_of(engine, [user("Fits?", big, image_part(small, "low"))])
        plain = chat_of(engine, [user("Just text?")])

        async def together() -> list[dict]:
            return await asyncio.gather(*(engine.complete(c) for c in (over, fits, plain)))

        refused, answered, text_only = asyncio.run(together())
        assert answered["type"] == "result" and text_only["type"] == "result", (answered, text_only)
        assert refused["type"] == "error"
        api = engine_error(refused["error"])
        assert (api.status, api.param, api.code) == (400, "messages", "too_many_visual_tokens")
        assert f"limit of {limit}" in api.message and str(high + visual_tokens(recipe, 32, 32)) in api.message
        assert engine.info()["max_visual_tokens"] == limit
    finally:
        engine.close()
