"""Typed config: presets, stage blocks, overrides, references, path pinning."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from vitune import config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_stdlib_platform_not_shadowed():
    out = subprocess.run(
        [sys.executable, "-c", "import platform, vitune; print(platform.system())"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH="platform"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "Linux"
    assert not os.path.exists(os.path.join(ROOT, "platform", "__init__.py"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "platform", "vitune", "presets", "*.yaml"))))
def test_every_shipped_yaml_loads(path):
    for cls in (
        config.FeaturesJobConfig,
        config.TrainJobConfig,
        config.SyntheticJobConfig,
        config.EvalJobConfig,
        config.GenerateJobConfig,
    ):
        cfg = config.load_config(cls, path)
        assert cfg.storage.root
    for stage in ("align", "finetune"):
        cfg = config.load_config(config.TrainJobConfig, path, [f"stage={stage}"])
        assert cfg.stage == stage


def test_stage_selects_block_and_overrides_win():
    path = "tiny"
    align = config.load_config(config.TrainJobConfig, path, ["stage=align"])
    fine = config.load_config(
        config.TrainJobConfig, path, ["stage=finetune", "train.lr=0.5", "model.vision.select=cls_patch"]
    )
    assert align.model.template == "plain" and fine.model.template == "vicuna_v1"
    assert fine.train.lr == 0.5 and fine.model.vision.select == "cls_patch"
    assert align.train.zero_stage == 2 and fine.train.zero_stage == 3


def test_an_override_into_a_stage_block_changes_that_stage_only():
    over = ["stages.finetune.train.lr=0.25", "stages.finetune.train.mm_tunable_parts=mm_language_model"]
    fine = config.load_config(config.TrainJobConfig, "tiny", ["stage=finetune", *over])
    align = config.load_config(config.TrainJobConfig, "tiny", ["stage=align", *over])
    assert fine.train.lr == 0.25 and fine.train.mm_tunable_parts == "mm_language_model"
    assert align.train.lr == 1.0e-2 and align.train.mm_tunable_parts is None
    # a plain override still wins over the stage's block
    both = config.load_config(config.TrainJobConfig, "tiny", ["stage=finetune", "train.lr=0.5", *over])
    assert both.train.lr == 0.5


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.nope=1", "model.nope"),
        ("train.lr=abc", "train.lr"),
        ("model.vision.select=middle", "model.vision.select"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
    ],
)
def test_bad_override_names_field_and_value(override, needle):
    path = "tiny"
    with pytest.raises(config.ConfigError) as err:
        config.load_config(config.TrainJobConfig, path, [override])
    msg = str(err.value)
    assert needle in msg
    assert override.split("=", 1)[1] in msg


def test_references_resolve_after_overrides():
    raw = {
        "storage": {"root": "./a"},
        "data": {"features": "${storage.root}/features", "records": ["${storage.root}/x.json"]},
    }
    cfg = config.build_config(config.TrainJobConfig, raw, ["storage.root=s3://b/p"])
    assert cfg.data.features == "s3://b/p/features" and cfg.data.records == ["s3://b/p/x.json"]
    with pytest.raises(config.ConfigError, match="nope.x"):
        config.build_config(config.TrainJobConfig, {"data": {"features": "${nope.x}"}})


def test_relative_local_paths_are_pinned_to_the_driver_cwd(tmp_path, monkeypatch):
    # Ray workers run in other directories: a relative root/path must mean the driver's cwd
    monkeypatch.chdir(tmp_path)
    cfg = config.build_config(
        config.TrainJobConfig,
        {"storage": {"root": "runs"}, "data": {"features": "${storage.root}/f", "records": ["r.json", "s3://b/r.json"]}},
        ["train.init_from=runs:/abc", "train.output=out"],
    )
    assert cfg.storage.root == str(tmp_path / "runs") and cfg.data.features == str(tmp_path / "runs" / "f")
    assert cfg.data.records == [str(tmp_path / "r.json"), "s3://b/r.json"]
    assert cfg.train.init_from == "runs:/abc" and cfg.train.output == str(tmp_path / "out")
    assert config.TrainJobConfig().storage.root == str(tmp_path / "runs")


def test_override_without_equals_is_rejected():
    with pytest.raises(config.ConfigError, match="key.sub=value"):
        config.build_config(config.TrainJobConfig, {}, ["train.lr"])


def test_unknown_stage_block():
    with pytest.raises(config.ConfigError, match="stage"):
        config.build_config(config.TrainJobConfig, {"stages": {"align": {}}}, ["stage=finetune"])
