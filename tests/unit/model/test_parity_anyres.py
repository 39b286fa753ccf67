"""AnyRes parity with transformers: LlavaNextForConditionalGeneration (spatial_unpad, image newline) and
LlavaOnevisionForConditionalGeneration (anyres_max_9), same weights, same logits.

vitune's tiny parts (the open_clip tower, the mlp2x_gelu projector, the tiny Llama, the image newline) are
copied into a tiny transformers model by the product's own llava-hf mapping (`vitune.model.llava_hf`). Each
side runs its own path from the PIL image: vitune's tiles (`encode_image_tiles`), packing and splice with
ONE `<image>` token; transformers' own PIL image processor, its vision tower, `pack_image_features` and
as many image tokens as `vision_recipe.visual_tokens` counts (transformers refuses a count that does not
match its features). Images of odd aspect ratios, down to 1x1 and up to 20:1, scaled to the 32-px tiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vitune.config import ModelConfig, VisionConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model import llava_hf
from vitune.model.vision import VisionTower, encode_image_tiles, load_vision_tower
from vitune.model.vlm import VisionLanguageModel, build_model
from vitune.vision_recipe import VisionRecipe, parse_grid_pinpoints, unpadded_shape, visual_tokens

ATOL = 1e-4
# LLaVA-1.6's grid ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]) at 32-px tiles, (h, w)
LLAVA_16_GRID_PX = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
SIZES = [(1, 1), (10, 200), (200, 10), (40, 30), (33, 8), (400, 300), (333, 77)]  # (width, height)
# transformers 5 module names of the published llava-hf checkpoint names the export writes
HF_NAMES = (("vision_tower.vision_model.", "model.vision_tower."), ("multi_modal_projector.",
            "model.multi_modal_projector."), ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."))


@dataclass
class Pair:
    ours: VisionLanguageModel
    hf: nn.Module
    tower: VisionTower
    processor: object  # transformers' PIL image processor for the same geometry


def _recipe(pinpoints: str | list, max_tiles: int | None = None) -> VisionRecipe:
    base = VisionRecipe.of(VisionConfig())
    return dataclasses.replace(base, image_mode="anyres", grid_pinpoints=parse_grid_pinpoints(pinpoints, 32),
                               max_tiles=max_tiles)


def _hf_state(ours: VisionLanguageModel, tower: VisionTower) -> dict[str, torch.Tensor]:
    width = ours.lm.get_input_embeddings().embedding_dim
    act, projector = llava_hf.projector_tensors(ours.projector, "mlp2x_gelu", width, ours.dtype)
    assert act == "gelu"
    tensors = {**llava_hf.tower_tensors(tower.visual), **projector, **llava_hf.lm_tensors(ours.lm)}
    out = {"model.image_newline": ours.image_newline.detach()}
    for key, tensor in tensors.items():
        new, old = next((new, old) for old, new in HF_NAMES if key.startswith(old))
        out[new + key[len(old):]] = tensor.detach()
    return out


def _pair(recipe: VisionRecipe, onevision: bool) -> Pair:
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(VisionConfig(), recipe=recipe)
    ours = build_model(ModelConfig(projector="mlp2x_gelu"), tokenizer, tower.hidden_size, recipe=tower.recipe).eval()
    # Larger random weights than the 0.02 init (and a newline of norm ~8), so a misplaced feature moves the logits.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in ours.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2, generator=gen)
        ours.image_newline.normal_(0.0, 1.0, generator=gen)
    fields = {"vision_config": CLIPVisionConfig(**llava_hf.clip_vision_config(tower.visual)).to_dict(),
              "text_config": ours.lm.config.to_dict(), "image_token_index": ours.image_token_id,
              "image_grid_pinpoints": [list(p) for p in recipe.grid_pinpoints], "vision_feature_layer": -2,
              "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"}
    pixels = {"image_grid_pinpoints": [list(p) for p in recipe.grid_pinpoints], "image_mean": list(tower.mean),
              "image_std": list(tower.std), "resample": 3}
    if onevision:
        config = LlavaOnevisionConfig(**fields, vision_aspect_ratio=f"anyres_max_{recipe.max_tiles}")
        hf = LlavaOnevisionForConditionalGeneration(config)
        processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, **pixels)
    else:
        hf = LlavaNextForConditionalGeneration(LlavaNextConfig(**fields))
        processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                               **pixels)
    hf.load_state_dict(_hf_state(ours, tower), strict=True)
    return Pair(ours, hf.eval(), tower, processor)


@pytest.fixture(scope="module")
def next_pair() -> Pair:
    return _pair(_recipe(LLAVA_16_GRID_PX), onevision=False)


@pytest.fixture(scope="module")
def onevision_pair() -> Pair:
    return _pair(_recipe("(1x1),...,(6x6)", max_tiles=9), onevision=True)



def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _hf_ids(ids: list[int], image_id: int, count: int) -> list[int]:
    return [t for tok in ids for t in ([tok] * count if tok == image_id else [tok])]


def _logits(pair: Pair, image: Image.Image, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(vitune's, transformers') logits for one prompt with `image`."""
    width, height = image.size
    count = visual_tokens(pair.ours.recipe, width, height)
    inputs = pair.processor(images=image, return_tensors="pt")
    hf_ids = torch.tensor([_hf_ids(ids, pair.ours.image_token_id, count)])
    with torch.no_grad():
        expected = pair.hf(input_ids=hf_ids, pixel_values=inputs["pixel_values"],
                           image_sizes=inputs["image_sizes"]).logits
        got = pair.ours(torch.tensor([ids]), image_features=encode_image_tiles(pair.tower, [image]),
                        image_sizes=[(width, height)]).logits
    return got, expected


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_llava_next_logits_match(next_pair: Pair, width: int, height: int) -> None:
    ids = [1, 300, 301, next_pair.ours.image_token_id, 302, 303]
    got, expected = _logits(next_pair, _image(width, height), ids)
    assert got.shape == expected.shape == (1, len(ids) - 1 + visual_tokens(next_pair.ours.recipe, width, height),
                                           next_pair.hf.config.text_config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=ATOL)


