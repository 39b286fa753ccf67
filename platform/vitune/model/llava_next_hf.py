"""The LLaVA-NeXT side of the llava-hf layout: what an AnyRes model adds to `vitune.model.llava_hf`'s mapping.

An anyres vitune model (`VisionRecipe.image_mode == "anyres"`, `spatial_unpad`) is transformers'
`LlavaNextForConditionalGeneration` (llava-hf/llava-v1.6-*); with OneVision's cap (`max_tiles`, anyres_max_N) it
is `LlavaOnevisionForConditionalGeneration` with `vision_aspect_ratio="anyres_max_N"`. Both share the tower,
projector and LM names of LLaVA-1.5; the recipe adds:
- `image_grid_pinpoints` (in the config and the image processor: the same (h, w) pixel pairs as the recipe's);
- the learned row newline, saved as `image_newline` (the published llava-hf name; transformers 5 renames it
  `model.image_newline` on load);
- the processor: LlavaNext's / LlavaOnevision's image processor with the tower's tile size, mean and std and a
  PIL bicubic resize, and the processor that expands one `<image>` into the count `visual_tokens` gives.

`flat` tiles have no place: transformers' `pack_image_features` always removes the padding and adds the newline.
For import, `recipe_fields` reads a LLaVA-NeXT / OneVision config back into a `VisionConfig`'s aspect fields.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vitune import IMAGE_TOKEN
from vitune.model.llava_hf import SELECT_STRATEGY, NotRepresentable
from vitune.vision_recipe import VisionRecipe

NEXT_ARCH = "LlavaNextForConditionalGeneration"
ONEVISION_ARCH = "LlavaOnevisionForConditionalGeneration"
MODEL_TYPES = {"llava_next": NEXT_ARCH, "llava_onevision": ONEVISION_ARCH}  # config.json model_type → class
NEWLINE_KEY = "image_newline"
_NEWLINE_KEYS = (NEWLINE_KEY, "model.image_newline")  # published name, transformers 5's own


def check_recipe(recipe: VisionRecipe) -> None:
    """Refuse an anyres recipe transformers cannot compute exactly, naming the reason."""
    if recipe.patch_merge != "spatial_unpad":
        raise NotRepresentable(f"mm_patch_merge_type {recipe.patch_merge!r}: transformers' LlavaNext and "
                               "LlavaOnevision always unpad the tiled grid and add a newline per row "
                               "(spatial_unpad); they have no flat layout")
    if recipe.select != "patch":
        raise NotRepresentable("an anyres model keeps patch tokens only (vision_feature_select_strategy default)")


def architecture(recipe: VisionRecipe) -> str:
    """The transformers class that computes this recipe: OneVision for an anyres_max_N cap, else LLaVA-NeXT."""
    return ONEVISION_ARCH if recipe.max_tiles is not None else NEXT_ARCH


def config_class(recipe: VisionRecipe) -> type:
    from transformers import LlavaNextConfig, LlavaOnevisionConfig  # deferred: only exporting needs them

    return LlavaOnevisionConfig if recipe.max_tiles is not None else LlavaNextConfig


def config_fields(recipe: VisionRecipe) -> dict[str, Any]:
    """The config fields of this recipe beyond LlavaConfig's (the grid; the cap, or the base tile's count)."""
    fields: dict[str, Any] = {"image_grid_pinpoints": [list(p) for p in recipe.grid_pinpoints]}
    if recipe.max_tiles is not None:
        fields["vision_aspect_ratio"] = f"anyres_max_{recipe.max_tiles}"
    else:
        fields["image_seq_length"] = recipe.grid * recipe.grid  # the base view's tokens (LlavaNextConfig's field)
    return fields


def newline_tensors(image_newline: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The row newline under its published llava-hf name."""
    if image_newline is None:
        raise NotRepresentable("an anyres spatial_unpad model without an image_newline cannot be exported")
    return {NEWLINE_KEY: image_newline}


