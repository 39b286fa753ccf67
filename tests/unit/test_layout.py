"""Layout: every storage path a job reads or writes, from its config alone (local and S3 roots)."""

from __future__ import annotations

import os

import pytest
import yaml

from vitune import layout
from vitune.config import (
    EvalJobConfig,
    FeaturesJobConfig,
    GenerateJobConfig,
    SyntheticJobConfig,
    TrainJobConfig,
    VisionConfig,
    build_config,
    load_config,
    preset_names,
    resolve_preset,
)
from vitune.model.vision import load_vision_tower
from vitune.references import resolve_model
from vitune.vision_recipe import VisionRecipe, fingerprint_id

ROOT = "s3://bucket/runs"


def test_feature_store_path_is_the_fingerprint_id_of_the_tower_the_config_names():
    for vision in (VisionConfig(), VisionConfig(feature_layer=-1, select="cls_patch")):
        # the id from the config alone (no weights loaded) is the id of the tower that computes the features
        tower = load_vision_tower(vision)
        assert VisionRecipe.of(vision) == tower.recipe
        assert VisionRecipe.of(vision).fingerprint_id() == fingerprint_id(tower.fingerprint())
    cfg = build_config(FeaturesJobConfig, {"storage": {"root": ROOT}})
    fp_id = VisionRecipe.of(cfg.model.vision).fingerprint_id()
    assert layout.features_output(cfg) == f"{ROOT}/features/{fp_id}"
    other = build_config(FeaturesJobConfig, {"storage": {"root": ROOT}, "model": {"vision": {"feature_layer": -1}}})
    assert layout.features_output(other) != layout.features_output(cfg)  # another tower, another store


def test_training_reads_the_store_its_feature_job_writes():
    for overrides in ([], ["data.features=s3://b/f"], ["features.output=s3://b/f"]):
        feats = build_config(FeaturesJobConfig, {"storage": {"root": ROOT}}, overrides)
        train = build_config(TrainJobConfig, {"storage": {"root": ROOT}}, overrides)
        assert layout.features_input(train) == layout.features_output(feats)
    both = ["data.features=s3://b/read", "features.output=s3://b/write"]
    assert layout.features_input(build_config(TrainJobConfig, {}, both)) == "s3://b/read"
    assert layout.features_output(build_config(FeaturesJobConfig, {}, both)) == "s3://b/write"


def test_training_paths_per_stage_and_override():
    align = build_config(TrainJobConfig, {"storage": {"root": ROOT}}, ["stage=align"])
    assert layout.train_output(align) == f"{ROOT}/train/align"
    assert layout.model_folder(align) == f"{ROOT}/train/align/model"
    assert layout.train_checkpoints(align) == f"{ROOT}/train/align/ray"
    assert (layout.train_summary(align), layout.train_config(align)) == (
        f"{ROOT}/train/align/summary.json", f"{ROOT}/train/align/config.yaml")
    moved = build_config(TrainJobConfig, {"storage": {"root": ROOT}}, ["stage=finetune", "train.output=s3://x/ft"])
    assert layout.model_folder(moved) == "s3://x/ft/model"


def test_a_stage_name_is_that_stages_model_folder_once_resolved(tmp_path):
    root = str(tmp_path)
    fine = load_config(TrainJobConfig, "tiny", ["stage=finetune", f"storage.root={root}"])
    assert fine.train.init_from == "align"  # the preset says `align`; the config keeps the reference as given
    assert resolve_model(fine.train.init_from, root=fine.storage.root) == os.path.join(root, "train", "align", "model")
    assert load_config(TrainJobConfig, "tiny", ["stage=finetune", "train.init_from=null"]).train.init_from is None
    assert build_config(TrainJobConfig, {}, ["train.init_from=runs:/abc"]).train.init_from == "runs:/abc"
    ev = load_config(EvalJobConfig, "tiny", [f"storage.root={root}"])
    assert resolve_model(ev.eval.model_folder, root=root) == os.path.join(root, "train", "finetune", "model")
    aligned = build_config(EvalJobConfig, {"storage": {"root": ROOT}}, ["eval.model_folder=align"])
    assert resolve_model(aligned.eval.model_folder, root=ROOT) == f"{ROOT}/train/align/model"


def test_eval_generate_and_cache_paths():
    ev = build_config(EvalJobConfig, {"storage": {"root": ROOT}}, ["eval.benchmark=scienceqa"])
    assert layout.eval_output(ev, f"{ROOT}/train/finetune/model") == f"{ROOT}/eval/scienceqa/model"
    assert layout.eval_output(ev, None) == f"{ROOT}/eval/scienceqa/predictions"
    named = build_config(EvalJobConfig, {"storage": {"root": ROOT}}, ["eval.name=v1"])
    assert layout.eval_output(named, "s3://m/model") == f"{ROOT}/eval/scienceqa/v1"
    assert layout.judge_cache(ev.judge, ROOT) == f"{ROOT}/judge_cache"
    assert layout.judge_cache(ev.judge.model_copy(update={"use_cache": False}), ROOT) is None

    gen = build_config(GenerateJobConfig, {"storage": {"root": ROOT}})
    out = layout.generate_output(gen)
    assert out == f"{ROOT}/generate" and layout.llm_cache(gen) == f"{ROOT}/llm_cache"
    assert layout.generate_records(out, "detail") == f"{ROOT}/generate/records/detail.json"
    assert layout.generate_errors(out) == f"{ROOT}/generate/errors/errors.jsonl"
    assert layout.generate_summary(out) == f"{ROOT}/generate/summary.json"
    assert layout.llm_cache(build_config(GenerateJobConfig, {}, ["generate.use_cache=false"])) is None
    assert layout.synthetic_data(build_config(SyntheticJobConfig, {"storage": {"root": ROOT}})) == f"{ROOT}/data"


def test_embedded_mlflow_store(tmp_path, monkeypatch):
    assert layout.mlflow_db(str(tmp_path)) == str(tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)  # SQLite needs a local disk: an S3 root keeps it under ./runs
    assert layout.mlflow_db(ROOT) == str(tmp_path / "runs" / "mlflow.db")


def _strings(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _strings(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _strings(value)
    elif isinstance(tree, str):
        yield tree


@pytest.mark.parametrize("preset", preset_names())
def test_presets_restate_no_derived_path(preset):
    values = list(_strings(yaml.safe_load(open(resolve_preset(preset)).read())))
    for folder in ("features", "train", "eval", "generate", "llm_cache", "judge_cache"):
        restated = [v for v in values if f"/{folder}/" in f"{v}/" and ("${" in v or "://" in v)]
        assert not restated, f"{preset} restates the layout's {folder} path: {restated}"
    # the records and eval data the tiny preset names are the synthetic set, an input: no layout path
    assert all(not v.startswith("${storage.root}/") or v.startswith("${storage.root}/data/") for v in values)
