"""vitune's tiny SigLIP-shaped timm trunk (`vitune_tiny_siglip`) for tests: SO400M's layout at toy size.

Like timm's `vit_so400m_patch14_siglip_384` (what open_clip's `ViT-SO400M-14-SigLIP-384` builds): no class
token, a learned position embedding per patch, no pre-norm, a final LayerNorm and a MAP (attention-pool) head;
here 32 px, patch 8 (16 tokens), width 64, 3 blocks, 4 heads. `register_tiny_siglip` adds it to timm's
registry on first use (never at import), so the shipped open_clip config `vitune-tiny-siglip` can name it.
"""

from __future__ import annotations

from typing import Any

TINY_SIGLIP_TRUNK = "vitune_tiny_siglip"


def vitune_tiny_siglip(pretrained: bool = False, **kwargs: Any) -> Any:
    """timm entrypoint: the tiny trunk (random init; it has no weights to load)."""
    # deferred: timm imports torch
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        raise ValueError(f"{TINY_SIGLIP_TRUNK} is a random-init test trunk; it has no pretrained weights")
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0, class_token=False,
                global_pool="map")
    # timm's factory passes its registry entries along; a bare VisionTransformer takes model arguments only
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformer(**{**args, **kwargs})


def register_tiny_siglip() -> None:
    """Add the tiny trunk to timm's model registry (idempotent)."""
    import timm
    from timm.models import register_model

    if not timm.is_model(TINY_SIGLIP_TRUNK):
        register_model(vitune_tiny_siglip)