def pop_newline(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Remove and return the row newline from a LLaVA-NeXT checkpoint's tensors (either generation's name)."""
    found = [key for key in _NEWLINE_KEYS if key in tensors]
    if len(found) != 1:
        raise ValueError(f"a LLaVA-NeXT checkpoint holds one image newline ({' or '.join(_NEWLINE_KEYS)}); "
                         f"found {found or 'none'}")
    return tensors.pop(found[0])


def image_processor(recipe: VisionRecipe, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """The PIL image processor whose tiles are vitune's `model.image.preprocess_tiles` for `recipe`."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    size = recipe.image_size
    common = {"image_grid_pinpoints": [list(p) for p in recipe.grid_pinpoints], "resample": 3,  # PIL bicubic
              "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": True, "do_pad": True}
    if recipe.max_tiles is not None:  # OneVision resizes each tile to a square, with no crop
        return LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, **common)
    return LlavaNextImageProcessorPil(size={"shortest_edge": size}, do_center_crop=True,
                                      crop_size={"height": size, "width": size}, **common)


def processor(recipe: VisionRecipe, tokenizer: Any, patch_size: int, jinja: str, mean: tuple[float, ...],
              std: tuple[float, ...], strategy: str | None = None, extra_tokens: int = 1) -> Any:
    """The LlavaNext / LlavaOnevision processor: its `<image>` expansion is `visual_tokens(recipe, w, h)`.

    `strategy` / `extra_tokens`: the tower's select strategy and the tokens per tile it emits beyond the patches
    (CLIP: "default" and its CLS; SigLIP: "full" and none, `vitune.model.tower_hf`).
    """
    from transformers import LlavaNextProcessor, LlavaOnevisionProcessor  # deferred: only exporting needs them

    strategy = strategy or SELECT_STRATEGY[recipe.select]
    images = image_processor(recipe, mean, std)
    if recipe.max_tiles is not None:
        from transformers import LlavaOnevisionVideoProcessor

        # the processor requires a video processor; vitune has no video path, so it only mirrors the tile geometry
        videos = LlavaOnevisionVideoProcessor(size={"height": recipe.image_size, "width": recipe.image_size},
                                              image_mean=list(mean), image_std=list(std), resample=3)
        # OneVision counts num_image_tokens per tile with the CLS (if any), then drops one under "default"
        return LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                                       num_image_tokens=recipe.grid * recipe.grid + extra_tokens,
                                       vision_feature_select_strategy=strategy, chat_template=jinja,
                                       image_token=IMAGE_TOKEN, vision_aspect_ratio=f"anyres_max_{recipe.max_tiles}")
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy=strategy,
                              num_additional_image_tokens=extra_tokens,  # CLIP's CLS: dropped under "default"
                              chat_template=jinja, image_token=IMAGE_TOKEN)


def recipe_fields(config: dict[str, Any], tile_size: int) -> dict[str, Any]:
    """A LLaVA-NeXT / OneVision `config.json` → the `VisionConfig` aspect fields of the vitune recipe it computes."""
    pinpoints = config.get("image_grid_pinpoints")
    if not pinpoints:
        raise NotRepresentable(f"{config.get('model_type')} config has no image_grid_pinpoints")
    odd = [p for p in pinpoints if p[0] % tile_size or p[1] % tile_size]
    if odd:
        raise NotRepresentable(f"image_grid_pinpoints {odd} are not whole tiles of the tower's {tile_size} px")
    aspect = "anyres"
    if config.get("model_type") == "llava_onevision":
        aspect = config.get("vision_aspect_ratio", "anyres_max_9")
        if not re.fullmatch(r"anyres_max_[1-9]\d*", aspect):
            raise NotRepresentable(f"vision_aspect_ratio {aspect!r}: vitune reads anyres_max_N")
    return {"image_aspect_ratio": aspect, "image_grid_pinpoints": [list(map(int, p)) for p in pinpoints],
            "mm_patch_merge_type": "spatial_unpad"}
