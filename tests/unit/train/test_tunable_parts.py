"""LLaVA-NeXT's ``mm_tunable_parts`` in vitune: the config's names and defaults, the model's freeze by part, and a
finetune that tunes the LM alone leaving the projector exactly as it was initialised (one process, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.unit.train.worker_runs import run_worker
from vitune.config import ConfigError, ModelConfig, TrainJobConfig, load_config
from vitune.data.records import read_records
from vitune.data.tokenizer import load_tokenizer
from vitune.model.vlm import build_model
from vitune.train.data import tokenize_row, training_row

N_PATCHES, DIM = 16, 32


def _cfg(*overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, "tiny", list(overrides))


def test_each_stage_tunes_llava_next_s_default_parts() -> None:
    assert _cfg("stage=align").tunable_parts == ("mm_mlp_adapter",)
    assert _cfg("stage=finetune").tunable_parts == ("mm_mlp_adapter", "mm_language_model")
    # named in any order and spacing, kept in LLaVA-NeXT's order
    cfg = _cfg("stage=align", "train.mm_tunable_parts=mm_language_model, mm_mlp_adapter")
    assert cfg.train.mm_tunable_parts == "mm_mlp_adapter,mm_language_model"
    assert cfg.tunable_parts == ("mm_mlp_adapter", "mm_language_model")


@pytest.mark.parametrize(("value", "match"), [
    ("mm_mlp_adaptor", r"mm_mlp_adaptor is not a part; valid parts: mm_vision_tower, mm_mlp_adapter, "
                       r"mm_language_model"),
    ("mm_vision_resampler", r"vitune has no vision resampler"),
    (",", r"no part is not a part"),
])
def test_unknown_parts_are_refused_naming_the_field(value: str, match: str) -> None:
    with pytest.raises(ConfigError, match="train.mm_tunable_parts") as err:
        _cfg("stage=finetune", f"train.mm_tunable_parts={value}")
    assert err.match(match)


def test_the_tower_rate_needs_the_tower_and_lora_needs_the_lm() -> None:
    with pytest.raises(ConfigError, match="mm_vision_tower_lr=2e-06 is read only when mm_tunable_parts includes"):
        _cfg("stage=finetune", "train.mm_vision_tower_lr=2e-6")
    with pytest.raises(ConfigError, match="does not tune mm_language_model"):
        _cfg("stage=finetune", "train.lora.enabled=true", "train.mm_tunable_parts=mm_mlp_adapter")


def test_the_model_freezes_by_part() -> None:
    tok = load_tokenizer("tiny")
    model = build_model(ModelConfig(), tok, DIM)
    counts = model.freeze(["mm_language_model"])
    assert not any(p.requires_grad for p in model.projector.parameters())
    assert all(p.requires_grad for p in model.lm.parameters())
    assert counts["projector"]["trainable"] == 0 and counts["lm"]["frozen"] == 0
    assert model.freeze_for_stage("align")["projector"]["frozen"] == 0  # the stage's default is the same call
    with pytest.raises(ValueError, match="leaves nothing to train"):
        model.freeze([])
    with pytest.raises(ValueError, match="cannot tune mm_vision_tower here"):
        model.freeze(["mm_vision_tower"])


def test_a_finetune_of_the_lm_alone_leaves_the_projector_as_initialised(tmp_path) -> None:
    recs = [{"id": f"img-{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"A shape {i}."}]}
        for i in range(16)]
    (tmp_path / "records.json").write_text(json.dumps(recs))
    cfg = _cfg("stage=finetune", f"storage.root={tmp_path}", "train.num_workers=1", "train.init_from=null",
               "train.epochs=1", "train.micro_batch_size=4", "train.global_batch_size=8", "train.zero_stage=2",
               "train.checkpoint_every=1000", "train.mm_tunable_parts=mm_language_model")
    tok = load_tokenizer("tiny")
    feats = np.random.default_rng(0).standard_normal((N_PATCHES, DIM)).astype(np.float16)
    rows = [training_row(tokenize_row(r, cfg.model.template, tok, cfg.model.max_length, N_PATCHES), feats)
            for r in read_records(str(tmp_path / "records.json"))]
    before = build_model(cfg.model, tok, DIM)  # the same seeded init the worker builds
    run = run_worker(cfg, rows, DIM)
    assert run.final["step"] == 2
    after = run.worker.model
    for (name, p0), p1 in zip(before.projector.named_parameters(), after.projector.parameters(), strict=True):
        assert torch.equal(p0, p1.detach()), f"projector {name} moved"
    lm_moved = [n for (n, p0), p1 in zip(before.lm.named_parameters(), after.lm.parameters(), strict=True)
                if not torch.equal(p0, p1.detach())]
    assert lm_moved, "no LM weight trained"
