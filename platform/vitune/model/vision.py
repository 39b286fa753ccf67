"""The vision tower: an open_clip ViT or SigLIP tower + pretrained tag → per-patch features `[B, N, D]`.

`encode_images` is the one function that feature extraction, evaluation and serving call to turn
images into tower features, so the preprocessing, feature layer and CLS handling cannot drift apart
(`[B, N, D]`, one tile per image). `encode_image_tiles` is its form for every recipe, AnyRes included:
each image's tiles' features `[T_i, N, D]` (`T_i = vision_recipe.tiles_for`), all tiles in one tower call.
A tower takes an anyres recipe from `load_vision_tower(..., recipe=...)` (the configs cannot name one yet).

Feature layer semantics follow LLaVA / Hugging Face CLIP: the hidden states are indexed like HF's
`hidden_states` tuple, whose entry 0 is the embeddings after `ln_pre` and entry k the output of the
k-th transformer block. So `feature_layer=-2` is the output of block L-1 of L; `ln_post` is never
applied. `select="patch"` drops the CLS token, `select="cls_patch"` keeps it first.

SigLIP towers (LLaVA-OneVision's google/siglip-so400m-patch14-384 = open_clip's `ViT-SO400M-14-SigLIP-384`)
are open_clip `TimmModel`s around a timm ViT with no CLS token: hidden state 0 is the patch embedding plus the
position embedding, state k the output of block k, as in transformers' `SiglipVisionModel` (no final norm, no
MAP head). `select` must be `patch` (every patch token). OneVision drops the last of the 27 blocks and takes the
last remaining state, i.e. `feature_layer=-2` here (LLaVA-NeXT's siglip_encoder.py). The preprocessing is
SigLIP's (mean = std = 0.5; `vitune.vision_recipe.TIMM_TOWERS`), with or without a pretrained tag.

The tower is frozen (no gradients, eval mode) unless a run tunes it (LLaVA-NeXT's `mm_vision_tower` part):
`make_trainable` lifts the freeze for that run's model only, optionally with gradient checkpointing over the
blocks the forward runs. open_clip's ViT and timm's SigLIP trunk have no dropout in the configs vitune uses
(patch dropout 0, attention/projection dropout 0, as HF CLIP's `attention_dropout=0` in LLaVA-NeXT), so a
training tower follows the caller's train/eval mode and computes the same numbers in both. A trained tower's
weights live in its model folder (`vitune.model.folder`); its fingerprint then says `tower_weights: trained`,
so no frozen tower's feature store can stand in for it.

The tiny presets `vitune-tiny-vit` and `vitune-tiny-siglip` (random init, seeded) are open_clip model configs
shipped in `vitune/assets/open_clip/`; they (and the tiny timm trunk, `vitune.model.tiny_siglip`) are registered
on first use, never at import.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vitune.model import image as image_lib
from vitune.model.tiny_siglip import register_tiny_siglip
from vitune.vision_recipe import VITUNE_TOWER_CONFIGS, VisionRecipe, aspect_fields, timm_tower, tower_config

logger = logging.getLogger(__name__)

TINY_TOWER = "vitune-tiny-vit"
_INIT_SEED = 0


def register_asset_configs() -> None:
    """Add vitune's shipped open_clip model configs to open_clip's registry (idempotent)."""
    # deferred: open_clip pulls in torch and timm; readers of a fingerprint need neither
    import open_clip

    register_tiny_siglip()
    known = set(open_clip.list_models())
    for path in sorted(VITUNE_TOWER_CONFIGS.glob("*.json")):
        if path.stem not in known:
            open_clip.add_model_config(path)


def _blocks_for_layer(feature_layer: int, num_layers: int) -> int:
    """Number of transformer blocks to run for an HF-style hidden-state index (0 = embeddings)."""
    num_states = num_layers + 1
    if not -num_states <= feature_layer < num_states:
        raise ValueError(
            f"feature_layer {feature_layer} is out of range for a tower with {num_layers} blocks "
            f"(valid: {-num_states}..{num_layers}; -2 = output of the penultimate block)"
        )
    return feature_layer % num_states


TRAINED_WEIGHTS = "trained"  # the fingerprint's `tower_weights` when the tower's weights are a run's, not the tag's


class VisionTower(nn.Module):
    """An open_clip ViT or SigLIP tower returning the hidden states of one block as per-patch features; frozen
    unless `make_trainable` is called."""

    def __init__(self, visual: nn.Module, cfg: Any, open_clip_version: str, recipe: VisionRecipe | None = None) -> None:
        super().__init__()
        # deferred: open_clip pulls in torch and timm; readers of a fingerprint need neither
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        self.is_siglip = isinstance(visual, TimmModel)
        if self.is_siglip:
            timm_tower(tower_config(cfg.name).get("vision_cfg", {}), cfg.name)  # a supported trunk, or an error
            if cfg.select == "cls_patch":
                raise ValueError(f"vision.select='cls_patch' but tower {cfg.name!r} (SigLIP) has no CLS token; "
                                 "use select='patch' (all patch tokens, as LLaVA-OneVision)")
        elif not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"vision tower {cfg.name!r} is a {type(visual).__name__}; only open_clip's native "
                "VisionTransformer towers and SigLIP (timm ViT) towers are supported"
            )
        self.visual = visual
        self.cfg = cfg
        self.name: str = cfg.name
        self.pretrained: str | None = cfg.pretrained
        self.feature_layer: int = cfg.feature_layer
        self.select: str = cfg.select
        self.image_mode: str = cfg.image_mode
        self._open_clip_version = open_clip_version

        if self.is_siglip:
            trunk = visual.trunk
            if trunk.cls_token is not None or trunk.num_prefix_tokens:
                raise ValueError(f"SigLIP tower {cfg.name!r} has prefix tokens; SigLIP's timm trunk has none")
            (height, width), (patch_h, patch_w) = trunk.patch_embed.img_size, trunk.patch_embed.patch_size
            self.hidden_size: int = trunk.embed_dim
            self.num_layers: int = len(trunk.blocks)
        else:
            (height, width), (patch_h, patch_w) = visual.image_size, visual.patch_size
            self.hidden_size = visual.transformer.width
            self.num_layers = len(visual.transformer.resblocks)
        if height != width or patch_h != patch_w:
            raise ValueError(f"tower {cfg.name!r} is not square ({height}x{width}, patch {patch_h}x{patch_w})")
        self.image_size: int = height
        self.patch_size: int = patch_h
        self.num_blocks: int = _blocks_for_layer(cfg.feature_layer, self.num_layers)
        # the recipe of the tower as built (its real geometry), the one source of its fingerprint and token count
        self.recipe = VisionRecipe(tower=cfg.name, pretrained=cfg.pretrained, feature_layer=cfg.feature_layer,
                                   select=cfg.select, image_size=self.image_size, patch_size=self.patch_size,
                                   hidden_size=self.hidden_size, **aspect_fields(cfg, self.image_size))
        if recipe is not None:
            self.recipe = _with_mode_of(self.recipe, recipe)
            self.image_mode = self.recipe.image_mode
        self.num_patches: int = self.recipe.tokens_per_tile  # features per tile
        self.mean: tuple[float, ...] = tuple(float(m) for m in visual.image_mean)
        self.std: tuple[float, ...] = tuple(float(s) for s in visual.image_std)

        self.trains = False  # make_trainable: the run tunes the tower (mm_vision_tower)
        self.grad_checkpointing = False
        self.weights_trained = False  # the weights are a run's (fingerprint: tower_weights)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VisionTower:
        """A frozen tower stays in eval mode whatever the caller asks; a training one follows `mode`."""
        return super().train(mode and self.trains)

    def make_trainable(self, grad_checkpointing: bool = False) -> VisionTower:
        """Lift the freeze: every weight takes gradients and the weights count as trained from here on;
        `grad_checkpointing` recomputes each block's activations in the backward instead of keeping them."""
        self.trains = True
        self.weights_trained = True
        self.grad_checkpointing = grad_checkpointing
        self.requires_grad_(True)
        return self

    def _block(self, block: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, x, use_reentrant=False, **kwargs)
        return block(x, **kwargs)

    @property
    def _patch_conv(self) -> nn.Module:
        return self.visual.trunk.patch_embed.proj if self.is_siglip else self.visual.conv1

    @property
    def device(self) -> torch.device:
        return self._patch_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._patch_conv.weight.dtype

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image → normalised `[3, H, W]` float32 tensor for this tower (one tile: pad or crop)."""
        if self.recipe.image_mode == "anyres":
            raise ValueError("an anyres tower makes several tiles per image: use preprocess_tiles")
        return image_lib.preprocess(image, self.image_size, self.mean, self.std, self.image_mode)  # type: ignore[arg-type]

    def preprocess_tiles(self, image: Image.Image, base_only: bool = False) -> torch.Tensor:
        """PIL image → its normalised tiles `[T, 3, H, W]` by this tower's recipe (pad/crop: T = 1; anyres with
        `base_only`: the base view alone)."""
        return image_lib.preprocess_tiles(image, self.recipe, self.mean, self.std, base_only)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x = visual.conv1(pixel_values)  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, D]
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, 1+g*g, D]
        x = x + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)  # identity in eval mode
        return visual.ln_pre(x)

    def _siglip_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        x = trunk.patch_embed(pixel_values)  # [B, P, D]
        x = trunk._pos_embed(x)  # + position embedding (no class token to prepend)
        x = trunk.norm_pre(trunk.patch_drop(x))  # identities for SigLIP in eval mode
        for block in trunk.blocks[: self.num_blocks]:
            x = self._block(block, x)
        return x  # [B, P, D]: no final norm, no MAP head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` → `[B, N, D]` hidden states after `num_blocks` blocks (no ln_post)."""
        if self.is_siglip:
            return self._siglip_forward(pixel_values.to(device=self.device, dtype=self.dtype))
        x = self._embed(pixel_values.to(device=self.device, dtype=self.dtype))  # [B, 1+P, D]
        transformer = self.visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # [1+P, B, D]
        for block in transformer.resblocks[: self.num_blocks]:
            x = self._block(block, x, attn_mask=None)
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # [B, 1+P, D]
        return x if self.select == "cls_patch" else x[:, 1:]

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` → `[B, N, D]` features, computed without autograd.

        Runs under `inference_mode`; the result is cloned out of it so callers may feed it to a
        trainable projector (inference tensors cannot be saved for backward).
        """
        with torch.inference_mode():
            features = self.forward(pixel_values)
        return features.clone()

    def fingerprint(self) -> dict[str, Any]:
        """What produced these features; stores and checkpoints carry it so mismatches are refused."""
        fp = {**self.recipe.fingerprint(), "open_clip_version": self._open_clip_version,
              "torch_version": torch.__version__}
        if self.weights_trained:  # only then: a frozen tower's fingerprint is as it always was
            fp["tower_weights"] = TRAINED_WEIGHTS
        return fp

    def load_trained(self, state: dict[str, torch.Tensor]) -> VisionTower:
        """Take a run's trained weights (`state_dict` of `visual`, as a model folder stores them)."""
        self.visual.load_state_dict(state)
        self.weights_trained = True
        return self

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The weights a model folder stores for a trained tower: `visual`'s state, on CPU, contiguous."""
        return {k: v.detach().contiguous().cpu() for k, v in self.visual.state_dict().items()}


def _with_mode_of(built: VisionRecipe, given: VisionRecipe) -> VisionRecipe:
    """The tower's own recipe with the image mode, grid, merge and cap of `given`, which must describe the
    same tower (name, tag, layer, selection and geometry)."""
    same = ("tower", "pretrained", "feature_layer", "select", "image_size", "patch_size", "hidden_size")
    diffs = [f"{k}: tower {getattr(built, k)!r}, recipe {getattr(given, k)!r}" for k in same
             if getattr(given, k) is not None and getattr(given, k) != getattr(built, k)]
    if diffs:
        raise ValueError(f"the recipe describes another tower than {built.tower!r}: {'; '.join(diffs)}")
    return dataclasses.replace(built, image_mode=given.image_mode, grid_pinpoints=given.grid_pinpoints,
                               patch_merge=given.patch_merge, max_tiles=given.max_tiles)


def load_vision_tower(cfg: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      recipe: VisionRecipe | None = None) -> VisionTower:
    """Build the frozen tower named by a `VisionConfig` (open_clip name + pretrained tag or None).

    With `pretrained=None` the weights are a seeded random init, identical on every load. The
    activation follows the pretrained tag (OpenAI weights need QuickGELU; open_clip only warns).
    `recipe` (e.g. an anyres one) sets the image mode, grid, merge and cap; it must name this tower.
    """
    # deferred: open_clip pulls in torch and timm; readers of a fingerprint need neither
    import open_clip

    register_asset_configs()
    if cfg.name not in open_clip.list_models():
        raise ValueError(
            f"unknown vision tower {cfg.name!r}; valid open_clip names: {', '.join(open_clip.list_models())}"
        )
    # a local transformers SigLIP folder (SiglipVisionModel.save_pretrained): built randomly, then its weights
    hf_folder = cfg.pretrained if cfg.pretrained and Path(cfg.pretrained, "config.json").is_file() else None
    pretrained = None if hf_folder else cfg.pretrained
    tag_cfg = open_clip.get_pretrained_cfg(cfg.name, pretrained) if pretrained else {}
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    timm = timm_tower(tower_config(cfg.name).get("vision_cfg", {}), cfg.name)
    # open_clip attaches SigLIP's mean/std to its pretrained tags only; a random-init SigLIP tower needs them too
    force = {"mean": timm.mean, "std": timm.std} if timm is not None else None
    # Seeded init in a forked RNG so loading a tower never perturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_INIT_SEED)
        clip = open_clip.create_model(cfg.name, pretrained=pretrained, device="cpu", force_quick_gelu=quick_gelu,
                                      force_preprocess_cfg=force)
    if hf_folder:
        if timm is None:
            raise ValueError(f"vision.pretrained {hf_folder!r} is a transformers folder; vitune reads those for "
                             f"SigLIP towers only, and {cfg.name!r} is not one")
        from vitune.model.siglip_hf import load_hf_folder  # deferred: only this path needs the map

        load_hf_folder(clip.visual, hf_folder)
    tower = VisionTower(clip.visual, cfg, open_clip.__version__, recipe=recipe)
    del clip
    tower.to(device=device, dtype=dtype)
    logger.info(
        "vision tower %s (pretrained=%s): %d blocks, running %d (feature_layer=%d), %d px, patch %d, "
        "N=%d, D=%d, quick_gelu=%s, %s %s",
        cfg.name,
        cfg.pretrained,
        tower.num_layers,
        tower.num_blocks,
        cfg.feature_layer,
        tower.image_size,
        tower.patch_size,
        tower.num_patches,
        tower.hidden_size,
        quick_gelu,
        device,
        dtype,
    )
    return tower


def pixel_fingerprint(tower: VisionTower, dtype: str = "uint8") -> dict[str, Any]:
    """The fingerprint of the pixel store this tower's preprocessing makes (`VisionRecipe.pixel_fingerprint`)."""
    return tower.recipe.pixel_fingerprint(tower.mean, tower.std, dtype)


def encode_images(tower: VisionTower, images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images → `[B, N, D]` tower features: preprocess, stack, encode. The one shared path."""
    if not images:
        return torch.empty(0, tower.num_patches, tower.hidden_size, dtype=tower.dtype, device=tower.device)
    pixels = torch.stack([tower.preprocess(img) for img in images])  # [B, 3, H, W]
    return tower.encode(pixels)


def encode_image_tiles(tower: VisionTower, images: Sequence[Image.Image],
                       base_only: Sequence[bool] = ()) -> list[torch.Tensor]:
    """PIL images → each image's tile features `[T_i, N, D]` by the tower's recipe (pad/crop: `T_i = 1`, the
    features `encode_images` gives; anyres: the base view, then the grid's tiles; `base_only[i]`: image i's base
    view alone, `T_i = 1`), in one tower call."""
    if not images:
        return []
    only = list(base_only) or [False] * len(images)
    if len(only) != len(images):
        raise ValueError(f"{len(only)} base_only flags for {len(images)} images")
    tiles = [tower.preprocess_tiles(img, low) for img, low in zip(images, only, strict=True)]  # each [T_i, 3, H, W]
    return list(tower.encode(torch.cat(tiles)).split([t.shape[0] for t in tiles]))
