"""The frozen vision tower (vitune.model.vision): shapes, determinism, feature-layer semantics, fingerprint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitune
from vitune.config import VisionConfig
from vitune.model.vision import TINY_TOWER, VisionTower, encode_images, load_vision_tower
from vitune.vision_recipe import fingerprint_id

GRID_PATCHES = (32 // 8) ** 2  # tiny tower: 32 px, patch 8


@pytest.fixture(scope="module")
def tower() -> VisionTower:
    return load_vision_tower(VisionConfig())


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _manual_hidden_states(tower: VisionTower, pixels: torch.Tensor) -> list[torch.Tensor]:
    """HF-style hidden states: [0] = ln_pre'd embeddings, [k] = output of block k, computed by hand."""
    visual = tower.visual
    with torch.no_grad():
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)  # [B, P, D]
        cls = visual.class_embedding.view(1, 1, -1).expand(pixels.shape[0], 1, -1)
        x = visual.ln_pre(torch.cat([cls, patches], dim=1) + visual.positional_embedding)
        states = [x]
        for block in visual.transformer.resblocks:
            x = block(x)
            states.append(x)
    return states


def test_tiny_tower_attributes(tower: VisionTower) -> None:
    assert (tower.image_size, tower.patch_size, tower.hidden_size, tower.num_layers) == (32, 8, 64, 3)
    assert tower.num_patches == GRID_PATCHES
    assert tower.num_blocks == 2  # feature_layer -2 of 3 blocks
    assert len(tower.mean) == 3 and len(tower.std) == 3


def test_patch_and_cls_patch_shapes(tower: VisionTower, pixels: torch.Tensor) -> None:
    assert tower.encode(pixels).shape == (2, GRID_PATCHES, 64)
    with_cls = load_vision_tower(VisionConfig(select="cls_patch"))
    assert with_cls.num_patches == GRID_PATCHES + 1
    features = with_cls.encode(pixels)
    assert features.shape == (2, GRID_PATCHES + 1, 64)
    torch.testing.assert_close(features[:, 1:], tower.encode(pixels), rtol=0, atol=0)


def test_deterministic_across_loads_and_calls(tower: VisionTower, pixels: torch.Tensor) -> None:
    other = load_vision_tower(VisionConfig())
    first, second = tower.encode(pixels), tower.encode(pixels)
    assert torch.equal(first, second)
    assert torch.equal(first, other.encode(pixels))


def test_loading_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_vision_tower(VisionConfig())
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("feature_layer", "state"), [(-2, 2), (-1, 3), (1, 1), (0, 0), (-4, 0)])
def test_feature_layer_matches_block_by_block(pixels: torch.Tensor, feature_layer: int, state: int) -> None:
    tower = load_vision_tower(VisionConfig(feature_layer=feature_layer, select="cls_patch"))
    expected = _manual_hidden_states(tower, pixels)[state]
    torch.testing.assert_close(tower.encode(pixels), expected, rtol=1e-5, atol=1e-5)


def test_penultimate_matches_open_clip_intermediates(tower: VisionTower, pixels: torch.Tensor) -> None:
    out = tower.visual.forward_intermediates(
        pixels, indices=[1], stop_early=True, intermediates_only=True, output_fmt="NLC"
    )
    torch.testing.assert_close(tower.encode(pixels), out["image_intermediates"][0], rtol=1e-5, atol=1e-6)


def test_last_layer_cls_reproduces_open_clip_pooled_output(pixels: torch.Tensor) -> None:
    tower = load_vision_tower(VisionConfig(feature_layer=-1, select="cls_patch"))
    visual = tower.visual
    with torch.no_grad():
        pooled = visual.ln_post(tower.encode(pixels)[:, 0]) @ visual.proj
        torch.testing.assert_close(pooled, visual(pixels), rtol=1e-5, atol=1e-5)


def test_feature_layer_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        load_vision_tower(VisionConfig(feature_layer=-5))


def test_encode_images_is_preprocess_then_encode(tower: VisionTower) -> None:
    images = [Image.new("RGB", (40, 20), (200, 10, 10)), Image.new("L", (16, 48), 90)]
    features = encode_images(tower, images)
    expected = tower.encode(torch.stack([tower.preprocess(img) for img in images]))
    assert features.shape == (2, tower.num_patches, tower.hidden_size)
    assert torch.equal(features, expected)
    assert encode_images(tower, []).shape == (0, tower.num_patches, tower.hidden_size)


def test_crop_mode_changes_features_of_non_square(tower: VisionTower) -> None:
    image = Image.new("RGB", (64, 16), (0, 120, 240))
    crop = load_vision_tower(VisionConfig(image_mode="crop"))
    assert not torch.allclose(encode_images(tower, [image]), encode_images(crop, [image]))


def test_tower_is_frozen(tower: VisionTower) -> None:
    tower.train()
    assert not tower.training and not tower.visual.training
    assert not any(p.requires_grad for p in tower.parameters())
    features = tower.encode(torch.zeros(1, 3, 32, 32))
    assert features.requires_grad is False and not features.is_inference()
    # usable as input to a trainable module
    torch.nn.Linear(64, 2)(features).sum().backward()


def test_fingerprint_and_id(tower: VisionTower) -> None:
    fp = tower.fingerprint()
    assert fp["tower"] == TINY_TOWER and fp["pretrained"] is None and fp["feature_layer"] == -2
    assert fp["select"] == "patch" and fp["image_size"] == 32 and fp["image_mode"] == "pad"
    assert {"open_clip_version", "torch_version"} <= fp.keys()
    assert fingerprint_id(fp) == fingerprint_id(load_vision_tower(VisionConfig()).fingerprint())
    assert fingerprint_id(fp) == fingerprint_id({**fp, "torch_version": "0.0"})
    for change in ({"feature_layer": -1}, {"select": "cls_patch"}, {"image_mode": "crop"}, {"pretrained": "x"}):
        assert fingerprint_id({**fp, **change}) != fingerprint_id(fp)
    with pytest.raises(ValueError, match="lacks"):
        fingerprint_id({"tower": "x"})


def test_unknown_tower_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown vision tower 'no-such-vit'.*ViT-L-14-336"):
        load_vision_tower(VisionConfig(name="no-such-vit"))


def test_openai_tag_builds_with_quick_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real presets take the same path; OpenAI weights need QuickGELU, which open_clip only warns about."""
    import open_clip

    seen: dict = {}
    real_create = open_clip.create_model

    def fake_create(name: str, pretrained: str | None = None, **kwargs):
        seen.update(name=name, pretrained=pretrained, **kwargs)
        return real_create(TINY_TOWER, pretrained=None, force_quick_gelu=kwargs["force_quick_gelu"])

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    tower = load_vision_tower(VisionConfig(name="ViT-L-14-336", pretrained="openai"))
    assert seen["name"] == "ViT-L-14-336" and seen["pretrained"] == "openai"
    assert seen["force_quick_gelu"] is True
    assert tower.fingerprint()["pretrained"] == "openai"
    assert type(tower.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_import_has_no_side_effects() -> None:
    root = str(Path(vitune.__file__).resolve().parent.parent)
    code = (
        "import sys, vitune.model.vision, vitune.model.image, vitune.model.vlm, vitune.model.projector\n"
        "assert 'open_clip' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})
