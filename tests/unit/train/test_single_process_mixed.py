"""The single-process training path (no Ray: ``benchmarks/train_step.py``'s harness over ``vitune.train.worker``)
trains every record of a mixed dataset, one-image, two-image and text-only, with LLaVA-1.5's modality-grouped
sampler on."""

from __future__ import annotations

import json

import numpy as np

from tests.unit.train.worker_runs import run_worker
from vitune.config import TrainJobConfig, load_config
from vitune.data.records import read_records
from vitune.data.tokenizer import load_tokenizer
from vitune.train.data import DataStats, tokenize_row, training_row
from vitune.train.worker import Worker

N_PATCHES, DIM = 16, 32


def _records(path) -> None:
    recs = [{"id": f"img-{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red square. " * (1 + i % 5)}]}
        for i in range(24)]
    for rec in recs[::3]:  # every third image record holds two images (LLaVA-NeXT-Interleave's form)
        rec["image"] = [rec["image"], "second-" + rec["image"]]
        rec["conversations"][0]["value"] = "Compare <image> with <image>."
    recs += [{"id": f"txt-{i}", "conversations": [
        {"from": "human", "value": f"What is {i} plus one?"},
        {"from": "gpt", "value": f"It is {i + 1}. " * (1 + i % 3)}]} for i in range(16)]
    path.write_text(json.dumps(recs))


def test_every_record_of_a_mixed_dataset_trains_in_one_process(tmp_path):
    _records(tmp_path / "records.json")
    cfg = load_config(TrainJobConfig, "tiny", [
        "stage=finetune", f"storage.root={tmp_path}", "train.num_workers=1", "train.init_from=null", "train.epochs=2",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.checkpoint_every=1000", "train.log_every=1",
        "train.group_by_modality_length=true"])
    tok = load_tokenizer("tiny")
    feats = np.random.default_rng(0).standard_normal((N_PATCHES, DIM)).astype(np.float16)
    samples, rows = [], []
    for r in read_records(str(tmp_path / "records.json")):
        sample = tokenize_row(r, cfg.model.template, tok, cfg.model.max_length, N_PATCHES)
        samples.append(sample)
        # the two-image rows carry per-image tiles [1, N, D]: collate then passes a list, one tensor per image
        image = [feats[None], feats[None]] if len(r.images) == 2 else feats if r.images else None
        rows.append({**training_row(sample, image), "id": r.id})
    stats = DataStats.of(samples).as_dict()
    assert stats["text_only"] == 16 and stats["multi_image"] == 8

    seen: list[list[str]] = []

    class Recording(Worker):
        def collate(self, batch_rows: list[dict]) -> dict:
            seen.append([r["id"] for r in batch_rows])
            return super().collate(batch_rows)

    run = run_worker(cfg, rows, DIM, Recording)
    final, metrics = run.final, run.metrics
    assert final["step"] == len(metrics) == 2 * 40 // 8  # 2 epochs of 40 records, 8 per step
    per_epoch = [sorted(i for batch in seen[k * 10:(k + 1) * 10] for i in batch) for k in range(2)]
    assert per_epoch[0] == per_epoch[1] == sorted(r["id"] for r in rows)  # every record, once per epoch
    steps = [seen[k] + seen[k + 1] for k in range(0, len(seen), 2)]
    one_modality = [len({i.split("-")[0] for i in step}) == 1 for step in steps]
    # per epoch 24 image + 16 text rows = 3 + 2 megabatches of 8; as in LLaVA, each modality's last one joins
    # the epoch's final "additional" batch (index order), so the first 3 steps hold one modality each
    assert one_modality[0:3] == one_modality[5:8] == [True, True, True], steps
    assert [sum(i.startswith("img") for i in s) for s in steps[:3]].count(8) == 2  # 2 image steps, 1 text step
    assert all(np.isfinite(m["loss"]) for m in metrics)
