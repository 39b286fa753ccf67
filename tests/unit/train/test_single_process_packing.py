"""``train.packing`` through the real worker loop (``benchmarks/train_step.py``'s one-process harness, DeepSpeed on
CPU) with LLaVA's modality-grouped sampler: the packed run takes the same micro-batches of the same samples as the
padded one, and its step losses match the padded run's to float tolerance while it computes fewer positions."""

from __future__ import annotations

import numpy as np

from tests.unit.train.worker_runs import run_worker
from vitune.config import TrainJobConfig, load_config
from vitune.data.records import validate_record
from vitune.data.tokenizer import load_tokenizer
from vitune.train.data import tokenize_row, training_row
from vitune.train.worker import Worker

N_PATCHES, DIM = 16, 32


def _rows(cfg: TrainJobConfig) -> list[dict]:
    tok = load_tokenizer("tiny")
    feats = np.random.default_rng(0).standard_normal((N_PATCHES, DIM)).astype(np.float16)
    rows = []
    for i in range(16):
        image = i % 4 != 3
        raw = {"id": f"{'img' if image else 'txt'}-{i}", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?" if image else f"What is {i}?"},
            {"from": "gpt", "value": "A red square. " * (1 + (i * 7) % 13)}]}
        if image:
            raw["image"] = f"{i}.png"
        sample = tokenize_row(validate_record(raw, i), cfg.model.template, tok, cfg.model.max_length, N_PATCHES)
        rows.append({**training_row(sample, feats if image else None), "id": raw["id"]})
    return rows


def _train(cfg: TrainJobConfig, rows: list[dict]) -> tuple[list[dict], list[list[str]], list[int]]:
    seen: list[list[str]] = []
    widths: list[int] = []

    class Recording(Worker):
        def collate(self, batch_rows: list[dict]) -> dict:
            seen.append(sorted(r["id"] for r in batch_rows))
            batch = super().collate(batch_rows)
            widths.append(batch["input_ids"].shape[0])
            return batch

    return run_worker(cfg, rows, DIM, Recording).metrics, seen, widths


def test_packed_steps_match_padded_steps(tmp_path):
    base = ["stage=finetune", f"storage.root={tmp_path}", "train.num_workers=1", "train.init_from=null",
            "train.epochs=1", "train.micro_batch_size=4", "train.global_batch_size=8", "train.checkpoint_every=1000",
            "train.group_by_modality_length=true", "train.max_steps=2", "model.max_length=256", "train.log_every=1",
            "train.lr_schedule=constant", "train.warmup_ratio=0"]
    padded_cfg = load_config(TrainJobConfig, "tiny", [*base, "train.packing=false"])
    packed_cfg = load_config(TrainJobConfig, "tiny", [*base, "train.packing=true"])
    rows = _rows(padded_cfg)
    padded, padded_seen, padded_rows = _train(padded_cfg, rows)
    packed, packed_seen, packed_rows = _train(packed_cfg, rows)
    assert packed_seen == padded_seen  # the sampler's micro-batches, untouched by packing
    assert len(packed) == len(padded) == 2
    assert all(n == 4 for n in padded_rows) and sum(packed_rows) < sum(padded_rows)
    for a, b in zip(packed, padded, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * abs(b["grad_norm"])
        assert a["samples_per_s"] > 0 and a["padding_share"] < b["padding_share"]
