"""The tower in the step: a run that reads the pixel store joins each image's stored tiles to its rows, attaches
its vision tower to the model, and turns a micro-batch's stored tiles into the tower's pixel values on the device.

A run reads the pixel store (``TrainJobConfig.store_form == "pixels"``) when it tunes the tower (LLaVA-NeXT's
``mm_vision_tower``; LLaVA-1.6 and OneVision) or when ``features.form=pixels`` asks a frozen tower to run in
the step (the same features as the feature store's: the equivalence of the two forms). Rows then carry each
image's tiles ``[T, 3, S, S]`` (uint8, or bf16 bit patterns) where a feature-store row carries its features;
the join, the sampler, the side rows and ``collate`` are the feature store's (``vitune.train.data``). The worker
converts the tiles with ``vitune.features.pixels.pixel_values`` after the transfer (the small uint8 form crosses
the host-device link), and ``VisionLanguageModel.forward(pixel_values=...)`` runs the tower, so DeepSpeed sees
the tower as one more part of the model: sharded by ZeRO, stepped by the optimizer, saved in checkpoints.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from vitune.features.pixels import STORED_NUMPY, geometry_fields, pixel_values
from vitune.train.data import fetched_rows, training_row
from vitune.vision_recipe import VisionRecipe

log = logging.getLogger(__name__)

TOWER_PART = "vision_tower"  # the model's attribute and the optimizer group's part for mm_vision_tower


def pixels_from_bytes(blob: bytes, num_tiles: int, tile_size: int, dtype: str, key: str = "?") -> np.ndarray:
    """One pixel-store row as Ray Data hands it over (its ``pixels`` bytes, ``num_tiles``) → ``[T, 3, S, S]``
    (uint8, or bf16 bit patterns as uint16; ``vitune.features.pixels``'s layout)."""
    stored = STORED_NUMPY[dtype]
    flat = np.frombuffer(blob, dtype=stored)
    if flat.size != num_tiles * 3 * tile_size * tile_size:
        raise ValueError(f"image {key!r}: {flat.size} pixel values; its num_tiles={num_tiles} tiles of "
                         f"[3, {tile_size}, {tile_size}] take {num_tiles * 3 * tile_size * tile_size}")
    return flat.reshape(num_tiles, 3, tile_size, tile_size)


def join_with_pixels(batch: dict[str, np.ndarray], by_key_ref: list, tile_size: int, dtype: str) -> dict[str, list]:
    """Ray Data ``map_batches`` task: a block of pixel-store rows → one training row per record using it, its
    ``features`` being the image's stored tiles (``vitune.train.data.join_with_features``'s twin)."""
    by_key = fetched_rows(by_key_ref)
    cols: dict[str, list] = defaultdict(list)
    for key, blob, tiles in zip(batch["image_key"], batch["pixels"], batch["num_tiles"], strict=True):
        samples = by_key.get(str(key), ())
        if not samples:
            continue
        tiles_of_image = pixels_from_bytes(blob, int(tiles), tile_size, dtype, str(key))  # [T, 3, S, S]
        for sample in samples:
            for name, value in training_row(sample, tiles_of_image).items():
                cols[name].append(value)
    return dict(cols)


def tower_inputs(images: Sequence[Any], dtype: str, mean: Sequence[float], std: Sequence[float],
                 device: Any) -> tuple[Any, list[int]]:
    """A micro-batch's stored tiles (``collate``'s ``image_features``: one ``[T_i, 3, S, S]`` tensor per image in
    reading order) → ``(pixel_values [sum T_i, 3, S, S] float32 on device, num_tiles)``."""
    import torch  # deferred: the join task needs no torch

    tiles = list(images)
    values = [pixel_values(t, dtype, mean, std, device) for t in tiles]
    return torch.cat(values), [int(t.shape[0]) for t in tiles]


def check_pixel_recipe(recipe: VisionRecipe, store: Any) -> None:
    """Refuse a pixel store that cuts images otherwise than the model's recipe (tile size, aspect mode, grid)."""
    have, want = geometry_fields(store.recipe), geometry_fields(recipe)
    if have != want:
        diffs = {k: (want[k], have[k]) for k in want if want[k] != have[k]}
        raise ValueError(f"pixel store {store.uri} cuts images otherwise than model.vision ({diffs}, "
                         "(model's, store's)): re-run the features job with features.form=pixels and this "
                         "model.vision")


def attach_run_tower(model: Any, cfg: Any, device: Any) -> Any:
    """The run's tower on ``model``: the one a ``train.init_from`` folder brought (trained before), else the
    config's pretrained tower; tiling by the model's recipe. Gradient checkpointing follows
    ``train.gradient_checkpointing`` (LLaVA's recipes turn it on)."""
    from vitune.model.vision import load_vision_tower  # deferred: open_clip is slow to import
    from vitune.vision_recipe import model_recipe

    tower = model.vision_tower
    if tower is None:
        tower = load_vision_tower(cfg.model.vision, recipe=model_recipe(cfg.model.vision))
        model.attach_tower(tower)
    tower.to(device)
    tower.grad_checkpointing = bool(cfg.train.gradient_checkpointing)
    log.info("vision tower %s runs in the step (%s%s)", tower.name, "tunes" if cfg.tower_trains else "frozen",
             ", gradient checkpointing" if tower.grad_checkpointing and cfg.tower_trains else "")
    return tower


def part_counts(model: Any) -> dict[str, int]:
    """Trainable parameters by part (``trainable_<part>``: projector, lm, image_newline, vision_tower): what the
    loop logs as what trains."""
    out: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        if p.requires_grad:  # ZeRO-3 leaves a partitioned parameter empty; ds_numel keeps its size
            out[f"trainable_{name.split('.', 1)[0]}"] += int(getattr(p, "ds_numel", p.numel()))
    return dict(out)
