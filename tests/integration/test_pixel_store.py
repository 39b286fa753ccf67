"""The pixel store through Ray Data on local Ray against the S3 server: the feature job with
``features.form=pixels`` stores each image's preprocessed anyres tiles, quarantines a bad image, a re-run
computes nothing, and a changed grid gets a new store."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from vitune import layout, storage
from vitune.config import FeaturesJobConfig, load_config
from vitune.data import synthetic
from vitune.features.extract import extract_features
from vitune.features.pixels import PixelStore
from vitune.features.store import FeatureStore
from vitune.model.vision import load_vision_tower, pixel_fingerprint

pytestmark = pytest.mark.integration

GRID = [[32, 64], [64, 32], [64, 64]]
EXTRA = {"images/wide.png": (70, 30), "images/tall.png": (25, 60)}  # non-square: grids of 2 tiles
BROKEN = "images/garbage.png"


def _png(size: tuple[int, int], seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def test_pixel_job_quarantines_reruns_as_a_no_op_and_regrids_into_a_new_store(ray_local, s3_bucket):
    root = f"{s3_bucket}/pixels-{uuid.uuid4().hex[:8]}"
    data = synthetic.generate(f"{root}/data", seed=4, num_images=5, num_eval_images=0)
    for i, (key, size) in enumerate(EXTRA.items()):
        storage.write_bytes(f"{root}/data/{key}", _png(size, i))
    storage.write_bytes(f"{root}/data/{BROKEN}", b"not an image" * 5)
    extra = [{"id": f"x{i}", "image": key, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                              {"from": "gpt", "value": "Noise."}]}
             for i, key in enumerate([*EXTRA, BROKEN])]
    storage.write_text(f"{root}/data/extra.json", json.dumps(extra))
    records = [data["records"]["captions"], f"{root}/data/extra.json"]
    overrides = [f"storage.root={root}", "tracking.enabled=false", f"data.records={json.dumps(records)}",
                 f"data.image_root={root}/data", "features.shard_size=3", "features.form=pixels",
                 "model.vision.image_aspect_ratio=anyres", f"model.vision.image_grid_pinpoints={json.dumps(GRID)}"]
    cfg = load_config(FeaturesJobConfig, "tiny", overrides)

    first = extract_features(cfg)
    tower = load_vision_tower(cfg.model.vision)
    fp = pixel_fingerprint(tower)
    assert first["output"] == layout.features_output(cfg) == f"{root}/pixels/{first['fingerprint_id']}"
    assert first["images_in"] == 5 + 3 and first["quarantined"] == 1 and first["computed_shards"] == 3
    store = PixelStore.open(first["output"], expect_fingerprint=fp)
    [error] = store.errors()
    assert error["image_key"] == BROKEN and "not a recognised image format" in error["reason"]
    got = store.get(EXTRA)
    for i, (key, size) in enumerate(EXTRA.items()):  # the tiles the tower's own preprocessing makes
        want = tower.preprocess_tiles(Image.open(io.BytesIO(_png(size, i))))
        assert got[key].shape == (3, 3, 32, 32)  # the base view + a grid of 2
        assert torch.equal(store.to_pixel_values(got[key], tower.mean, tower.std), want)
    with pytest.raises(ValueError, match="is a pixel store"):
        FeatureStore.open(first["output"])

    again = extract_features(cfg)
    assert again["computed_shards"] == 0 and again["output"] == first["output"]

    regrid = load_config(FeaturesJobConfig, "tiny", [*overrides, f"model.vision.image_grid_pinpoints={GRID[:2]}"])
    moved = extract_features(regrid)
    assert moved["output"] != first["output"] and moved["computed_shards"] == 3
    assert PixelStore.open(moved["output"]).num_tiles()["images/wide.png"] == 3
