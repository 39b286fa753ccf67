"""AnyRes tile stores without Ray: the fingerprint of a tile store, tile shards written and read back as
``[T, N, D]`` + ``(w, h)``, the per-shard job functions (load_shard → EncodeShard) on real images with the tiny
tower, quarantine in an anyres batch, and pad stores unchanged."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from vitune import storage
from vitune.config import VisionConfig
from vitune.vision_recipe import VisionRecipe, fingerprint_id, tiles_for

ANYRES = VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])


# ------------------------------------------------------------------------------------------ fingerprint


def test_pad_and_crop_ids_are_the_ones_existing_stores_carry():
    """Stores written before tiles existed must stay valid: their ids are pinned here, computed before
    the tile store was added (commit e7b53fe)."""
    assert VisionRecipe.of(VisionConfig()).fingerprint_id() == "c8a3e42f2996"
    assert VisionRecipe.of(VisionConfig(image_aspect_ratio="square")).fingerprint_id() == "4e011dbf5d67"
    assert VisionRecipe.of(VisionConfig(select="cls_patch")).fingerprint_id() == "0960d1fd9476"
    fp = {"tower": "t", "pretrained": None, "feature_layer": -2, "select": "patch", "image_size": 16,
          "image_mode": "pad", "num_patches": 4, "hidden_size": 3}
    assert fingerprint_id(fp) == "4e21657c304c"
    assert "grid_pinpoints" not in VisionRecipe.of(VisionConfig()).fingerprint()


def test_anyres_id_covers_grid_and_mode_not_merge_or_cap():
    base = VisionRecipe.of(ANYRES)
    assert base.fingerprint()["grid_pinpoints"] == [[32, 64], [64, 32], [64, 64]]
    assert base.fingerprint_id() != VisionRecipe.of(VisionConfig()).fingerprint_id()  # another aspect mode
    other_grid = VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=[[32, 64], [64, 32]])
    reordered = VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=[[64, 32], [32, 64], [64, 64]])
    assert VisionRecipe.of(other_grid).fingerprint_id() != base.fingerprint_id()  # old features never reused
    assert VisionRecipe.of(reordered).fingerprint_id() != base.fingerprint_id()  # the order breaks ties
    # the merge and the anyres_max_N cap are the model's packing of the same tiles: one store serves them all
    flat = VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=ANYRES.image_grid_pinpoints,
                        mm_patch_merge_type="flat")
    capped = VisionConfig(image_aspect_ratio="anyres_max_2", image_grid_pinpoints=ANYRES.image_grid_pinpoints)
    assert VisionRecipe.of(flat).fingerprint_id() == VisionRecipe.of(capped).fingerprint_id() == base.fingerprint_id()
    # the tile size is in the id: another tower size, other tiles
    assert fingerprint_id({**base.fingerprint(), "image_size": 64}) != base.fingerprint_id()
