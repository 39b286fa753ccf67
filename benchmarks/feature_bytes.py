"""Stored feature bytes per image, pad vs AnyRes, for the tiny preset and LLaVA-1.6's CLIP-336 grid.

    python benchmarks/feature_bytes.py [--measure-images 8] [--read-images 32]

For each recipe and image size it prints ``vitune.features.store.stored_bytes_per_image`` (the tiles x
``[N, D]`` float16 payload + the size / num_tiles / offset columns; computed from the recipe, nothing
loaded) and, measured, the Parquet file bytes per image of a shard of ``--measure-images`` such images written
by the store's own writers with random fp16 features (snappy barely shrinks fp16 features, random or real).
No tower weights are needed: the geometry comes from open_clip's model configs. ``--read-images`` also times
reading one shard of that many anyres images (1-5 tiles of ``[576, 256]``) back to ``[T, N, D]`` arrays in the
store's encoding (raw float16 bytes, ``store.tile_arrays``) against a ``large_list<float16>`` column of the same
values (best of 3). On this 2-core machine under a load average of ~10, 2026-12-07, a 28.7 MiB shard of 32
images: 0.035 / 0.061 / 0.116 s vs 0.46 / 0.51 / 1.18 s over three runs, 8-13x.

Computed on 2026-12-07 (``--measure-images 8``; bytes per image; the tiny grid is LLaVA-1.6's pinpoints
scaled to its 32-px tiles, so a 336x336 image there is larger than every grid and takes the 2x2 one):

    tower            mode         image  tiles  computed B  measured B  computed KiB  measured KiB
    vitune-tiny-vit  pad        640x480      1        2056        3256           2.0           3.2
    vitune-tiny-vit  anyres     640x480      5       10260       10440          10.0          10.2
    vitune-tiny-vit  anyres     336x336      5       10260       10439          10.0          10.2
    vitune-tiny-vit  anyres    1000x200      4        8212        8391           8.0           8.2
    vitune-tiny-vit  anyres   1920x1080      5       10260       10440          10.0          10.2
    ViT-L-14-336     pad        640x480      1     1179656     1114198        1152.0        1088.1
    ViT-L-14-336     anyres     640x480      5     5898260     5898711        5760.0        5760.5
    ViT-L-14-336     anyres     336x336      3     3538964     3539306        3456.0        3456.4
    ViT-L-14-336     anyres    1000x200      4     4718612     4719009        4608.0        4608.4
    ViT-L-14-336     anyres   1920x1080      5     5898260     5898711        5760.0        5760.5

An anyres image costs its tile count times a pad image: 3-5x at LLaVA-1.6's grid (the base view + 2 to 4
grid tiles), up to 5.6 MiB per image at CLIP-336 (5.6 GiB per 1,000 images). A pad shard comes out a little
under its payload at CLIP-336 (Parquet dictionary-encodes its float16 leaf values); a tile shard's raw bytes
are written as they are, which is what makes them read back ~10x faster (``vitune.features.store``). The tiny
pad row's overhead is the fixed-shape list's Parquet levels and the footer over only 8 small rows.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitune import storage
from vitune.features.store import (
    shard_table,
    stored_bytes_per_image,
    tile_arrays,
    tile_shard_table,
    write_shard,
)
from vitune.vision_recipe import VisionRecipe, parse_grid_pinpoints, tiles_for, tower_config

LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 config.json
SIZES = [(640, 480), (336, 336), (1000, 200), (1920, 1080)]


def recipe_of(tower: str, mode: str, pinpoints: list[list[int]] | None = None) -> VisionRecipe:
    """A patch-token recipe of open_clip tower ``tower`` (geometry from its config; no weights)."""
    vision = tower_config(tower)["vision_cfg"]
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    grid = parse_grid_pinpoints([[h * size // 336, w * size // 336] for h, w in pinpoints], size) if pinpoints \
        else ()
    return VisionRecipe(tower=tower, pretrained=None, feature_layer=-2, select="patch", image_mode=mode,
                        image_size=size, patch_size=patch, hidden_size=int(vision["width"]), grid_pinpoints=grid)


def measured_bytes(recipe: VisionRecipe, width: int, height: int, images: int) -> float:
    """Parquet bytes per image of one shard of ``images`` images of this size, random fp16 features."""
    rng = np.random.default_rng(0)
    keys = [f"images/{i:06d}.jpg" for i in range(images)]
    tiles = tiles_for(recipe, width, height)
    n, d = recipe.tokens_per_tile, recipe.hidden_size
    with tempfile.TemporaryDirectory() as tmp:
        uri = storage.join(tmp, "shard-00000.parquet")
        if recipe.image_mode == "anyres":
            feats = [rng.standard_normal((tiles, n, d)).astype(np.float16) for _ in keys]
            table = tile_shard_table(keys, feats, [(width, height)] * images, {"shard": 0})
        else:
            table = shard_table(keys, rng.standard_normal((images, n, d)).astype(np.float16), {"shard": 0},
                                sizes=[(width, height)] * images)
        return write_shard(uri, table) / images


def read_seconds(images: int, n: int = 576, d: int = 256) -> dict[str, float]:
    """Seconds (best of 3) to read one shard back to each image's ``[T, N, D]``: the store's raw-bytes column
    vs a ``large_list<float16>`` column of the same tiles; and the shard's MiB."""
    rng = np.random.default_rng(0)
    tiles = [rng.standard_normal((int(t), n, d)).astype(np.float16) for t in rng.integers(1, 6, size=images)]
    keys = [f"k{i:05d}" for i in range(images)]
    ours = tile_shard_table(keys, tiles, [(1, 1)] * images)
    counts = np.array([t.shape[0] for t in tiles])
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]) * n * d, pa.int64())
    nested = pa.table({"features": pa.LargeListArray.from_arrays(offsets, pa.array(np.concatenate(
        [t.reshape(-1) for t in tiles]))), "num_tiles": ours.column("num_tiles")})

    def best(data: bytes, decode) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            decode(pq.read_table(pa.BufferReader(data)))
            times.append(time.perf_counter() - t0)
        return min(times)

    def as_bytes(table: pa.Table) -> bytes:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="snappy")
        return buf.getvalue()

    raw, listed = as_bytes(ours), as_bytes(nested)
    return {
        "shard_mib": round(len(raw) / 2**20, 1),
        "raw_bytes_s": round(best(raw, lambda t: tile_arrays(t.column("features"), t.column("num_tiles"), n, d)), 4),
        "large_list_float16_s": round(best(listed, lambda t: np.split(
            t.column("features").combine_chunks().flatten().to_numpy().reshape(-1, n, d), np.cumsum(counts)[:-1])),
            4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure-images", type=int, default=8, help="images per measured shard (0: skip)")
    parser.add_argument("--read-images", type=int, default=0, help="time reading a shard of this many (0: skip)")
    args = parser.parse_args()
    rows = []
    for tower in ("vitune-tiny-vit", "ViT-L-14-336"):
        for mode in ("pad", "anyres"):
            recipe = recipe_of(tower, mode, LLAVA_16_PINPOINTS if mode == "anyres" else None)
            for width, height in SIZES if mode == "anyres" else SIZES[:1]:
                row = {"tower": tower, "mode": mode, "image": f"{width}x{height}",
                       "tiles": tiles_for(recipe, width, height), "num_patches": recipe.tokens_per_tile,
                       "hidden_size": recipe.hidden_size,
                       "computed_bytes": stored_bytes_per_image(recipe, width, height)}
                if args.measure_images:
                    row["measured_bytes"] = round(measured_bytes(recipe, width, height, args.measure_images), 1)
                rows.append(row)
    out: dict = {"bytes_per_image": rows}
    if args.read_images:
        out["read"] = read_seconds(args.read_images)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
