"""AnyRes export: a vitune LLaVA-NeXT / OneVision model folder → llava-hf, loaded by transformers from the folder.

A tiny anyres vitune model (the tiny tower, mlp2x_gelu, the tiny Llama, random weights larger than the init and
a newline of norm ~8) is saved as a model folder and exported with `export_llava_hf`. transformers then reads
only the exported folder: `AutoModelForImageTextToText` (LlavaNext for spatial_unpad, LlavaOnevision for
anyres_max_N) and `AutoProcessor`, whose own output (the chat template's prompt, `input_ids` with the image
tokens expanded, `pixel_values`, `image_sizes`) feeds the model. Its logits equal vitune's own path
(`encode_image_tiles` → `model(..., image_sizes=...)`) on images of five odd aspect ratios. The processor's
image backend: PIL (`AutoImageProcessor.from_pretrained(OUT, backend="pil")`) gives vitune's tiles exactly;
the default (torchvision) backend is within one intensity level (its bicubic resize differs from PIL's).
A flat-merge model is refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitune.config import ModelConfig, VisionConfig
from vitune.data.masks import tokenize_generation_prompt
from vitune.data.tokenizer import load_tokenizer
from vitune.model import llava_hf
from vitune.model.export import export_llava_hf
from vitune.model.folder import save_model_folder
from vitune.model.vision import encode_image_tiles, load_vision_tower
from vitune.model.vlm import build_model
from vitune.vision_recipe import visual_tokens

LOGITS_ATOL = 1e-4
PIXELS_ATOL = 1e-5
# LLaVA-1.6's grid ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]) at the tiny tower's 32 px
LLAVA_16_GRID_PX = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
KINDS = {
    "next": VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=LLAVA_16_GRID_PX),
    "onevision": VisionConfig(image_aspect_ratio="anyres_max_9", image_grid_pinpoints="(1x1),...,(6x6)"),
}
ARCHS = {"next": "LlavaNextForConditionalGeneration", "onevision": "LlavaOnevisionForConditionalGeneration"}
SIZES = [(1, 1), (10, 200), (200, 10), (333, 77), (400, 300)]  # (width, height)


@dataclass
class Exported:
    cfg: ModelConfig
    model: Any  # vitune's
    tower: Any
    tokenizer: Any
    out: Path
    hf: Any  # transformers', read from `out`
    loading: dict[str, list]
    processor: Any  # AutoProcessor with the PIL image backend
    default_processor: Any  # AutoProcessor as it loads


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _export(tmp: Path, kind: str) -> Exported:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

    cfg = ModelConfig(projector="mlp2x_gelu", vision=KINDS[kind])
    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(cfg.vision)
    model = build_model(cfg, tokenizer, tower.hidden_size, recipe=tower.recipe).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than the 0.02 init, so a misplaced feature or newline moves the logits
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2, generator=gen)
        model.image_newline.normal_(0.0, 1.0, generator=gen)
    save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(tmp / f"{kind}-vitune"))
    out = Path(export_llava_hf(str(tmp / f"{kind}-vitune"), str(tmp / f"{kind}-hf")))
    hf, loading = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    processor = AutoProcessor.from_pretrained(str(out))
    default_processor = AutoProcessor.from_pretrained(str(out))
    # vitune resizes with PIL; a OneVision processor cannot load backend="pil" whole (its video processor is
    # torchvision-only), so the PIL image processor is loaded alone, from the same folder
    processor.image_processor = AutoImageProcessor.from_pretrained(str(out), backend="pil")
    return Exported(cfg, model, tower, tokenizer, out, hf.eval(), loading, processor, default_processor)


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, tmp_path_factory) -> Exported:
    return _export(tmp_path_factory.mktemp(f"export-{request.param}"), request.param)


def _vitune_ids(ex: Exported) -> list[int]:
    turns = [{"from": "human", "value": "<image>\nWhat is in the picture?"}]
    return tokenize_generation_prompt(turns, ex.cfg.template, ex.tokenizer)


def _hf_inputs(ex: Exported, image: Image.Image, processor: Any = None) -> dict[str, torch.Tensor]:
    processor = processor or ex.processor
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    # the processor's own path: its chat template, its tokenizer, its image processor, its <image> expansion
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def _vitune_logits(ex: Exported, image: Image.Image) -> torch.Tensor:
    with torch.no_grad():
        return ex.model(torch.tensor([_vitune_ids(ex)]), image_features=encode_image_tiles(ex.tower, [image]),
                        image_sizes=[image.size]).logits[0]


def test_the_folder_loads_as_the_llava_next_class(exported: Exported) -> None:
    kind = next(k for k, v in KINDS.items() if v == exported.cfg.vision)
    assert type(exported.hf).__name__ == ARCHS[kind]
    assert {k: list(v) for k, v in exported.loading.items()} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    config = json.loads((exported.out / "config.json").read_text())
    assert config["architectures"] == [ARCHS[kind]]
    assert config["image_grid_pinpoints"] == [list(p) for p in exported.model.recipe.grid_pinpoints]
    if kind == "onevision":
        assert config["vision_aspect_ratio"] == "anyres_max_9"
    weights = load_file(str(exported.out / "model.safetensors"))
    torch.testing.assert_close(weights["image_newline"], exported.model.image_newline.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_transformers_computes_what_vitune_computes(exported: Exported, width: int, height: int) -> None:
    image = _image(width, height)
    inputs = _hf_inputs(exported, image)
    image_id = exported.model.image_token_id
    count = visual_tokens(exported.model.recipe, width, height)
    ids = _vitune_ids(exported)
    assert inputs["input_ids"][0].tolist() == [t for tok in ids for t in ([tok] * count if tok == image_id
                                                                          else [tok])]
    assert inputs["image_sizes"][0].tolist() == [height, width]
    tiles = exported.tower.preprocess_tiles(image)
    torch.testing.assert_close(inputs["pixel_values"][0, :len(tiles)], tiles, rtol=0, atol=PIXELS_ATOL)
    with torch.no_grad():
        expected = exported.hf(**inputs).logits[0]
    got = _vitune_logits(exported, image)
    assert got.shape == expected.shape == (len(ids) - 1 + count, exported.hf.config.text_config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=LOGITS_ATOL)


def test_parity_is_sensitive_to_the_image(exported: Exported) -> None:
    inputs = _hf_inputs(exported, _image(333, 77))
    with torch.no_grad():
        expected = exported.hf(**inputs).logits[0]
    moved = _vitune_logits(exported, _image(333, 77, seed=5))
    assert (moved - expected).abs().max() > 100 * LOGITS_ATOL


def test_default_image_backend_is_within_one_intensity_level(exported: Exported) -> None:
    image = _image(333, 77)
    default, pil = _hf_inputs(exported, image, exported.default_processor), _hf_inputs(exported, image)
    assert torch.equal(default["input_ids"], pil["input_ids"]) and torch.equal(default["image_sizes"],
                                                                               pil["image_sizes"])
    one_level = 1 / 255 / min(exported.tower.std) + PIXELS_ATOL
    assert (default["pixel_values"] - pil["pixel_values"]).abs().max() <= one_level


def test_flat_merge_is_refused_with_the_reason(tmp_path: Path) -> None:
    cfg = ModelConfig(vision=VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=LLAVA_16_GRID_PX,
                                          mm_patch_merge_type="flat"))
    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(cfg.vision)
    model = build_model(cfg, tokenizer, tower.hidden_size, recipe=tower.recipe)
    save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(tmp_path / "flat"))
    with pytest.raises(llava_hf.NotRepresentable, match="'flat'.*always unpad"):
        export_llava_hf(str(tmp_path / "flat"), str(tmp_path / "flat-hf"))


def test_the_onevision_sizes_include_a_capped_grid() -> None:
    import dataclasses

    from vitune.vision_recipe import unpadded_shape

    recipe = load_vision_tower(KINDS["onevision"]).recipe
    uncapped = dataclasses.replace(recipe, max_tiles=None)
    assert any(unpadded_shape(recipe, w, h) != unpadded_shape(uncapped, w, h) for w, h in SIZES)
