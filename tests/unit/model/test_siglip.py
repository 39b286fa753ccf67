"""SigLIP towers (vitune.model.vision via open_clip's timm trunk): geometry, no CLS, preprocessing, feature
layers, and parity with transformers' SiglipVisionModel on the same weights (vitune.model.siglip_hf)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vitune.config import VisionConfig
from vitune.model import llava_hf
from vitune.model.siglip_hf import siglip_tower_tensors, siglip_vision_config
from vitune.model.vision import VisionTower, encode_images, load_vision_tower
from vitune.vision_recipe import TIMM_TOWERS, VisionRecipe

TINY = "vitune-tiny-siglip"
SO400M = "ViT-SO400M-14-SigLIP-384"  # google/siglip-so400m-patch14-384, LLaVA-OneVision's tower
ATOL = 1e-5


@pytest.fixture(scope="module")
def tower() -> VisionTower:
    return load_vision_tower(VisionConfig(name=TINY))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_model(tower: VisionTower) -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(SiglipVisionConfig(**siglip_vision_config(tower.visual))).eval()
    model.load_state_dict(siglip_tower_tensors(tower.visual), strict=True)  # every weight, no leftover
    return model


def test_tiny_siglip_geometry_matches_its_recipe(tower: VisionTower) -> None:
    assert tower.is_siglip
    assert (tower.image_size, tower.patch_size, tower.hidden_size, tower.num_layers) == (32, 8, 64, 3)
    assert tower.num_patches == 16  # (32 / 8)^2 and no CLS token
    assert tower.num_blocks == 2  # feature_layer -2 of 3 blocks
    assert VisionRecipe.of(VisionConfig(name=TINY)) == tower.recipe  # torch-free geometry = the built tower's


def test_timm_table_matches_the_trunks_timm_builds() -> None:
    import timm

    from vitune.model.vision import register_asset_configs

    register_asset_configs()
    for name, spec in TIMM_TOWERS.items():
        with torch.device("meta"):
            trunk = timm.create_model(name, pretrained=False, num_classes=0)
        assert (trunk.patch_embed.patch_size[0], trunk.embed_dim, len(trunk.blocks)) == (
            spec.patch_size, spec.width, spec.depth), name
        assert trunk.cls_token is None and trunk.num_prefix_tokens == 0, name


def test_so400m_geometry_729_tokens_of_1152() -> None:
    """The real tower's shape, built on the meta device (no weights, no memory), never run on images."""
    import open_clip

    recipe = VisionRecipe.of(VisionConfig(name=SO400M))
    assert (recipe.image_size, recipe.patch_size, recipe.hidden_size, recipe.tokens_per_tile) == (384, 14, 1152, 729)
    with torch.device("meta"):
        clip = open_clip.create_model(SO400M, device="meta")
    built = VisionTower(clip.visual, VisionConfig(name=SO400M), open_clip.__version__)
    assert (built.num_patches, built.hidden_size, built.num_layers, built.num_blocks) == (729, 1152, 27, 26)
    assert built.recipe == recipe
    hf = siglip_vision_config(clip.visual)  # google/siglip-so400m-patch14-384's config.json, but the activation
    assert (hf["intermediate_size"], hf["num_attention_heads"], hf["num_hidden_layers"]) == (4304, 16, 27)


def test_cls_patch_is_refused_for_siglip() -> None:
    with pytest.raises(ValueError, match="no CLS token"):
        VisionRecipe.of(VisionConfig(name=TINY, select="cls_patch"))
    with pytest.raises(ValueError, match="no CLS token"):
        load_vision_tower(VisionConfig(name=TINY, select="cls_patch"))


def test_preprocessing_is_siglips(tower: VisionTower) -> None:
    assert tower.mean == (0.5, 0.5, 0.5) and tower.std == (0.5, 0.5, 0.5)
    gray = tower.preprocess(Image.new("RGB", (64, 48), (255, 255, 255)))  # pad mode: white image, padded
    assert gray.shape == (3, 32, 32)
    assert gray.max().item() == pytest.approx(1.0)  # (1 - 0.5) / 0.5; CLIP's mean/std would give ~1.93
    features = encode_images(tower, [Image.new("RGB", (40, 40), (10, 200, 30))])
    assert features.shape == (1, 16, 64)


