"""Foundation: layout, typed config with overrides, local storage, synthetic data, tiny tokenizer."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from vitune import config, storage
from vitune.data import synthetic

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


def test_local_storage_roundtrip(tmp_path):
    _roundtrip(str(tmp_path / "store"))


def _roundtrip(base: str) -> None:
    storage.write_bytes(storage.join(base, "a", "b.bin"), b"\x00\x01bytes")
    assert storage.read_bytes(storage.join(base, "a", "b.bin")) == b"\x00\x01bytes"
    storage.write_json(storage.join(base, "x.json"), {"k": [1, 2, "ü"]})
    assert storage.read_json(storage.join(base, "x.json")) == {"k": [1, 2, "ü"]}
    table = pa.table({"key": ["a", "b"], "v": [1.5, 2.5]})
    storage.write_parquet(table, storage.join(base, "t", "p.parquet"))
    assert storage.read_parquet(storage.join(base, "t", "p.parquet")).equals(table)
    assert storage.exists(storage.join(base, "x.json"))
    assert not storage.exists(storage.join(base, "missing.json"))
    files = storage.list_files(base)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["b.bin", "p.parquet", "x.json"]
    assert storage.list_files(storage.join(base, "nothing-here")) == []
    storage.delete(storage.join(base, "t"))
    assert not storage.exists(storage.join(base, "t", "p.parquet"))


def test_jsonl_roundtrip_and_bad_line(tmp_path):
    uri = str(tmp_path / "rows.jsonl")
    rows = [{"id": 1, "text": "ü"}, {"id": 2, "path": tmp_path}]  # a value JSON cannot hold is written as text
    storage.write_jsonl(uri, rows)
    assert storage.read_text(uri) == f'{{"id": 1, "text": "ü"}}\n{{"id": 2, "path": "{tmp_path}"}}\n'
    assert storage.read_jsonl(uri) == [{"id": 1, "text": "ü"}, {"id": 2, "path": str(tmp_path)}]
    storage.write_text(uri, '{"id": 1}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"rows.jsonl line 3: not JSON"):
        storage.read_jsonl(uri)


def test_storage_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="gs"):
        storage.resolve("gs://bucket/x")


def test_synthetic_is_deterministic_and_valid(tmp_path):
    from vitune.data.records import validate_record

    a = synthetic.generate(str(tmp_path / "a"), seed=3, num_images=12, num_eval_images=4)
    b = synthetic.generate(str(tmp_path / "b"), seed=3, num_images=12, num_eval_images=4)
    c = synthetic.generate(str(tmp_path / "c"), seed=4, num_images=12, num_eval_images=4)
    for name in ("captions", "instruct", "eval"):
        assert storage.read_bytes(a["records"][name]) == storage.read_bytes(b["records"][name])
        for rec in storage.read_json(a["records"][name]):
            validate_record(rec)
    imgs_a = [storage.read_bytes(u) for u in storage.list_files(str(tmp_path / "a" / "images"))]
    imgs_b = [storage.read_bytes(u) for u in storage.list_files(str(tmp_path / "b" / "images"))]
    assert imgs_a == imgs_b and len(imgs_a) == 16
    assert storage.read_bytes(a["records"]["instruct"]) != storage.read_bytes(c["records"]["instruct"])
    evals = storage.read_json(a["records"]["eval"])
    assert {r["kind"] for r in evals} == set(synthetic.CHECKABLE_KINDS)
    assert all(r["conversations"][1]["value"] == r["answer"] for r in evals)


def test_tiny_tokenizer_offline():
    from vitune.data.tokenizer import image_token_id, load_tokenizer

    tok = load_tokenizer("tiny")
    ids = tok("<image>\nWhat color? red", add_special_tokens=False).input_ids
    assert ids[0] == image_token_id(tok)
    assert tok.decode(ids) == "<image>\nWhat color? red"
    assert tok.decode(tok("日本 ünïcode", add_special_tokens=False).input_ids) == "日本 ünïcode"


def test_image_token_id_of_a_tokenizer_without_it_is_a_clear_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from vitune.data.tokenizer import image_token_id

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, "<unk>")),
                                   unk_token="<unk>")
    with pytest.raises(ValueError, match="the tokenizer has no <image> token .load it with vitune.data.tokenizer"):
        image_token_id(bare)


def test_shared_facts_are_defined_once():
    import vitune
    from vitune.data import records, templates
    from vitune.model import vlm

    assert (vitune.IGNORE_INDEX, vitune.HUMAN, vitune.GPT) == (-100, "human", "gpt")
    assert templates.IGNORE_INDEX is vlm.IGNORE_INDEX is vitune.IGNORE_INDEX  # imported, not restated
    assert records.ROLES == (vitune.HUMAN, vitune.GPT)


def test_every_job_entrypoint_has_the_one_shape():
    from vitune.cli.jobs import JOBS

    files = sorted(p[:-3] for p in os.listdir(os.path.join(ROOT, "jobs")) if p.endswith(".py"))
    assert files == sorted(JOBS)  # one entrypoint per job, no helper module beside them
    for job in files:
        text = open(os.path.join(ROOT, "jobs", f"{job}.py")).read()
        assert f'return jobs.main("{job}", argv, __doc__)' in text and len(text.splitlines()) < 40, job
        assert "sys.path" not in text and "argparse" not in text, job


def test_job_without_config_is_refused(capsys):
    from vitune.cli.jobs import main

    with pytest.raises(SystemExit) as err:
        main("train", [])
    assert err.value.code == 2 and "--config" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown job 'nope'; valid jobs: extract_features, train"):
        main("nope", ["--config", "tiny"])
