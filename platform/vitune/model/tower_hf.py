"""The tower side of the llava-hf layout: a vitune tower (CLIP or SigLIP) → its transformers vision config and weights.

llava-hf keeps either tower under `vision_tower.vision_model.` (transformers 5 strips the `vision_model.` level on
load, `conversion_mapping`'s CLIPVisionModel rule, which SiglipVisionModel shares). The two differ in what the
select strategy means: transformers' "default" drops the first token (CLIP's CLS), "full" keeps all. vitune's
`select="patch"` is thus "default" on CLIP and "full" on SigLIP, which has no CLS (as llava-hf's OneVision
configs say), and a SigLIP processor counts no additional token. The SigLIP tower goes out headless
(`vision_use_head=False`, no `head.*` tensors), as llava-hf's OneVision configs and LLaVA-NeXT's encoder: LLaVA
reads a hidden state, never the MAP head's pooled output, so the head would be weights nothing reads. vitune's `feature_layer` indexes the same
`hidden_states` tuple transformers does on both towers (entry 0 the embeddings), so it is written unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from vitune.model import llava_hf, siglip_hf

SIGLIP_SELECT_STRATEGY = {"patch": "full"}  # vitune select → vision_feature_select_strategy (no CLS to drop)


def vision_config(tower: Any) -> Any:
    """The transformers vision config of the tower (`SiglipVisionConfig` or `CLIPVisionConfig`)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig  # deferred: only exporting needs them

    if tower.is_siglip:
        return SiglipVisionConfig(**siglip_hf.siglip_vision_config(tower.visual), vision_use_head=False)
    return CLIPVisionConfig(**llava_hf.clip_vision_config(tower.visual))


def tower_tensors(tower: Any, head: bool = False) -> dict[str, torch.Tensor]:
    """The tower's weights under llava-hf names (`vision_tower.vision_model.` + the HF model's own); a SigLIP
    tower's MAP head only with ``head`` (what a checkpoint may carry, not what the export writes)."""
    if tower.is_siglip:
        return {llava_hf.TOWER_PREFIX + k: v for k, v in siglip_hf.siglip_tower_tensors(tower.visual).items()
                if head or not k.startswith("head.")}
    return llava_hf.tower_tensors(tower.visual)


def select_strategy(tower: Any, select: str) -> str:
    """transformers' `vision_feature_select_strategy` for vitune's `select` on this tower."""
    return SIGLIP_SELECT_STRATEGY[select] if tower.is_siglip else llava_hf.SELECT_STRATEGY[select]


def additional_tokens(tower: Any) -> int:
    """Tokens per tile beyond the patches that the tower emits (CLIP's CLS) and the processor counts."""
    return 0 if tower.is_siglip else 1


def feature_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint fields a llava-hf `config.json` pins down, for a CLIP or a SigLIP `vision_config`."""
    vision = config.get("vision_config") or {}
    if vision.get("model_type") != "siglip_vision_model":
        return llava_hf.feature_fields(config)
    layer = config.get("vision_feature_layer", -2)
    strategy = config.get("vision_feature_select_strategy", "default")
    if not isinstance(layer, int):
        raise llava_hf.NotRepresentable(f"vision_feature_layer {layer!r}: vitune reads one feature layer")
    if strategy != "full":  # "default" would drop SigLIP's first patch, which no vitune recipe does
        raise llava_hf.NotRepresentable(f"vision_feature_select_strategy {strategy!r} on a SigLIP tower: it has no "
                                        "CLS token, so vitune reads 'full' (every patch)")
    fields = {"feature_layer": layer, "select": "patch"}
    fields.update({key: vision[key] for key in ("image_size", "hidden_size") if key in vision})
    return fields


def check_tower_weights(tensors: dict[str, torch.Tensor], tower: Any) -> str | None:
    """None when the checkpoint's tower weights (llava-hf names) are `tower`'s, else the first that differs.

    A checkpoint may leave out what LLaVA never reads: LLaVA-NeXT's SigLIP tower drops the trunk's last block and
    its MAP head (multimodal_encoder/siglip_encoder.py), so only blocks past the feature layer and the head may be
    absent; every tensor present must be the tower's.
    """
    expected = tower_tensors(tower, head=True)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        return f"tensors the tower lacks ({unknown[0]}, ...)"
    used = [f"{llava_hf.TOWER_PREFIX}encoder.layers.{i}." for i in range(tower.num_blocks)]
    missing = sorted(name for name in set(expected) - set(tensors)
                     if "encoder.layers." not in name or name.startswith(tuple(used)))
    missing = [name for name in missing if not (tower.is_siglip and ".head." in name)]
    if missing:
        return f"a tower without {missing[0]}"
    for name, have in tensors.items():
        want = expected[name]
        if have.shape != want.shape or not torch.allclose(have.float(), want.float(), rtol=1e-3, atol=1e-3):
            return f"other vision weights (first at {name})"
    return None