@pytest.mark.parametrize("layer", [0, 1, 2, 3, -1, -2])
def test_features_equal_siglip_vision_model_hidden_states(layer: int, pixels: torch.Tensor,
                                                          hf_model: torch.nn.Module) -> None:
    ours = load_vision_tower(VisionConfig(name=TINY, feature_layer=layer)).encode(pixels)
    with torch.no_grad():
        theirs = hf_model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    assert ours.shape == theirs.shape == (2, 16, 64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_layers_differ(tower: VisionTower, pixels: torch.Tensor) -> None:
    """The parity above would be empty if every layer gave the same features."""
    last = load_vision_tower(VisionConfig(name=TINY, feature_layer=-1)).encode(pixels)
    assert (last - tower.encode(pixels)).abs().max() > 1e-2


def test_pooled_output_equals_siglip_head(tower: VisionTower, pixels: torch.Tensor,
                                          hf_model: torch.nn.Module) -> None:
    """The whole map, MAP head included: open_clip's image embedding = SiglipVisionModel's pooler_output."""
    with torch.no_grad():
        torch.testing.assert_close(tower.visual(pixels), hf_model(pixel_values=pixels).pooler_output,
                                   rtol=0, atol=ATOL)


def test_llava_hf_clip_export_refuses_siglip(tower: VisionTower) -> None:
    with pytest.raises(llava_hf.NotRepresentable, match="not a CLIP ViT"):
        llava_hf.clip_vision_config(tower.visual)
    with pytest.raises(llava_hf.NotRepresentable, match="not a CLIP ViT"):
        llava_hf.tower_tensors(tower.visual)


def test_weights_from_a_local_file(tmp_path, pixels: torch.Tensor) -> None:
    """`pretrained` may name a local open_clip checkpoint (e.g. open_clip_pytorch_model.bin of
    timm/ViT-SO400M-14-SigLIP-384): its weights, not the seeded init, make the features; nothing downloads."""
    import open_clip

    from vitune.model.vision import register_asset_configs

    register_asset_configs()
    torch.manual_seed(7)  # weights unlike the tower's seeded init
    clip = open_clip.create_model(TINY)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), path)
    loaded = load_vision_tower(VisionConfig(name=TINY, pretrained=str(path)))
    assert loaded.mean == (0.5, 0.5, 0.5)
    reference = VisionTower(clip.visual, VisionConfig(name=TINY), open_clip.__version__)
    torch.testing.assert_close(loaded.encode(pixels), reference.encode(pixels), rtol=0, atol=0)
    seeded = load_vision_tower(VisionConfig(name=TINY)).encode(pixels)
    assert (seeded - loaded.encode(pixels)).abs().max() > 1e-2


@pytest.mark.parametrize("use_head", [True, False], ids=["with-head", "no-head"])
def test_weights_from_a_local_transformers_folder(tmp_path, pixels: torch.Tensor, use_head: bool) -> None:
    """`pretrained` may name a local `SiglipVisionModel.save_pretrained` folder (e.g. google/siglip-so400m's
    vision part, or LLaVA's `vision_use_head=False` tower): siglip_hf's map in reverse loads it into open_clip's
    tower, whose features and pooled output are then the folder's model's; nothing downloads."""
    import open_clip
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vitune.model.vision import register_asset_configs

    register_asset_configs()
    torch.manual_seed(11)  # weights unlike the tower's seeded init
    visual = open_clip.create_model(TINY).visual
    config = SiglipVisionConfig(**siglip_vision_config(visual), vision_use_head=use_head)
    hf = SiglipVisionModel(config).eval()
    state = {k: v for k, v in siglip_tower_tensors(visual).items() if use_head or not k.startswith("head.")}
    hf.load_state_dict(state, strict=True)
    hf.save_pretrained(str(tmp_path / "siglip"))
    loaded = load_vision_tower(VisionConfig(name=TINY, pretrained=str(tmp_path / "siglip")))
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(loaded.encode(pixels), hidden.hidden_states[-2], rtol=0, atol=ATOL)
    if use_head:
        with torch.no_grad():
            pooled = loaded.visual.trunk.forward_head(loaded.visual.trunk.forward_features(pixels))
        torch.testing.assert_close(pooled, hidden.pooler_output, rtol=0, atol=ATOL)


def test_a_clip_tower_refuses_a_transformers_folder(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "siglip_vision_model"}')
    with pytest.raises(ValueError, match="SigLIP towers only"):
        load_vision_tower(VisionConfig(name="vitune-tiny-vit", pretrained=str(tmp_path)))
