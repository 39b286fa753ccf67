"""Batch evaluation and serving build byte-identical prompts for the same conversation and image: both real paths
(`AnswerBatch`'s preparation of a benchmark row; an OpenAI request through `chat_request_from_openai` and the
engine's `prepare`) over the tiny preset's model folder, tokenizer and tower."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitune.config import ServeConfig
from vitune.data.prompt import PromptRejected
from vitune.evaluation.inference import AnswerBatch, GenerationSettings, single_turn
from vitune.model.vision import encode_images
from vitune.serve.engine import ServingEngine
from vitune.serve.openai import parse_request
from vitune.serve.request import chat_request_from_openai


def png(size: tuple[int, int] = (48, 32)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def evaluation(tiny_model_folder, tmp_path_factory) -> AnswerBatch:
    return AnswerBatch(tiny_model_folder, str(tmp_path_factory.mktemp("answers")), GenerationSettings())


@pytest.fixture(scope="module")
def engine(tiny_model_folder):
    engine = ServingEngine.from_config(ServeConfig(model=tiny_model_folder, warmup=False))
    yield engine
    engine.close()


def served_images(engine: ServingEngine, text: str, images: list[bytes]) -> tuple[list[int], list[Image.Image]]:
    """The prompt ids (and images) a chat-completions request of `images` then `text` becomes on a model replica."""
    content: list[dict] = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                     + base64.b64encode(image).decode()}}
                           for image in images]
    content.append({"type": "text", "text": text})
    req = parse_request({"messages": [{"role": "user", "content": content}], "max_tokens": 8})

    async def prepare() -> tuple[list[int], list[Image.Image]]:
        chat = await chat_request_from_openai(req, engine.cfg, engine.info())  # as the API replica fits it
        return list(engine.prepare(chat).row.prompt_ids), list(chat.images)

    return asyncio.run(prepare())


def served(engine: ServingEngine, text: str, image: bytes | None) -> tuple[list[int], Image.Image | None]:
    """The prompt ids (and image) a chat-completions request becomes on a model replica."""
    ids, images = served_images(engine, text, [] if image is None else [image])
    return ids, (images or [None])[0]


@pytest.mark.parametrize("question", ["Describe the image.", "What colour is the top left corner? Answer briefly."])
def test_an_image_question_gets_the_same_ids_and_features_in_evaluation_and_serving(evaluation, engine, tmp_path,
                                                                                    question):
    data = png()
    (tmp_path / "q.png").write_bytes(data)
    eval_ids, (eval_image,) = evaluation._prepare("q1", str(tmp_path / "q.png"), single_turn(question, True))
    serve_ids, serve_image = served(engine, question, data)
    assert np.asarray(eval_ids, dtype=np.int64).tobytes() == np.asarray(serve_ids, dtype=np.int64).tobytes()
    assert eval_ids.count(engine.model.image_token_id) == 1
    # and the image reaches the tower alike: the API replica's fitting is undone by nothing, changes nothing
    eval_feats, serve_feats = encode_images(engine.tower, [eval_image, serve_image])
    torch.testing.assert_close(eval_feats, serve_feats, rtol=0, atol=0)


def test_a_two_image_item_gets_the_same_ids_and_features_in_evaluation_and_serving(evaluation, engine, tmp_path):
    first, second = png((48, 32)), png((20, 40))
    (tmp_path / "a.png").write_bytes(first)
    (tmp_path / "b.png").write_bytes(second)
    question = "Which image is wider?"
    # a benchmark row as training records write several images: a list, one <image> per image in order
    row_images = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    eval_ids, eval_images = evaluation._prepare("q5", row_images, single_turn(question, 2))
    serve_ids, serve_images = served_images(engine, question, [first, second])
    assert np.asarray(eval_ids, dtype=np.int64).tobytes() == np.asarray(serve_ids, dtype=np.int64).tobytes()
    assert eval_ids.count(engine.model.image_token_id) == 2
    assert [im.size for im in eval_images] == [(48, 32), (20, 40)]  # the row's order is the placeholders' order
    torch.testing.assert_close(encode_images(engine.tower, eval_images), encode_images(engine.tower, serve_images),
                               rtol=0, atol=0)


def test_a_text_question_gets_the_same_ids_in_evaluation_and_serving(evaluation, engine):
    question = "What is two plus two?"
    eval_ids, _ = evaluation._prepare("q2", None, single_turn(question, False))
    serve_ids, _ = served(engine, question, None)
    assert eval_ids == serve_ids and engine.model.image_token_id not in eval_ids


def test_evaluation_refuses_a_row_whose_placeholders_do_not_match_its_image(evaluation, tmp_path):
    (tmp_path / "q.png").write_bytes(png())
    with pytest.raises(PromptRejected, match="holds 0 image tokens but the request has an image") as info:
        evaluation._prepare("q3", str(tmp_path / "q.png"), single_turn("Describe it.", False))
    assert info.value.field == "images"
    with pytest.raises(PromptRejected, match="holds 1 image tokens but the request has no image"):
        evaluation._prepare("q4", None, single_turn("Describe it.", True))
    with pytest.raises(PromptRejected, match="holds 1 image tokens but the request has 2 images"):
        evaluation._prepare("q6", [str(tmp_path / "q.png")] * 2, single_turn("Describe them.", 1))
