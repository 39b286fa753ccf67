"""AnyRes through Ray: the features job and the train job of the tiny-anyres preset on the synthetic data (some
images cropped to other sizes, so their tile and visual-token counts differ), 2 workers, ZeRO-2 align; the run's
model folder serves with its recipe and trained image_newline kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitune import storage
from vitune.config import FeaturesJobConfig, TrainJobConfig, load_config
from vitune.data import synthetic
from vitune.vision_recipe import model_recipe

pytestmark = pytest.mark.integration
PRESET = "tiny-anyres"


def test_tiny_anyres_features_and_align_through_ray(ray_local, tmp_path):
    from vitune.features.extract import extract_features
    from vitune.features.store import FeatureStore
    from vitune.model.folder import load_for_inference
    from vitune.train.driver import run_training

    root = str(tmp_path)
    data = synthetic.generate(storage.join(root, "data"), seed=7, num_images=32, num_eval_images=0)
    for i, path in enumerate(sorted(Path(data["image_root"], "images", "train").glob("*.png"))):
        if i % 3:  # 64x64, 64x32 and 40x64 images: 5 or 3 tiles, and as many token counts
            Image.open(path).crop((0, 0, 64, 32) if i % 3 == 1 else (0, 0, 40, 64)).save(path)
    captions = data["records"]["captions"]
    feats = extract_features(load_config(FeaturesJobConfig, PRESET, [
        f"storage.root={root}", f"data.image_root={data['image_root']}", f"data.records=[{captions}]"]))
    store = FeatureStore.open(feats["output"])
    assert store.tiled and len(store) == 32 and set(store.num_tiles().values()) == {3, 5}

    cfg = load_config(TrainJobConfig, PRESET, [
        "stage=align", f"storage.root={root}", f"data.features={feats['output']}",
        f"data.records={json.dumps([captions])}", "tracking.enabled=false", "train.num_workers=2",
        "train.micro_batch_size=4", "train.global_batch_size=16",
        "train.epochs=2", "train.log_every=1"])
    summary = run_training(cfg)
    assert summary["total_steps"] == 4 and summary["data"]["samples"] == 32
    assert np.isfinite(summary["metrics"]["loss"])
    served = load_for_inference(summary["model_folder"], device="cpu")
    assert served.model.recipe == model_recipe(cfg.model.vision) and served.model.image_newline is not None
    assert served.meta["fingerprint"]["grid_pinpoints"] == [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
