"""The pixel store without Ray: its fingerprint (the preprocessing, not the tower), uint8 tiles equal to the
tower's preprocessing bit for bit, the per-shard job functions (load_shard → write_pixel_shards) with a
quarantined image, and the heart of the issue's equivalence: features from (pixel store → tower) equal the
feature store's, pad and anyres; the wrong form is refused with the reason."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from vitune.config import TrainJobConfig, VisionConfig
from vitune.vision_recipe import VisionRecipe, fingerprint_id

ANYRES = VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZES = {"tall.png": (30, 60), "square.png": (64, 64), "small.png": (20, 20), "wide.png": (70, 33)}


def _png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _images(tmp_path) -> str:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i, (key, size) in enumerate(SIZES.items()):
        (folder / key).write_bytes(_png(size, i))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return str(folder)


# ------------------------------------------------------------------------------------------ fingerprint


def test_pixel_fingerprint_covers_the_preprocessing_not_the_tower():
    pad = VisionRecipe.of(VisionConfig())
    fp = pad.pixel_fingerprint(CLIP_MEAN, CLIP_STD)
    assert fp == {"form": "pixels", "pixel_dtype": "uint8", "image_size": 32, "image_mode": "pad",
                  "pad_fill": [122, 116, 104]}
    pid = fingerprint_id(fp)
    assert pid != pad.fingerprint_id()  # never the feature store's folder
    # another layer or selection: other features, the same pixels
    for other in (VisionConfig(feature_layer=-1), VisionConfig(select="cls_patch")):
        assert VisionRecipe.of(other).fingerprint_id() != pad.fingerprint_id()
        assert fingerprint_id(VisionRecipe.of(other).pixel_fingerprint(CLIP_MEAN, CLIP_STD)) == pid
    # what the pixels depend on changes the id: pad's canvas colour, the dtype, the mode, the grid
    assert fingerprint_id(pad.pixel_fingerprint((0.5, 0.5, 0.5), CLIP_STD)) != pid
    assert fingerprint_id(pad.pixel_fingerprint(CLIP_MEAN, CLIP_STD, "bf16")) != pid
    crop = VisionRecipe.of(VisionConfig(image_aspect_ratio="square"))
    assert fingerprint_id(crop.pixel_fingerprint(CLIP_MEAN, CLIP_STD)) != pid
    # uint8 crop/anyres tiles are independent of mean and std; normalised bf16 ones are not
    assert crop.pixel_fingerprint(CLIP_MEAN, CLIP_STD) == crop.pixel_fingerprint((0.5,) * 3, (0.5,) * 3)
    assert crop.pixel_fingerprint(CLIP_MEAN, CLIP_STD, "bf16") != crop.pixel_fingerprint((0.5,) * 3, (0.5,) * 3, "bf16")
    anyres = VisionRecipe.of(ANYRES).pixel_fingerprint(CLIP_MEAN, CLIP_STD)
    regrid = VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=[[32, 64], [64, 32]])
    assert fingerprint_id(VisionRecipe.of(regrid).pixel_fingerprint(CLIP_MEAN, CLIP_STD)) != fingerprint_id(anyres)


def test_preprocess_stats_without_a_tower_match_the_built_towers():
    from vitune.model.vision import load_vision_tower
    from vitune.vision_recipe import preprocess_stats

    for vision in (VisionConfig(), VisionConfig(name="vitune-tiny-siglip")):
        tower = load_vision_tower(vision)
        assert preprocess_stats(vision) == (tower.mean, tower.std)


def test_uint8_tiles_normalise_to_the_towers_pixels_bit_for_bit():
    from vitune.model import image as image_lib

    img = Image.open(io.BytesIO(_png((70, 33), 5)))
    for vision in (VisionConfig(), VisionConfig(image_aspect_ratio="square"), ANYRES):
        recipe = VisionRecipe.of(vision)
        u8 = image_lib.tiles_uint8(img, recipe, CLIP_MEAN)
        assert u8.dtype == np.uint8 and u8.shape[1:] == (3, 32, 32)
        want = image_lib.preprocess_tiles(img, recipe, CLIP_MEAN, CLIP_STD)
        assert torch.equal(image_lib.normalize_uint8(torch.from_numpy(u8), CLIP_MEAN, CLIP_STD), want)


def test_the_wrong_form_is_refused_with_the_reason():
    tower = {"mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter"}
    with pytest.raises(ValueError, match="features.form='features' but the tower trains .* stored features are the "
                                         "frozen tower's"):
        TrainJobConfig.model_validate({"stage": "finetune", "features": {"form": "features"}, "train": tower})
    assert TrainJobConfig.model_validate({"features": {"form": "features"}}).store_form == "features"
    assert TrainJobConfig.model_validate({"train": tower}).store_form == "pixels"
    # a frozen tower may run in the step on pixels: the two forms' equivalence case
    assert TrainJobConfig.model_validate({"features": {"form": "pixels"}}).store_form == "pixels"


# ------------------------------------------------------------------------- the job's per-shard functions


def _pixel_store(tmp_path, vision: VisionConfig, dtype: str = "uint8"):
    """load_shard → write_pixel_shards → write_manifest, as the pixel job runs them on one shard (no Ray)."""
    from vitune.features.encode import PreprocessSpec, load_shard, write_pixel_shards
    from vitune.features.pixels import PIXELS_FORMAT_VERSION, PixelStore, pixel_schema
    from vitune.features.store import write_manifest
    from vitune.model.vision import load_vision_tower, pixel_fingerprint

    tower = load_vision_tower(vision)
    keys = sorted([*SIZES, "broken.png", "gone.png"])
    fp, out = pixel_fingerprint(tower, dtype), str(tmp_path / f"pixels-{dtype}")
    spec = PreprocessSpec.from_tower(tower, uint8=dtype == "uint8")
    loaded = load_shard(pa.table({"shard": [0], "keys": [keys]}), _images(tmp_path), spec, max_pixels=10**7)
    result = write_pixel_shards(loaded, out, fingerprint_id(fp), dtype, tower.image_size).to_pylist()
    write_manifest(out, [keys], fp, (3, tower.image_size), result, schema=pixel_schema(dtype, tower.image_size),
                   format_version=PIXELS_FORMAT_VERSION)
    return tower, result, PixelStore.open(out, expect_fingerprint=fp)


def _feature_store(tmp_path, vision: VisionConfig):
    from vitune.features.encode import EncodeShard, PreprocessSpec, load_shard
    from vitune.features.store import FeatureStore, write_manifest
    from vitune.model.vision import load_vision_tower

    tower = load_vision_tower(vision)
    keys = sorted(SIZES)
    fp, out = tower.fingerprint(), str(tmp_path / "features")
    loaded = load_shard(pa.table({"shard": [0], "keys": [keys]}), _images(tmp_path), PreprocessSpec.from_tower(tower),
                        max_pixels=10**7)
    result = EncodeShard(vision, out, fingerprint_id(fp), batch_size=4, threads=None)(loaded).to_pylist()
    write_manifest(out, [keys], fp, (tower.num_patches, tower.hidden_size), result)
    return FeatureStore.open(out, expect_fingerprint=fp)


@pytest.mark.parametrize("vision", [VisionConfig(), ANYRES], ids=["pad", "anyres"])
def test_features_from_the_pixel_store_equal_the_feature_stores(tmp_path, vision):
    from vitune.features.pixels import features_from_pixels

    tower, result, pixels = _pixel_store(tmp_path, vision)
    assert result[0]["rows"] == len(SIZES) and result[0]["quarantined"] == 2
    assert pixels.counts["images_in"] == len(SIZES) + 2 and pixels.counts["quarantined"] == 2
    assert {e["image_key"]: e["reason"] for e in pixels.errors()}["gone.png"] == "missing file"
    assert pixels.keys() == sorted(SIZES) and pixels.image_sizes() == SIZES
    got = pixels.get(SIZES)
    for i, (key, size) in enumerate(SIZES.items()):  # the stored bytes are the tower's preprocessing, exactly
        img = Image.open(io.BytesIO(_png(size, i)))
        assert got[key].dtype == np.uint8
        want = tower.preprocess_tiles(img)
        assert torch.equal(pixels.to_pixel_values(got[key], tower.mean, tower.std), want)
    features = _feature_store(tmp_path, vision).get(SIZES)
    with torch.no_grad():
        from_pixels = features_from_pixels(tower, [got[k] for k in SIZES], pixels.fingerprint)
    for key, feats in zip(SIZES, from_pixels, strict=True):
        stored = features[key].reshape(-1, tower.num_patches, tower.hidden_size)  # pad stores [N, D]: one tile
        assert feats.shape == stored.shape == (pixels.num_tiles()[key], tower.num_patches, tower.hidden_size)
        np.testing.assert_allclose(feats.to(torch.float16).numpy(), stored, rtol=1e-3, atol=1e-3)
    assert pixels.visual_tokens(tower.recipe) == _feature_store(tmp_path, vision).visual_tokens(tower.recipe)


def test_bf16_store_holds_the_normalised_tiles_rounded_and_twice_the_bytes(tmp_path):
    tower, result8, u8 = _pixel_store(tmp_path, ANYRES, "uint8")
    _, result16, bf = _pixel_store(tmp_path, ANYRES, "bf16")
    assert bf.manifest["schema"]["dtype"] == "bfloat16" and u8.manifest["schema"]["dtype"] == "uint8"
    assert bf.manifest["fingerprint_id"] != u8.manifest["fingerprint_id"]
    img = Image.open(io.BytesIO(_png(SIZES["wide.png"], 3)))
    want = tower.preprocess_tiles(img)
    got = bf.to_pixel_values(bf.get(["wide.png"])["wide.png"], tower.mean, tower.std)
    assert torch.equal(got, want.to(torch.bfloat16).float())  # what a bf16 tower sees
    raw8 = sum(t.nbytes for t in u8.get(SIZES).values())
    assert sum(t.nbytes for t in bf.get(SIZES).values()) == 2 * raw8


def test_a_store_of_the_other_form_and_another_preprocessing_are_refused(tmp_path):
    from vitune.features.pixels import PixelStore, features_from_pixels
    from vitune.features.store import FeatureStore
    from vitune.model.vision import load_vision_tower
    from vitune.vision_recipe import FingerprintMismatch

    _, _, pixels = _pixel_store(tmp_path, ANYRES)
    with pytest.raises(ValueError, match="is a pixel store .* a frozen tower trains from a feature store"):
        FeatureStore.open(pixels.uri)
    features = _feature_store(tmp_path, ANYRES)
    with pytest.raises(ValueError, match="is a feature store .* features.form=pixels"):
        PixelStore.open(features.uri)
    regrid = load_vision_tower(VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=[[32, 64], [64, 32]]))
    with pytest.raises(FingerprintMismatch, match="grid_pinpoints"):
        features_from_pixels(regrid, list(pixels.get(["tall.png"]).values()), pixels.fingerprint)
