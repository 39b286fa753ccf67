"""Import of llava-hf LLaVA-NeXT / OneVision folders: the vitune model folder computes what transformers computes.

Each checkpoint is made here as a user would get one: a tiny `LlavaNextForConditionalGeneration` (or
`LlavaOnevisionForConditionalGeneration` with anyres_max_9) whose CLIP tower holds the tiny open_clip tower's
weights (as llava-v1.6 holds OpenAI's CLIP ViT-L), its LM, projector and newline random and larger than the
init; saved with transformers' `save_pretrained` (its own weight names) beside its processor.
`import_checkpoint` writes a vitune folder; `load_for_inference` reads it back; the recipe carries the
checkpoint's grid (and cap), and the logits equal transformers' on the processor's own inputs for five aspect
ratios. A config naming another grid, and a pad feature store, are refused naming the field. A vitune
OneVision export imports back to the same recipe and weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vitune.config import ModelConfig, VisionConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model import llava_hf
from vitune.model.export import export_llava_hf
from vitune.model.folder import load_for_inference, save_model_folder
from vitune.model.importers import CheckpointMismatch, import_checkpoint
from vitune.model.lm import build_tiny_lm
from vitune.model.vision import encode_image_tiles, load_vision_tower
from vitune.model.vlm import build_model
from vitune.vision_recipe import parse_grid_pinpoints, visual_tokens

LOGITS_ATOL = 1e-4
LLAVA_16_GRID_PX = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-1.6's grid at 32-px tiles
ONEVISION_GRID_PX = [list(p) for p in parse_grid_pinpoints("(1x1),...,(6x6)", 32)]
SIZES = [(1, 1), (10, 200), (200, 10), (333, 77), (400, 300)]  # (width, height)
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@dataclass
class Checkpoint:
    kind: str
    folder: Path
    hf: Any
    processor: Any


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _checkpoint(tmp: Path, kind: str) -> Checkpoint:
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(VisionConfig())
    text_config = build_tiny_lm(tokenizer).config.to_dict()
    grid = ONEVISION_GRID_PX if kind == "onevision" else LLAVA_16_GRID_PX
    fields = {"vision_config": CLIPVisionConfig(**llava_hf.clip_vision_config(tower.visual)).to_dict(),
              "text_config": text_config, "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
              "image_grid_pinpoints": grid, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
              "projector_hidden_act": "gelu"}
    pixels = {"image_grid_pinpoints": grid, "image_mean": list(tower.mean), "image_std": list(tower.std),
              "resample": 3}
    if kind == "onevision":
        hf = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**fields, vision_aspect_ratio="anyres_max_9"))
        processor = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, **pixels),
            video_processor=LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
            num_image_tokens=17, vision_feature_select_strategy="default", vision_aspect_ratio="anyres_max_9")
    else:
        hf = LlavaNextForConditionalGeneration(LlavaNextConfig(**fields))
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 32},
                                                       crop_size={"height": 32, "width": 32}, **pixels),
            tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2, generator=gen)
        hf.model.image_newline.normal_(0.0, 1.0, generator=gen)
        prefix = llava_hf.TOWER_PREFIX
        hf.model.vision_tower.load_state_dict(
            {k[len(prefix):]: v for k, v in llava_hf.tower_tensors(tower.visual).items()}, strict=True)
    folder = tmp / f"{kind}-hf"
    hf.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return Checkpoint(kind, folder, hf.eval(), processor)


@pytest.fixture(scope="module", params=["next", "onevision"])
def imported(request, tmp_path_factory) -> tuple[Checkpoint, Any, Path]:
    tmp = tmp_path_factory.mktemp(f"import-{request.param}")
    checkpoint = _checkpoint(tmp, request.param)
    out = import_checkpoint(str(checkpoint.folder), str(tmp / "vitune"), ModelConfig(projector="mlp2x_gelu"))
    return checkpoint, load_for_inference(out, device="cpu", dtype="float32"), Path(out)


def test_the_folder_carries_the_checkpoints_grid(imported) -> None:
    checkpoint, loaded, out = imported
    config = json.loads((checkpoint.folder / "config.json").read_text())
    recipe = loaded.model.recipe
    assert recipe is not None and recipe.patch_merge == "spatial_unpad"
    assert [list(p) for p in recipe.grid_pinpoints] == config["image_grid_pinpoints"]
    assert recipe.max_tiles == (9 if checkpoint.kind == "onevision" else None)
    assert loaded.tower.recipe == recipe  # the tower tiles by the grid the model packs by
    meta = json.loads((out / "vitune_model.json").read_text())
    assert meta["fingerprint"]["grid_pinpoints"] == config["image_grid_pinpoints"]
    assert meta["model"]["vision"]["image_aspect_ratio"] == ("anyres_max_9" if checkpoint.kind == "onevision"
                                                              else "anyres")
    torch.testing.assert_close(loaded.model.image_newline, checkpoint.hf.model.image_newline.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_vitune_computes_what_transformers_computes(imported, width: int, height: int) -> None:
    checkpoint, loaded, _ = imported
    image = _image(width, height)
    inputs = checkpoint.processor(images=image, text=PROMPT, return_tensors="pt")
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    count = visual_tokens(loaded.model.recipe, width, height)
    image_id = loaded.model.image_token_id
    assert inputs["input_ids"][0].tolist() == [t for tok in ids for t in ([tok] * count if tok == image_id
                                                                          else [tok])]
    with torch.no_grad():
        expected = checkpoint.hf(**inputs).logits[0]
        got = loaded.model(torch.tensor([ids]), image_features=encode_image_tiles(loaded.tower, [image]),
                           image_sizes=[image.size]).logits[0]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=LOGITS_ATOL)
    assert (got[-1] - checkpoint.hf(**checkpoint.processor(images=_image(width, height, seed=3), text=PROMPT,
                                                            return_tensors="pt")).logits[0, -1]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory) -> Checkpoint:
    return _checkpoint(tmp_path_factory.mktemp("import-refusals"), "next")


def test_a_config_naming_another_grid_is_refused(next_checkpoint: Checkpoint, tmp_path: Path) -> None:
    cfg = ModelConfig(vision=VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints="(1x1),...,(3x3)"))
    with pytest.raises(CheckpointMismatch, match="image_grid_pinpoints"):
        import_checkpoint(str(next_checkpoint.folder), str(tmp_path / "out"), cfg)


def test_a_pad_feature_store_is_refused(next_checkpoint: Checkpoint, tmp_path: Path) -> None:
    pad = load_vision_tower(VisionConfig()).fingerprint()
    with pytest.raises(CheckpointMismatch, match="image_mode"):
        import_checkpoint(str(next_checkpoint.folder), str(tmp_path / "out"), ModelConfig(), fingerprint=pad)


def test_a_vitune_onevision_export_imports_back_to_the_same_model(tmp_path: Path) -> None:
    cfg = ModelConfig(vision=VisionConfig(image_aspect_ratio="anyres_max_4", image_grid_pinpoints="(1x1),...,(4x4)"))
    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(cfg.vision)
    model = build_model(cfg, tokenizer, tower.hidden_size, recipe=tower.recipe).eval()
    with torch.no_grad():
        model.image_newline.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(tmp_path / "vitune"))
    export_llava_hf(str(tmp_path / "vitune"), str(tmp_path / "hf"))
    back = load_for_inference(import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "back")), "cpu", "float32")
    assert back.model.recipe == model.recipe and dataclasses.asdict(back.model.recipe)["max_tiles"] == 4
    assert torch.equal(back.model.image_newline, model.image_newline)
    for name, tensor in model.projector.state_dict().items():
        assert torch.equal(back.model.projector.state_dict()[name], tensor), name
