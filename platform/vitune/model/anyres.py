"""AnyRes feature packing: an image's projected tile features `[T, N, D]` → its visual-token sequence `[n, D]`.

The model-side half of LLaVA-NeXT's AnyRes (the pixel half is `vitune.model.image.anyres_views`, the geometry
and the count are `vitune.vision_recipe`). Tile 0 is the base view, tiles 1.. the grid row by row, as the
preprocessing writes them. By the recipe's `patch_merge` (LLaVA-NeXT's mm_patch_merge_type):

- `flat`: every tile's features one after the other (base view first), no newline;
- `spatial_unpad`: the base view's features, then the grid's tiles stitched into one feature map
  `[rows * g, cols * g]`, the rows or columns that only the letterbox padding filled removed
  (`vision_recipe.unpadded_shape`'s geometry), for anyres_max_N (`recipe.max_tiles`) the map bilinearly
  downsampled when it holds more than about N tiles' worth, and the learned `image_newline` embedding
  appended after each row of the map.

This is what transformers' `LlavaNextModel.pack_image_features` (and `LlavaOnevisionModel`'s with
`vision_aspect_ratio="anyres_max_N"`) computes; the length always equals `vision_recipe.visual_tokens`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vitune.vision_recipe import VisionRecipe, anyres_grid, tiles_for, unpadded_shape, visual_tokens


def _grid_map(tiles: torch.Tensor, rows: int, cols: int, g: int) -> torch.Tensor:
    """Grid tiles `[rows * cols, g * g, D]` (row-major tiles, row-major patches) → one map `[D, rows * g, cols * g]`."""
    dim = tiles.shape[-1]
    grid = tiles.view(rows, cols, g, g, dim)  # [tile row, tile col, patch row, patch col, D]
    return grid.permute(4, 0, 2, 1, 3).reshape(dim, rows * g, cols * g)


def _unpad(feature_map: torch.Tensor, recipe: VisionRecipe, width: int, height: int) -> torch.Tensor:
    """`[D, H, W]` → the centred `[D, h, w]` the image itself covers (before any anyres_max_N downsampling)."""
    keep_h, keep_w = unpadded_shape(dataclasses.replace(recipe, max_tiles=None), width, height)
    _, full_h, full_w = feature_map.shape
    top, left = (full_h - keep_h) // 2, (full_w - keep_w) // 2
    return feature_map[:, top : top + keep_h, left : left + keep_w]


def pack_image_features(
    tile_embeds: torch.Tensor,
    recipe: VisionRecipe,
    width: int,
    height: int,
    image_newline: torch.Tensor | None = None,
) -> torch.Tensor:
    """One image's projected tile features `[T, N, D]` → its visual tokens `[visual_tokens(recipe, w, h), D]`.

    `width` x `height` is the image's original size in pixels; `image_newline` `[D]` is required for
    `spatial_unpad`. Raises `ValueError` when the tiles are not the ones the recipe makes for that size.
    """
    if recipe.image_mode != "anyres":
        raise ValueError(f"pack_image_features packs anyres tiles; the recipe's image mode is {recipe.image_mode!r}")
    g = recipe.grid
    want = (tiles_for(recipe, width, height), g * g)
    if tile_embeds.dim() != 3 or tuple(tile_embeds.shape[:2]) != want:
        raise ValueError(f"a {width}x{height} image makes {want[0]} tiles of {want[1]} features, got tile features "
                         f"of shape {tuple(tile_embeds.shape)}")
    if recipe.patch_merge == "flat":
        packed = tile_embeds.flatten(0, 1)  # [T * N, D]
    else:
        if image_newline is None:
            raise ValueError("mm_patch_merge_type=spatial_unpad needs the model's image_newline embedding")
        rows, cols = anyres_grid(recipe, width, height)
        feature_map = _unpad(_grid_map(tile_embeds[1:], rows, cols, g), recipe, width, height)  # [D, h, w]
        target = unpadded_shape(recipe, width, height)
        if target != tuple(feature_map.shape[1:]):  # anyres_max_N: over about N tiles' worth
            feature_map = F.interpolate(feature_map[None], size=list(target), mode="bilinear")[0]
        dim, map_h, _ = feature_map.shape
        newline = image_newline.to(device=feature_map.device, dtype=feature_map.dtype)
        feature_map = torch.cat([feature_map, newline[:, None, None].expand(dim, map_h, 1)], dim=2)  # [D, h, w+1]
        packed = torch.cat([tile_embeds[0], feature_map.flatten(1, 2).transpose(0, 1)], dim=0)  # [n, D]
    count = visual_tokens(recipe, width, height)
    if packed.shape[0] != count:  # the one count of the house: the store, training and serving read it
        raise RuntimeError(f"packed {packed.shape[0]} visual tokens for a {width}x{height} image; "
                           f"vision_recipe.visual_tokens counts {count}")
    return packed
