"""Generated instruction data feeds the feature and training jobs unchanged; and a run whose LLM is the vitune
serving app (the tiny, untrained model) quarantines its nonsense instead of writing it as data."""

from __future__ import annotations

import json
import random

import pytest

from tests.fake_openai import fake_openai_fixture  # noqa: F401 - fixture `fake_openai`
from tests.integration.test_generate import make_responder
from vitune import storage
from vitune.config import FeaturesJobConfig, GenerateJobConfig, TrainJobConfig, build_config, load_config
from vitune.data import synthetic

pytestmark = pytest.mark.integration
TINY = "tiny"


def _scenes_as_jsonl(root) -> str:
    """Synthetic images + a JSONL of {image, captions, boxes} (boxes normalised) for the generation job."""
    rng = random.Random(7)
    lines = []
    for i in range(6):
        scene = synthetic.Scene(color=rng.choice(sorted(synthetic.COLORS)), shape=rng.choice(synthetic.SHAPES),
                                count=1, position=rng.choice(synthetic.POSITIONS))
        img = synthetic.render_scene(scene, 64, rng)
        (root / "images").mkdir(exist_ok=True)
        img.save(root / "images" / f"{i:03d}.png")
        lines.append(json.dumps({"image": f"images/{i:03d}.png", "captions": [scene.caption(), f"Picture {i}."],
                                 "boxes": [{"category": scene.shape, "bbox": [0.3, 0.3, 0.6, 0.6]}]}))
    (root / "input.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "input.jsonl")


def _generate_cfg(root, input_uri, base_url, model="fake", **endpoint):
    return build_config(GenerateJobConfig, {
        "storage": {"root": str(root)}, "tracking": {"enabled": False},
        "generate": {"input": [input_uri], "format": "jsonl", "output": str(root / "generated"),
                     "endpoint": {"base_url": base_url, "model": model, "api_key_env": None, "max_retries": 2,
                                  "backoff_initial_s": 0.01, "timeout_s": 60, **endpoint},
                     "workers": 1, "threads_per_worker": 4, "batch_size": 8}})


def test_generated_records_feed_features_and_training(ray_local, fake_openai, tmp_path):
    from vitune.features.extract import extract_features
    from vitune.instruct.run import run_generate
    from vitune.train.driver import run_training

    fake_openai.responder = make_responder()
    s = run_generate(_generate_cfg(tmp_path, _scenes_as_jsonl(tmp_path), fake_openai.base_url))
    assert s["records"] == 18 and s["quarantined"] == 0, s
    record_files = sorted(s["record_files"].values())

    overrides = [f"storage.root={tmp_path}", f"data.records={json.dumps(record_files)}",
                 f"data.image_root={tmp_path}", f"data.features={tmp_path / 'features'}"]
    f = extract_features(load_config(FeaturesJobConfig, TINY, overrides))
    assert (f["images_in"], f["features_out"], f["quarantined"]) == (6, 6, 0)

    out = run_training(load_config(TrainJobConfig, TINY, [
        *overrides, "stage=finetune", "train.init_from=null", "tracking.enabled=false", "train.num_workers=1",
        "train.global_batch_size=6", "train.micro_batch_size=6", "train.max_steps=2", "train.epochs=1"]))
    assert out["data"]["samples"] == 18 and out["data"]["skipped_total"] == 0, out["data"]
    assert out["metrics"]["step"] == 2 and storage.exists(storage.join(out["model_folder"], "vitune_model.json"))


def test_generation_against_the_serving_app_quarantines_nonsense(ray_local, chat_app, tmp_path):
    from vitune.instruct.run import run_generate

    s = run_generate(_generate_cfg(tmp_path, _scenes_as_jsonl(tmp_path), f"{chat_app}/v1", model="vitune-tiny",
                                   max_tokens=32))
    assert s["tasks"] == 18 == s["records"] + s["quarantined"]
    assert s["quarantined"] >= 17, s  # a random tiny model does not write well-formed instruction data
    errors = [json.loads(x) for x in storage.read_text(s["errors_file"]).splitlines()]
    assert len(errors) == s["quarantined"] and all(e.get("reason") for e in errors)
