"""Parity with transformers' LlavaForConditionalGeneration: same weights, same logits.

A tiny model is exported with `vitune.model.export` (the llava-hf layout) and loaded by transformers:
the open_clip tower becomes its CLIP vision model, our projector its multi-modal projector, our Llama its
language model + lm_head. Our model gets ONE
`<image>` token plus features; HF gets N image tokens plus pixel values. The logits must match at
every position, which pins the tower's feature layer, CLS handling, projector and splice at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from PIL import Image
from torch import nn

from vitune.config import ModelConfig, VisionConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model.export import export_llava_hf
from vitune.model.folder import save_model_folder
from vitune.model.vision import VisionTower, encode_images, load_vision_tower
from vitune.model.vlm import VisionLanguageModel, build_model

ATOL = 1e-5


@dataclass
class Pair:
    ours: VisionLanguageModel
    hf: nn.Module
    tower: VisionTower
    image_id: int
    num_patches: int


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    from transformers import LlavaForConditionalGeneration

    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(VisionConfig())
    model_cfg = ModelConfig(projector="mlp2x_gelu")
    ours = build_model(model_cfg, tokenizer, tower.hidden_size).eval()
    # Larger random weights than the 0.02 init, so that any misplaced feature moves the logits.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in ours.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2, generator=gen)
    # the product's own mapping: model folder → `vitune export --format llava-hf` → transformers
    tmp = tmp_path_factory.mktemp("parity")
    save_model_folder(ours, tokenizer, model_cfg, tower.fingerprint(), str(tmp / "vitune"))
    hf = LlavaForConditionalGeneration.from_pretrained(export_llava_hf(str(tmp / "vitune"), str(tmp / "hf"))).eval()
    return Pair(ours, hf, tower, ours.image_token_id, tower.num_patches)


def _pixels(tower: VisionTower) -> torch.Tensor:
    return torch.randn(1, 3, tower.image_size, tower.image_size, generator=torch.Generator().manual_seed(5))


def _hf_ids(ids: list[int], image_id: int, num_patches: int) -> list[int]:
    out: list[int] = []
    for tok in ids:
        out.extend([tok] * num_patches if tok == image_id else [tok])
    return out


def test_open_clip_tower_equals_hf_clip_hidden_state_minus_2(pair: Pair) -> None:
    pixels = _pixels(pair.tower)
    with torch.no_grad():
        hidden = pair.hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == pair.tower.num_layers + 1
    torch.testing.assert_close(pair.tower.encode(pixels), hidden[-2][:, 1:], rtol=0, atol=ATOL)


def test_logits_match_with_hf_own_features(pair: Pair) -> None:
    pixels = _pixels(pair.tower)
    with torch.no_grad():
        features = pair.hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    ids = [1, 300, 301, pair.image_id, 302, 303, 304]
    hf_ids = torch.tensor([_hf_ids(ids, pair.image_id, pair.num_patches)])
    with torch.no_grad():
        expected = pair.hf(input_ids=hf_ids, pixel_values=pixels).logits
        got = pair.ours(torch.tensor([ids]), image_features=features).logits
        blank = pair.ours(torch.tensor([ids]), image_features=torch.zeros_like(features)).logits
    assert got.shape == expected.shape == (1, len(ids) - 1 + pair.num_patches, pair.hf.config.text_config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    # the comparison is sensitive: other image features move the logits after the image by far more
    assert (blank[:, 3:] - expected[:, 3:]).abs().max() > 1e-2


def test_logits_match_from_pil_image_through_our_tower(pair: Pair) -> None:
    image = Image.new("RGB", (48, 20), (30, 140, 220))
    image.paste(Image.new("RGB", (10, 10), (250, 250, 0)), (5, 5))
    ids = [1, 310, pair.image_id, 311, 312]
    features = encode_images(pair.tower, [image])
    pixels = pair.tower.preprocess(image)[None]
    with torch.no_grad():
        expected = pair.hf(input_ids=torch.tensor([_hf_ids(ids, pair.image_id, pair.num_patches)]), pixel_values=pixels)
        got = pair.ours(torch.tensor([ids]), image_features=features)
    # two ViT implementations (open_clip's MultiheadAttention, HF's SDPA) round differently: fp32 rtol too
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=ATOL)


def test_logits_match_text_only(pair: Pair) -> None:
    ids = torch.tensor([[1, 400, 401, 402, 403, 2]])
    with torch.no_grad():
        torch.testing.assert_close(pair.ours(ids).logits, pair.hf(input_ids=ids).logits, rtol=0, atol=ATOL)


def test_logits_match_mixed_batch_right_padded(pair: Pair) -> None:
    pixels = _pixels(pair.tower)
    with torch.no_grad():
        features = pair.tower.encode(pixels)
    pad = pair.ours.pad_token_id
    with_image = [1, 320, pair.image_id, 321]
    text_only = [1, 330, 331, 332, 333, 334]
    hf_rows = [_hf_ids(with_image, pair.image_id, pair.num_patches), text_only]
    width = max(map(len, hf_rows))
    hf_ids = torch.tensor([row + [pad] * (width - len(row)) for row in hf_rows])
    hf_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in hf_rows])
    ours_rows = [with_image + [pad] * 2, text_only]
    ours_mask = torch.tensor([[1] * 4 + [0] * 2, [1] * 6])
    with torch.no_grad():
        expected = pair.hf(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=pixels).logits
        out = pair.ours(torch.tensor(ours_rows), attention_mask=ours_mask, image_features=features)
    assert torch.equal(out.attention_mask, hf_mask)
    for row, row_len in enumerate(len(r) for r in hf_rows):
        torch.testing.assert_close(out.logits[row, :row_len], expected[row, :row_len], rtol=0, atol=ATOL)