def test_the_newline_and_the_unpadding_are_where_transformers_puts_them(next_pair: Pair) -> None:
    ids = [1, 300, next_pair.ours.image_token_id, 302]
    image = _image(333, 77)
    _, expected = _logits(next_pair, image, ids)
    feats = encode_image_tiles(next_pair.tower, [image])
    newline = next_pair.ours.image_newline.detach().clone()
    with torch.no_grad():
        next_pair.ours.image_newline.zero_()
        blank = next_pair.ours(torch.tensor([ids]), image_features=feats, image_sizes=[(333, 77)]).logits
        next_pair.ours.image_newline.copy_(newline)
    assert (blank[:, 2:] - expected[:, 2:]).abs().max() > 1e-2  # the newline is in the sequence, and it matters
    rows, cols = unpadded_shape(next_pair.ours.recipe, 333, 77)
    assert rows < cols and rows * cols < (len(feats[0]) - 1) * 16  # padding rows were removed


def test_a_batch_of_sizes_equals_each_image_alone(next_pair: Pair) -> None:
    ours, img = next_pair.ours, next_pair.ours.image_token_id
    images = [_image(10, 200), _image(400, 300)]
    samples = [[1, 300, img, 301], [1, 310, 311, 312, 313, 314, 315], [1, img, 320, 321, 322]]
    width = max(map(len, samples))
    ids = torch.tensor([s + [ours.pad_token_id] * (width - len(s)) for s in samples])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in samples])
    with torch.no_grad():
        batched = ours(ids, mask, image_features=encode_image_tiles(next_pair.tower, images),
                       image_sizes=[im.size for im in images])
    alone = [_logits(next_pair, images[0], samples[0])[1], None, _logits(next_pair, images[1], samples[2])[1]]
    with torch.no_grad():
        alone[1] = next_pair.hf(input_ids=torch.tensor([samples[1]])).logits
    for row, expected in enumerate(alone):
        length = expected.shape[1]
        assert int(batched.attention_mask[row].sum()) == length
        torch.testing.assert_close(batched.logits[row, :length], expected[0], rtol=1e-5, atol=ATOL)


def test_greedy_generation_follows_the_anyres_logits(next_pair: Pair) -> None:
    ours, img = next_pair.ours, next_pair.ours.image_token_id
    images = [_image(200, 10), _image(33, 8)]
    prompts = [[1, 300, img, 301], [1, img, 320, 321, 322]]
    feats = encode_image_tiles(next_pair.tower, images)
    sizes = [im.size for im in images]
    out = ours.generate(prompts, feats, image_sizes=sizes, max_new_tokens=3, stop_token_ids=[])
    for prompt, image, tokens in zip(prompts, images, out, strict=True):
        ids = list(prompt)
        for token in tokens:  # each token is the argmax of transformers' logits for the sequence so far
            _, expected = _logits(next_pair, image, ids)
            assert token == int(expected[0, -1].argmax())
            ids.append(token)
    assert out == [ours.generate([p], [f], image_sizes=[s], max_new_tokens=3, stop_token_ids=[])[0]
                   for p, f, s in zip(prompts, feats, sizes, strict=True)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_llava_onevision_anyres_max_logits_match(onevision_pair: Pair, width: int, height: int) -> None:
    ids = [1, 300, onevision_pair.ours.image_token_id, 302, 303]
    got, expected = _logits(onevision_pair, _image(width, height), ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=ATOL)


def test_onevision_cases_include_a_downsampled_grid(onevision_pair: Pair) -> None:
    recipe = onevision_pair.ours.recipe
    capped = [(w, h) for w, h in SIZES
              if unpadded_shape(recipe, w, h) != unpadded_shape(dataclasses.replace(recipe, max_tiles=None), w, h)]
    assert capped  # the anyres_max_9 bilinear downsampling is exercised above
