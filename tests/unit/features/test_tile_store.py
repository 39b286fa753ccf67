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


# ------------------------------------------------------------------------------------------ the format

RECIPE = VisionRecipe.of(ANYRES)  # the tiny tower: tiles of 32 px, [N, D] = [16, 64]
N, D = RECIPE.tokens_per_tile, RECIPE.hidden_size
SIZES = {"a.png": (32, 32), "b.png": (30, 60), "c.png": (64, 64), "d.png": (60, 30)}  # (w, h): 3, 3, 5, 3 tiles


def tiles_of(key: str) -> np.ndarray:
    w, h = SIZES[key]
    rng = np.random.default_rng(sum(key.encode()))
    return rng.standard_normal((tiles_for(RECIPE, w, h), N, D)).astype(np.float16)  # [T, N, D]


def test_tile_shards_read_back_as_tiles_and_sizes(tmp_path):
    from vitune.features.extract import plan_shards, reusable_shards
    from vitune.features.store import FeatureStore, shard_name, tile_shard_table, write_manifest, write_shard

    out, fp = str(tmp_path / "store"), RECIPE.fingerprint()
    assert sorted({tiles_for(RECIPE, *s) for s in SIZES.values()}) == [3, 5]  # the tile counts differ
    shards = plan_shards(sorted(SIZES), 3)
    for i, keys in enumerate(shards):
        table = tile_shard_table(keys, [tiles_of(k) for k in keys], [SIZES[k] for k in keys],
                                 {"shard": i, "fingerprint_id": RECIPE.fingerprint_id(), "quarantined": 0})
        write_shard(storage.join(out, shard_name(i)), table)
    manifest = write_manifest(out, shards, fp, (N, D))
    assert manifest["format_version"] == 3 and manifest["schema"]["layout"] == "tiles"
    store = FeatureStore.open(out, expect_fingerprint=fp)
    assert store.tiled and store.keys() == sorted(SIZES)
    got = store.get(["d.png", "b.png", "zz.png"])
    assert set(got) == {"d.png", "b.png"}
    for key in got:
        np.testing.assert_array_equal(got[key], tiles_of(key))
    assert store.image_sizes() == SIZES
    assert store.num_tiles() == {k: tiles_for(RECIPE, *s) for k, s in SIZES.items()}
    assert [[t.shape for t in f] for _, f in store.iter_arrays()] == [[(3, N, D), (3, N, D), (5, N, D)], [(3, N, D)]]

    class Rec:
        def __init__(self, image):
            self.image = image

    pairs = list(store.join_records([Rec("c.png"), Rec("a.png")]))
    assert [r.image for r, _ in pairs] == ["a.png", "c.png"]
    np.testing.assert_array_equal(pairs[1][1], tiles_of("c.png"))
    # the count takes the model's merge: the store's fingerprint does not name it
    flat = VisionRecipe.of(VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=ANYRES.image_grid_pinpoints,
                                        mm_patch_merge_type="flat"))
    assert store.visual_tokens(flat)["c.png"] == 5 * N != store.visual_tokens()["c.png"]
    with pytest.raises(ValueError, match="makes other tiles"):
        store.visual_tokens(VisionRecipe.of(VisionConfig()))
    assert sorted(reusable_shards(out, shards, RECIPE.fingerprint_id())) == [0, 1]  # reuse as for pad stores


def test_tile_rows_that_do_not_add_up_are_refused(tmp_path):
    from vitune.features.store import (
        FeatureStore,
        shard_name,
        tile_arrays,
        tile_shard_table,
        write_manifest,
        write_shard,
    )

    table = tile_shard_table(["a.png"], [tiles_of("a.png")], [SIZES["a.png"]])
    with pytest.raises(ValueError, match="num_tiles=4 tiles"):
        tile_arrays(table.column("features"), pa.array([4], pa.int32()), N, D)
    with pytest.raises(ValueError, match=r"image 'a.png': tile features of shape \(16, 64\)"):
        tile_shard_table(["a.png"], [tiles_of("a.png")[0]], [SIZES["a.png"]])
    # a row whose tiles are not what its size makes under the store's recipe
    out = str(tmp_path / "store")
    write_shard(storage.join(out, shard_name(0)), tile_shard_table(["a.png"], [tiles_of("c.png")], [SIZES["a.png"]]))
    write_manifest(out, [["a.png"]], RECIPE.fingerprint(), (N, D))
    with pytest.raises(ValueError, match=r"'a.png' \(32x32\) holds 5 tiles; its recipe cuts it into 3"):
        FeatureStore.open(out).get(["a.png"])


# ------------------------------------------------------------------------- the job's per-shard functions


def _png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _run_shard(tmp_path, vision: VisionConfig, sizes: dict[str, tuple[int, int]], broken: list[str],
               missing: tuple[str, ...] = ()):
    """load_shard → EncodeShard → write_manifest, as the Ray job runs them on one shard (without Ray)."""
    from vitune.features.encode import EncodeShard, PreprocessSpec, load_shard
    from vitune.features.store import FeatureStore, write_manifest
    from vitune.model.vision import load_vision_tower

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i, (key, size) in enumerate(sizes.items()):
        (images / key).write_bytes(_png(size, i))
    for key in broken:
        (images / key).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    keys = sorted([*sizes, *broken, *missing])
    tower = load_vision_tower(vision)
    fp, out = tower.fingerprint(), str(tmp_path / "store")
    loaded = load_shard(pa.table({"shard": [0], "keys": [keys]}), str(images), PreprocessSpec.from_tower(tower),
                        max_pixels=10**7)
    result = EncodeShard(vision, out, fingerprint_id(fp), batch_size=2, threads=None)(loaded).to_pylist()
    write_manifest(out, [keys], fp, (tower.num_patches, tower.hidden_size), result)
    return tower, loaded, result, FeatureStore.open(out, expect_fingerprint=fp)


