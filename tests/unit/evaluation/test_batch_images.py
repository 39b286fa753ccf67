"""Batch evaluation's images, without Ray: `AnswerBatch` over a tiny random anyres model (LLaVA-NeXT tiles, images of
several aspect ratios, several images per row, text-only rows in the same batch) decodes each row as it decodes
alone; over a tiny pad model it gives what the model API gives directly; a row whose placeholders do not match its
images is answered with an error naming it while its neighbours are answered."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitune.config import ModelConfig
from vitune.data.prompt import PromptRejected
from vitune.data.tokenizer import load_tokenizer
from vitune.evaluation import llava_format
from vitune.evaluation.inference import (
    AnswerBatch,
    GenerationSettings,
    read_answers,
    request_images,
    run_batch_inference,
    single_turn,
)
from vitune.evaluation.synthetic import build_requests
from vitune.model.folder import save_model_folder
from vitune.model.vision import encode_images, load_vision_tower
from vitune.model.vlm import build_model
from vitune.vision_recipe import VisionRecipe, parse_grid_pinpoints, tiles_for, visual_tokens

GRID_PX = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-1.6's grid at the tiny tower's 32-px tiles
# wide, tall, square, very wide, very tall: different grids, so different visual-token counts
SIZES = [(48, 32), (20, 40), (32, 32), (96, 30), (30, 90)]
SETTINGS = GenerationSettings(max_new_tokens=6)


def _recipe() -> VisionRecipe:
    return VisionRecipe(tower="vitune-tiny-vit", pretrained=None, feature_layer=-2, select="patch",
                        image_mode="anyres", image_size=32, patch_size=8, hidden_size=64,
                        grid_pinpoints=parse_grid_pinpoints(GRID_PX, 32))


def _folder(tmp_path_factory, anyres: bool) -> str:
    """A tiny random model folder; weights large enough that what the images hold changes the greedy answer."""
    cfg = ModelConfig()
    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(cfg.vision, recipe=_recipe() if anyres else None)
    model = build_model(cfg, tokenizer, tower.hidden_size, recipe=tower.recipe if anyres else None).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3, generator=gen)
    out = tmp_path_factory.mktemp("anyres" if anyres else "pad") / "model"
    return save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(out), include_lm=True)


def _image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate(SIZES):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = folder / f"im{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return _image_files(tmp_path_factory)


@pytest.fixture(scope="module")
def anyres_batch(tmp_path_factory) -> AnswerBatch:
    return AnswerBatch(_folder(tmp_path_factory, True), str(tmp_path_factory.mktemp("answers")), SETTINGS)


@pytest.fixture(scope="module")
def pad_batch(tmp_path_factory) -> AnswerBatch:
    return AnswerBatch(_folder(tmp_path_factory, False), str(tmp_path_factory.mktemp("answers")), SETTINGS)


def _rows(images: list[str]) -> list[tuple[str, list[str], list[dict]]]:
    """Each image alone, a text-only row, and two rows of two images (both orders)."""
    rows = [(f"one{i}", [uri], single_turn("Describe the image.", 1)) for i, uri in enumerate(images)]
    rows.insert(2, ("text", [], single_turn("What is two plus two?", 0)))
    rows.append(("two", [images[0], images[3]], single_turn("Compare them.", 2)))
    rows.append(("two-swapped", [images[3], images[0]], single_turn("Compare them.", 2)))
    return rows


def _batched_and_alone(answer: AnswerBatch, rows) -> tuple[list[list[int]], list[list[int]]]:
    prepared = [answer._prepare(rid, uris, conv) for rid, uris, conv in rows]
    prompts, pil = [p for p, _ in prepared], [imgs for _, imgs in prepared]
    with torch.inference_mode():
        batched = answer.generate_ids(prompts, pil)
        alone = [answer.generate_ids([p], [imgs])[0] for p, imgs in zip(prompts, pil, strict=True)]
    return batched, alone


def _writing_to(answer: AnswerBatch, output_uri: str) -> AnswerBatch:
    """The same loaded model and settings, writing its shards under `output_uri` (one test, one folder)."""
    fresh = AnswerBatch.__new__(AnswerBatch)
    fresh.__dict__.update({**answer.__dict__, "output_uri": output_uri})
    return fresh


def _batch(rows) -> dict[str, np.ndarray]:
    """The columns `run_batch_inference` gives each actor."""
    return {"id": np.array([rid for rid, _, _ in rows]),
            "images": np.array([json.dumps(uris) for _, uris, _ in rows]),
            "conversations": np.array([json.dumps(conv) for _, _, conv in rows])}


def test_the_sizes_have_different_visual_token_counts_under_the_anyres_recipe():
    counts = {visual_tokens(_recipe(), w, h) for w, h in SIZES}
    assert len(counts) >= 3, counts


def test_an_anyres_batch_of_mixed_sizes_several_images_and_text_rows_decodes_each_row_as_alone(anyres_batch,
                                                                                               images):
    rows = _rows(images)
    _, pil = anyres_batch._prepare("x", images, single_turn("q", len(images)))
    feats, sizes = anyres_batch._features([pil])
    # each image goes as its recipe's tiles (base view + grid) with its (width, height): what anyres packs by
    assert sizes == [SIZES]
    assert [f.shape[0] for f in feats[0]] == [tiles_for(_recipe(), w, h) for w, h in SIZES]
    assert len({f.shape[0] for f in feats[0]}) >= 2  # tile counts differ across the aspect ratios
    batched, alone = _batched_and_alone(anyres_batch, rows)
    assert batched == alone
    assert all(batched), "every row generated at least one token"
    # the images reach the answer: the one-image rows (the same question) do not all answer alike
    one_image = [toks for (rid, _, _), toks in zip(rows, batched, strict=True) if rid.startswith("one")]
    assert len({tuple(t) for t in one_image}) > 1


def test_anyres_answers_through_the_actor_call_match_the_rows_decoded_alone(anyres_batch, images, tmp_path):
    rows = _rows(images)
    answer = _writing_to(anyres_batch, str(tmp_path))
    with torch.inference_mode():
        out = answer(_batch(rows))
    assert out["error"] == [""] * len(rows)
    texts = {rid: row["text"] for rid, row in read_answers(str(tmp_path)).items()}
    _, alone = _batched_and_alone(anyres_batch, rows)
    assert [len(toks) for toks in alone] == out["new_tokens"]
    for (rid, _, _), toks in zip(rows, alone, strict=True):
        assert texts[rid] == anyres_batch.tokenizer.decode(toks, skip_special_tokens=True).strip()


def test_a_pad_model_answers_as_the_model_api_gives_directly(pad_batch, images):
    rows = [r for r in _rows(images) if len(r[1]) <= 1]  # the one-image and text rows of before
    prepared = [pad_batch._prepare(rid, uris, conv) for rid, uris, conv in rows]
    prompts = [p for p, _ in prepared]
    with torch.inference_mode():
        ours = pad_batch.generate_ids(prompts, [imgs for _, imgs in prepared])
        # the model API as evaluation drove it before several images: one [N, Dv] per image row, no sizes
        feats = encode_images(pad_batch.tower, [imgs[0] for _, imgs in prepared if imgs])  # [M, N, Dv]
        it = iter(feats)
        per_prompt = [next(it) if imgs else None for _, imgs in prepared]
        s = SETTINGS
        direct = pad_batch.model.generate(prompts, per_prompt, max_new_tokens=s.max_new_tokens,
                                          temperature=s.temperature, top_p=s.top_p,
                                          stop_token_ids=pad_batch.stop_ids, seed=s.seed)
    assert ours == direct
    assert len({tuple(t) for t in ours}) > 1


def test_a_pad_model_decodes_two_image_rows_in_a_batch_as_alone(pad_batch, images):
    batched, alone = _batched_and_alone(pad_batch, _rows(images))
    assert batched == alone


@pytest.mark.parametrize("which", ["anyres", "pad"])
def test_a_row_whose_placeholders_do_not_match_its_images_is_an_error_naming_it(which, request, images, tmp_path):
    answer: AnswerBatch = request.getfixturevalue(f"{which}_batch")
    rows = [("fine", [images[0]], single_turn("Describe it.", 1)),
            ("bad-row", [images[0], images[1]], single_turn("Describe them.", 1)),
            ("text", [], single_turn("Hello?", 0))]
    fresh = _writing_to(answer, str(tmp_path))
    with torch.inference_mode():
        out = fresh(_batch(rows))
    assert out["error"][0] == "" and out["error"][2] == ""
    assert "request 'bad-row'" in out["error"][1]
    assert "holds 1 image tokens but the request has 2 images" in out["error"][1]
    assert out["new_tokens"][1] == 0 and out["new_tokens"][0] > 0
    assert read_answers(str(tmp_path))["bad-row"]["error"] == out["error"][1]


def test_a_malformed_image_field_is_refused_naming_the_request(tmp_path):
    assert request_images({"id": "a", "image": None}) == []
    assert request_images({"id": "a", "image": "x.png"}) == ["x.png"]
    assert request_images({"id": "a", "image": ["x.png", "y.png"]}) == ["x.png", "y.png"]
    with pytest.raises(ValueError, match="request 'b': image must be"):
        request_images({"id": "b", "image": {"url": "x.png"}})
    # before any model or Ray work
    with pytest.raises(ValueError, match="request 'c': image must be"):
        run_batch_inference([{"id": "c", "image": ["x.png", 3], "conversations": single_turn("q", 2)}],
                            str(tmp_path / "no-model"), str(tmp_path / "out"))


def test_synthetic_requests_keep_a_records_image_list_in_order():
    records = [{"id": "m", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "no"}]},
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yo"}]}]
    reqs = build_requests(records, "/data/images")
    assert reqs[0]["image"] == ["/data/images/a.png", "/data/images/b.png"]
    assert reqs[1]["image"] is None
    assert request_images(reqs[0]) == reqs[0]["image"]


def test_llava_format_questions_of_several_images_keep_their_placeholders_or_get_one_per_image(pad_batch, images):
    questions = [{"question_id": "q1", "image": "a.png", "text": "What is it?"},
                 {"question_id": "q2", "image": ["a.png", "b.png"], "text": "Left <image> or right <image>?"},
                 {"question_id": "q3", "image": ["a.png", "b.png"], "text": "Which is larger?"},
                 {"question_id": "q4", "image": ["a.png", "b.png"], "text": "Only <image> here?"}]
    reqs = llava_format.build_requests(questions, "/eval/images")
    assert reqs[0]["image"] == "/eval/images/a.png" and reqs[0]["conversations"] == single_turn("What is it?", 1)
    assert reqs[1]["image"] == ["/eval/images/a.png", "/eval/images/b.png"]
    assert reqs[1]["conversations"][0]["value"] == "Left <image> or right <image>?"  # interleaved, as written
    assert reqs[2]["conversations"] == single_turn("Which is larger?", 2)
    # the placeholder count against the images is the one prompt policy's check, for the row that is wrong
    pad_batch._prepare("q2", images[:2], reqs[1]["conversations"])
    with pytest.raises(PromptRejected, match="holds 1 image tokens but the request has 2 images"):
        pad_batch._prepare("q4", images[:2], reqs[3]["conversations"])
