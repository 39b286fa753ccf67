"""The tower side of the llava-hf layout: a vitune tower (CLIP or SigLIP) → its transformers vision config and weights.

llava-hf keeps either tower under `vision_tower.vision_model.` (transformers 5 strips the `vision_model.` level on
load, `conversion_mapping`'s CLIPVisionModel rule, which SiglipVisionModel shares). The two differ in what the
select strategy means: transformers' "default" drops the first token (CLIP's CLS), "full" keeps all. vitune's
`select="patch"` is thus "default" on CLIP and "full" on SigLIP, which has no CLS (as llava-hf's OneVision
configs say), and a SigLIP processor counts no additional token. vitune's `feature_layer` indexes the same
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
        return SiglipVisionConfig(**siglip_hf.siglip_vision_config(tower.visual))
    return CLIPVisionConfig(**llava_hf.clip_vision_config(tower.visual))


def tower_tensors(tower: Any) -> dict[str, torch.Tensor]:
    """The tower's weights under llava-hf names (`vision_tower.vision_model.` + the HF model's own)."""
    if tower.is_siglip:
        return {llava_hf.TOWER_PREFIX + k: v for k, v in siglip_hf.siglip_tower_tensors(tower.visual).items()}
    return llava_hf.tower_tensors(tower.visual)


def select_strategy(tower: Any, select: str) -> str:
    """transformers' `vision_feature_select_strategy` for vitune's `select` on this tower."""
    return SIGLIP_SELECT_STRATEGY[select] if tower.is_siglip else llava_hf.SELECT_STRATEGY[select]


def additional_tokens(tower: Any) -> int:
    """Tokens per tile beyond the patches that the tower emits (CLIP's CLS) and the processor counts."""
    return 0 if tower.is_siglip else 1
