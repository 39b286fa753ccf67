"""LLaVA-OneVision-shaped training through Ray: the tiny-onevision preset (tiny SigLIP tower, tiny Qwen2, anyres_max
over a (1x1)..(2x2) grid, plain then qwen_1_5) runs its features job, align and finetune on 2 Ray Train workers;
the folders record the family, the loss falls, and the finetuned model answers held-out synthetic questions above
chance. `onevision_model_folder` returns the trained folder (the export check builds on it)."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

from vitune import storage
from vitune.config import EvalJobConfig, FeaturesJobConfig, TrainJobConfig, load_config
from vitune.data import synthetic

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)
PRESET = "tiny-onevision"
FAMILY = "siglip + qwen2, anyres_max_4"
NUM_IMAGES, NUM_EVAL, FINETUNE_EPOCHS = 64, 16, 12


def _base(root: str, features: str) -> list[str]:
    return [f"storage.root={root}", f"data.features={features}", "tracking.enabled=false", "train.num_workers=2",
            "train.micro_batch_size=8", "train.global_batch_size=16", "train.log_every=1"]


def onevision_model_folder(root: str) -> dict:
    """Features, align and finetune of tiny-onevision under ``root`` on the running Ray; returns the summaries
    (``finetune["model_folder"]`` is the trained model) and the synthetic data."""
    from vitune.features.extract import extract_features
    from vitune.train.driver import run_training

    data = synthetic.generate(storage.join(root, "data"), seed=3, num_images=NUM_IMAGES, num_eval_images=NUM_EVAL)
    recs = data["records"]
    feats = extract_features(load_config(FeaturesJobConfig, PRESET, [
        f"storage.root={root}", f"data.image_root={data['image_root']}",
        f"data.records=[{recs['captions']}, {recs['instruct']}]"]))
    base = _base(root, feats["output"])
    align = run_training(load_config(TrainJobConfig, PRESET, [
        "stage=align", *base, f"data.records={json.dumps([recs['captions']])}", "train.epochs=2"]))
    finetune = run_training(load_config(TrainJobConfig, PRESET, [
        "stage=finetune", *base, f"data.records={json.dumps([recs['instruct']])}",
        f"train.epochs={FINETUNE_EPOCHS}", f"train.init_from={align['model_folder']}"]))
    return {"data": data, "features": feats, "align": align, "finetune": finetune}


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    start = time.perf_counter()
    out = onevision_model_folder(str(tmp_path_factory.mktemp("onevision")))
    out["seconds"] = time.perf_counter() - start
    return out


def test_two_stages_train_on_two_workers_and_record_the_family(trained):
    from vitune.model.folder import read_meta

    for stage in ("align", "finetune"):
        summary = trained[stage]
        assert summary["stage"] == stage and np.isfinite(summary["metrics"]["loss"])
        meta = read_meta(summary["model_folder"])
        assert meta["family"] == FAMILY, meta["family"]
        assert meta["model"]["lm"] == "tiny-qwen2" and meta["lm"]["included"] is (stage == "finetune")
    assert trained["finetune"]["total_steps"] == FINETUNE_EPOCHS * NUM_IMAGES // 16


def test_finetune_loss_falls_and_held_out_answers_beat_chance(trained):
    from vitune.evaluation.run import run_evaluation
    from vitune.model.folder import read_meta

    root = trained["data"]["root"].rsplit("/data", 1)[0]
    report = run_evaluation(load_config(EvalJobConfig, PRESET, [
        f"storage.root={root}", "tracking.enabled=false",
        f"eval.model_folder={trained['finetune']['model_folder']}", f"eval.data={trained['data']['records']['eval']}",
        f"eval.output={root}/eval"]))
    result = report["result"]
    log.info("tiny-onevision: accuracy %s, chance %s, %.0f s to train", result["accuracy"], result["chance"],
             trained["seconds"])
    print("tiny-onevision eval", result, f"{trained['seconds']:.0f} s")  # pytest -s shows the measured numbers
    assert read_meta(trained["finetune"]["model_folder"])["stop_token_ids"]
    assert result["accuracy"] >= 1.5 * result["chance"]["overall"], result