def test_anyres_job_stores_each_images_tiles_and_quarantines_a_broken_one(tmp_path):
    from vitune.features.store import shard_name
    from vitune.model.vision import encode_image_tiles

    sizes = {"tall.png": (30, 60), "square.png": (64, 64), "small.png": (20, 20)}
    tower, loaded, result, store = _run_shard(tmp_path, ANYRES, sizes, broken=["broken.png"])
    want_tiles = {k: tiles_for(tower.recipe, *s) for k, s in sizes.items()}
    assert want_tiles == {"tall.png": 3, "square.png": 5, "small.png": 3}
    assert loaded.column("tiles").to_pylist() == [[want_tiles[k] for k in sorted(sizes)]]
    assert result[0]["rows"] == 3 and result[0]["quarantined"] == 1
    assert store.counts["quarantined"] == 1 and store.keys() == sorted(sizes)
    [error] = store.errors()
    assert error["image_key"] == "broken.png" and error["shard"] == 0 and error["reason"]
    got = store.get(sizes)
    reference = encode_image_tiles(tower, [Image.open(io.BytesIO(_png(sizes[k], i))) for i, k in enumerate(sizes)])
    for key, ref in zip(sizes, reference, strict=True):
        assert got[key].shape == (want_tiles[key], tower.num_patches, tower.hidden_size)
        np.testing.assert_allclose(got[key].astype(np.float32), ref.numpy(), atol=2e-2, rtol=2e-2)
    assert store.image_sizes() == sizes
    schema = storage.read_parquet(storage.join(store.uri, shard_name(0))).schema
    assert [f.name for f in schema] == ["image_key", "features", "num_tiles", "size"]
    assert schema.field("features").type == pa.large_binary()


def test_anyres_shard_with_no_good_image_commits_an_empty_tile_shard(tmp_path):
    _, loaded, result, store = _run_shard(tmp_path, ANYRES, {}, broken=["broken.png"], missing=("gone.png",))
    assert loaded.column("tiles").to_pylist() == [[]] and result[0]["rows"] == 0
    assert store.counts == {**store.counts, "images_in": 2, "features_out": 0, "quarantined": 2}
    assert {e["image_key"]: e["reason"] for e in store.errors()}["gone.png"] == "missing file"
    assert store.keys() == [] and store.get(["broken.png"]) == {} and store.num_tiles() == {}
    assert [f for _, f in store.iter_arrays()] == [[]]


def test_pad_job_writes_the_schema_it_always_did(tmp_path):
    from vitune.features.store import shard_name
    from vitune.model.vision import encode_images

    sizes = {"wide.png": (60, 30), "tall.png": (30, 60)}
    tower, loaded, result, store = _run_shard(tmp_path, VisionConfig(), sizes, broken=["broken.png"])
    assert loaded.column("tiles").to_pylist() == [[1, 1]] and result[0]["quarantined"] == 1
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and "layout" not in manifest["schema"]
    assert manifest["schema"]["columns"] == ["image_key", "features"]
    schema = storage.read_parquet(storage.join(store.uri, shard_name(0))).schema
    assert [f.name for f in schema] == ["image_key", "features", "size"]
    assert isinstance(schema.field("features").type, pa.FixedShapeTensorType)
    assert schema.field("features").type.shape == [tower.num_patches, tower.hidden_size]
    got = store.get(sizes)
    reference = encode_images(tower, [Image.open(io.BytesIO(_png(sizes[k], i))) for i, k in enumerate(sizes)])
    for key, ref in zip(sizes, reference, strict=True):
        np.testing.assert_allclose(got[key].astype(np.float32), ref.numpy(), atol=2e-2, rtol=2e-2)


def test_stored_bytes_per_image_pad_vs_anyres(tmp_path):
    from vitune.features.store import stored_bytes_per_image, tile_shard_table, write_shard

    pad = VisionRecipe.of(VisionConfig())
    assert stored_bytes_per_image(pad, 64, 64) == 16 * 64 * 2 + 8  # one [N, D] fp16 + size
    assert stored_bytes_per_image(RECIPE, 64, 64) == 5 * 16 * 64 * 2 + 8 + 4 + 8  # 5 tiles + size, count, offset
    assert stored_bytes_per_image(RECIPE, 30, 60) == 3 * 16 * 64 * 2 + 20
    # the Parquet file of a tile shard is its payload plus little (raw bytes: no per-value levels)
    keys = [f"k{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    table = tile_shard_table(keys, [rng.standard_normal((5, N, D)).astype(np.float16) for _ in keys], [(64, 64)] * 8)
    written = write_shard(str(tmp_path / "s.parquet"), table) / len(keys)
    assert 1.0 < written / stored_bytes_per_image(RECIPE, 64, 64) < 1.05


def test_preprocessing_reserves_room_for_the_largest_grid():
    from vitune.features.encode import PreprocessSpec, shard_pixel_bytes, tiles_per_image_at_most

    assert tiles_per_image_at_most(RECIPE) == 1 + 4  # the 64x64 grid: base view + 2x2
    assert tiles_per_image_at_most(VisionRecipe.of(VisionConfig())) == 1
    anyres = PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3, "anyres", RECIPE)
    pad = PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3, "pad")
    assert shard_pixel_bytes(pad, 10) == 10 * 3 * 32 * 32 * 4
    assert shard_pixel_bytes(anyres, 10) == 5 * shard_pixel_bytes(pad, 10)
