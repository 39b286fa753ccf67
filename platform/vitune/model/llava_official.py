"""Official LLaVA / LLaVA-NeXT checkpoint facts (`mm_*` config keys, weight names) in vitune's terms.

What `vitune.model.importers` reads from an official folder: the tower an `mm_vision_tower` id names (as an open_clip
name + tag), the fingerprint fields the `mm_*` keys pin down, the anyres tiling of a LLaVA-NeXT / OneVision config
(`image_aspect_ratio`, `image_grid_pinpoints`, `mm_patch_merge_type`), the projector from its `mm_projector` keys
and the tower's weights under LLaVA's wrappers (`model.vision_tower.vision_tower.`, around transformers' CLIP or
SigLIP vision model). lmms-lab's OneVision checkpoints are the same code line: `LlavaQwenForCausalLM`, a SigLIP tower
saved without the last block and head that its siglip_encoder.py deletes (vitune's `feature_layer=-2` on the whole
tower gives the same features), `model.image_newline`.
"""

from __future__ import annotations

from typing import Any

import torch

from vitune.model.llava_hf import NotRepresentable
from vitune.vision_recipe import parse_grid_pinpoints

# Official LLaVA names its tower by Hugging Face id; these are the open_clip towers with the same weights.
HF_TOWERS = {
    "openai/clip-vit-large-patch14-336": ("ViT-L-14-336", "openai"),
    "openai/clip-vit-large-patch14": ("ViT-L-14", "openai"),
    "openai/clip-vit-base-patch16": ("ViT-B-16", "openai"),
    "openai/clip-vit-base-patch32": ("ViT-B-32", "openai"),
    "google/siglip-so400m-patch14-384": ("ViT-SO400M-14-SigLIP-384", "webli"),  # LLaVA-OneVision's tower
}
LLAVA_ARCHS = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral", "LlavaQwenForCausalLM": "qwen2"}
LLAVA_ONLY_KEYS = ("image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side", "use_mm_proj",
                    "tokenizer_model_max_length", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
                    "unfreeze_mm_vision_tower", "architectures", "model_type", "_name_or_path")


def tower_identity(mm_vision_tower: str) -> tuple[str, str | None]:
    """`(open_clip name, pretrained tag)` of an official LLaVA `mm_vision_tower` value."""
    import open_clip  # deferred: open_clip is heavy to import

    from vitune.model.vision import register_asset_configs

    if mm_vision_tower in HF_TOWERS:
        return HF_TOWERS[mm_vision_tower]
    register_asset_configs()
    if mm_vision_tower in open_clip.list_models():
        return mm_vision_tower, None
    raise ValueError(f"mm_vision_tower {mm_vision_tower!r} has no known open_clip equivalent "
                     f"(known: {', '.join(HF_TOWERS)}, or an open_clip model name)")


def official_anyres(config: dict[str, Any], tile_size: int) -> dict[str, Any] | None:
    """An official LLaVA-NeXT / OneVision config's tiling in llava-hf's terms (model_type, pixel grid, cap), for
    `_next_vision`; None for a single-image (pad / crop) config.

    LLaVA-NeXT's llava_arch.py tiles by `image_aspect_ratio` ("anyres", or OneVision's "anyres_max_N" cap) over
    `image_grid_pinpoints` (pixel pairs or the "(1x1),...,(6x6)" range form) and packs by `mm_patch_merge_type`;
    only "spatial_unpad" (unpadded grid + row newline) is what vitune and transformers compute.
    """
    aspect = config.get("image_aspect_ratio")
    if not (isinstance(aspect, str) and aspect.startswith("anyres")):
        return None
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        raise NotRepresentable(f"mm_patch_merge_type {merge!r}: vitune imports LLaVA-NeXT's anyres models "
                                        "with spatial_unpad (unpadded grid + row newline) only")
    if "image_grid_pinpoints" not in config:
        raise NotRepresentable(f"image_aspect_ratio {aspect!r} but the config has no image_grid_pinpoints")
    pinpoints = [list(p) for p in parse_grid_pinpoints(config["image_grid_pinpoints"], tile_size)]
    if aspect == "anyres":
        return {"model_type": "llava_next", "image_grid_pinpoints": pinpoints}
    return {"model_type": "llava_onevision", "image_grid_pinpoints": pinpoints, "vision_aspect_ratio": aspect}


def official_fields(config: dict[str, Any], tile_size: int | None = None) -> dict[str, Any]:
    """The fingerprint fields an official LLaVA config pins down (`mm_*` keys, `image_aspect_ratio`); an anyres
    config (LLaVA-NeXT / OneVision) needs the tower's `tile_size` to read its grid."""
    fields: dict[str, Any] = {}
    if "mm_vision_tower" in config:
        fields["tower"], fields["pretrained"] = tower_identity(config["mm_vision_tower"])
    if "mm_vision_select_layer" in config:
        fields["feature_layer"] = config["mm_vision_select_layer"]
    if "mm_vision_select_feature" in config:
        fields["select"] = config["mm_vision_select_feature"]
    if "mm_hidden_size" in config:
        fields["hidden_size"] = config["mm_hidden_size"]
    aspect = config.get("image_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres"):
        if tile_size is None:
            raise ValueError(f"image_aspect_ratio {aspect!r} (LLaVA-NeXT tiling): a stage-1 projector has no grid")
        fields["image_mode"] = "anyres"
        fields["grid_pinpoints"] = official_anyres(config, tile_size)["image_grid_pinpoints"]
    elif "mm_vision_tower" in config:  # LLaVA pads only when asked; otherwise CLIP's resize + centre crop
        fields["image_mode"] = "pad" if aspect == "pad" else "crop"
    if config.get("mm_use_im_start_end"):
        raise ValueError("mm_use_im_start_end: vitune has no <im_start>/<im_end> image tokens")
    return fields


def projector_state(tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """LLaVA `mm_projector` tensors (any prefix) → `(vitune projector name, state dict)` from their keys."""
    state = {k.split("mm_projector.", 1)[1]: v for k, v in tensors.items() if "mm_projector." in k}
    if set(state) == {"weight", "bias"}:
        return "linear", state
    layers = sorted({int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()})
    if not layers or layers != list(range(0, 2 * len(layers), 2)) or len(state) != 2 * len(layers):
        raise ValueError(f"mm_projector weights {sorted(state)} are neither a Linear nor a LLaVA GELU MLP")
    return f"mlp{len(layers)}x_gelu", state


def official_tower_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "model.vision_tower.vision_tower."  # LLaVA's CLIPVisionTower wraps HF's CLIPVisionModel
    return {"vision_tower." + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
