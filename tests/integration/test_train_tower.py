"""A tower that trains, through Ray: the pixel job writes the synthetic set's tiles to S3, a tiny model tunes
mm_vision_tower,mm_mlp_adapter,mm_language_model in stage 2 on 2 Ray Train workers (ZeRO-2, the tower in the
optimizer at its own rate), the last worker fails once and the run resumes from its checkpoint, and the model
folder holds a tower whose weights moved from the pretrained ones."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch

from vitune import storage
from vitune.config import FeaturesJobConfig, TrainJobConfig, load_config
from vitune.data import synthetic

pytestmark = pytest.mark.integration
TOWER_PARTS = "mm_vision_tower,mm_mlp_adapter,mm_language_model"


def test_a_tuned_tower_trains_from_the_pixel_store_and_resumes_after_a_failure(ray_local, s3_bucket):
    from vitune.features.extract import extract_features
    from vitune.features.pixels import PixelStore
    from vitune.model.folder import load_for_inference
    from vitune.model.vision import load_vision_tower
    from vitune.train.driver import run_training

    root = f"{s3_bucket}/tower-{uuid.uuid4().hex[:8]}"
    data = synthetic.generate(storage.join(root, "data"), seed=5, num_images=16, num_eval_images=0)
    records = [data["records"]["captions"]]
    common = [f"storage.root={root}", "tracking.enabled=false", f"data.records={json.dumps(records)}",
              f"data.image_root={data['image_root']}"]
    pixels = extract_features(load_config(FeaturesJobConfig, "tiny", [*common, "features.form=pixels"]))
    assert PixelStore.open(pixels["output"]).counts["images_in"] == 16

    cfg = load_config(TrainJobConfig, "tiny", [
        *common, "stage=finetune", "model.template=plain", "train.init_from=null", f"data.features={pixels['output']}",
        f"train.mm_tunable_parts={TOWER_PARTS}", "train.mm_vision_tower_lr=1e-2", "train.gradient_checkpointing=true",
        "train.zero_stage=2", "train.num_workers=2", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.epochs=2", "train.log_every=1", "train.checkpoint_every=2", "train.fail_at_step=3",
        "train.max_failures=1", "train.group_by_modality_length=false"])
    assert cfg.store_form == "pixels"
    summary = run_training(cfg)
    assert summary["total_steps"] == 4 and summary["metrics"]["step"] == 4
    assert summary["metrics"]["resumed_from"] == 2  # from the checkpoint, tower and optimizer state included
    assert np.isfinite(summary["metrics"]["loss"])

    served = load_for_inference(summary["model_folder"], device="cpu")
    assert served.meta["fingerprint"]["tower_weights"] == "trained"
    pretrained = load_vision_tower(cfg.model.vision)
    moved = [n for (n, p0), p1 in zip(pretrained.named_parameters(), served.tower.parameters(), strict=True)
             if not torch.equal(p0, p1)]
    assert len(moved) > len(list(pretrained.parameters())) // 2
