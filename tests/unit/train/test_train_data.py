"""Training data: every record becomes one tokenized row, and a row that cannot train is counted under its reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitune import IGNORE_INDEX
from vitune.data.tokenizer import load_tokenizer
from vitune.train.data import (
    NO_FEATURES,
    TEXT_ONLY,
    TOKEN_DTYPE,
    DataStats,
    by_image_key,
    check_features,
    collate,
    tokenize_records,
    training_row,
)

IN_STORE = {"a.png", "b.png", "long.png"}


def _record(rid: str, question: str, image: str | None = "a.png", reply: str = "A red square.") -> dict:
    rec = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]}
    return {**rec, "image": image} if image else rec


def _rows(tmp_path, lines: list[str], template: str = "vicuna_v1", max_length: int = 64):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = tokenize_records([str(path)], template, load_tokenizer("tiny"), max_length)
    return check_features(rows, IN_STORE)


@pytest.fixture
def mixed(tmp_path):
    lines = [json.dumps(r) for r in (
        _record("ok-1", "<image>\nWhat shape is it?"),
        _record("ok-2", "What colour? <image>", image="b.png"),
        _record("too-long", "<image>\n" + "describe the picture in great detail " * 10, image="long.png"),
        _record("no-features", "<image>\nWhat is it?", image="missing.png"),
        _record("text", "What is a square?", image=None),
        {"conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},  # no id
    )]
    return _rows(tmp_path, [*lines, "{not json"])


def test_each_skipped_record_is_counted_under_its_own_reason(mixed):
    stats = DataStats.of(mixed)
    assert stats.skipped == {"no_trained_tokens": 1, NO_FEATURES: 1, TEXT_ONLY: 1, "missing_id": 1,
                             "invalid_json": 1}
    assert stats.samples == 2
    reasons = {r.id: r.skip for r in mixed}
    assert reasons["too-long"] == "no_trained_tokens" and reasons["no-features"] == NO_FEATURES
    assert reasons["ok-1"] is None and reasons["ok-2"] is None


def test_a_record_the_template_cannot_mask_is_counted_under_the_mask_kind(tmp_path):
    two_exchanges = _record("chat", "<image>\nQ1")
    two_exchanges["conversations"] += [{"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]
    rows = _rows(tmp_path, [json.dumps(_record("ok", "<image>\nWhat is it?")), json.dumps(two_exchanges)],
                 template="plain")
    stats = DataStats.of(rows)
    assert (stats.samples, dict(stats.skipped)) == (1, {"template_mismatch": 1})


def test_rows_in_equal_rows_trained_plus_rows_skipped(mixed):
    stats = DataStats.of(mixed)
    assert stats.records == len(mixed) == 7
    assert stats.records == stats.samples + stats.skipped_total
    summary = stats.as_dict()
    assert summary["records"] == summary["samples"] + summary["skipped_total"]
    assert sum(summary["skipped"].values()) == summary["skipped_total"] == 5


def test_skips_become_one_mlflow_metric_per_reason(mixed):
    metrics = DataStats.of(mixed).metrics()
    assert metrics["skipped_no_features"] == 1 and metrics["skipped_no_trained_tokens"] == 1
    assert metrics["records_in"] == 7 and metrics["samples"] == 2 and metrics["skipped_total"] == 5
    reasons = [k for k in metrics if k.startswith("skipped_") and k != "skipped_total"]
    assert sum(metrics[k] for k in reasons) == metrics["skipped_total"]


def test_only_trainable_rows_are_joined_and_tokens_are_int32(mixed):
    table = by_image_key(mixed)
    assert set(table) == {"a.png", "b.png"}
    row = table["a.png"][0]
    assert row.input_ids.dtype == TOKEN_DTYPE and row.labels.dtype == TOKEN_DTYPE
    assert len(row.input_ids) == len(row.labels) and (row.labels != IGNORE_INDEX).any()


def test_collate_pads_counts_real_and_padded_positions_and_widens_tokens_once(mixed):
    feats = np.ones((4, 8), dtype=np.float16)  # [N, Dv]
    a, b = by_image_key(mixed)["a.png"][0], by_image_key(mixed)["b.png"][0]
    rows = [training_row(a, feats), training_row(b, feats)]
    assert rows[0]["length"] == len(a.input_ids) + 3  # <image> becomes N positions
    batch = collate(rows, pad_token_id=0)
    width = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, width)
    assert batch["labels"].dtype == torch.long and batch["attention_mask"].sum() == len(a.input_ids) + len(b.input_ids)
    assert torch.equal(batch["input_ids"][0, :len(a.input_ids)], torch.from_numpy(a.input_ids.astype(np.int64)))
    assert batch["num_tokens"] == rows[0]["length"] + rows[1]["length"]
    assert batch["num_positions"] == 2 * max(r["length"] for r in rows) >= batch["num_tokens"]
    assert batch["image_features"].shape == (2, 4, 8) and batch["image_features"].dtype == torch.float16
