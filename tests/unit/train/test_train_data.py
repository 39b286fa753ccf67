"""Training data: every record becomes one tokenized row, and a row that cannot train is counted under its reason;
text-only records train beside image records, and ``max_length`` counts the image's positions."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vitune import IGNORE_INDEX
from vitune.data.tokenizer import load_tokenizer
from vitune.model.vlm import build_model
from vitune.train.data import (
    NO_FEATURES,
    TOKEN_DTYPE,
    DataStats,
    by_image_key,
    check_features,
    collate,
    interleave,
    text_only_rows,
    tokenize_records,
    training_row,
)

IN_STORE = {"a.png", "b.png", "long.png"}


def _record(rid: str, question: str, image: str | None = "a.png", reply: str = "A red square.") -> dict:
    rec = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]}
    return {**rec, "image": image} if image else rec


def _rows(tmp_path, lines: list[str], template: str = "vicuna_v1", max_length: int = 64, image_positions: int = 1):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = tokenize_records([str(path)], template, load_tokenizer("tiny"), max_length, image_positions)
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
    return _rows(tmp_path, [*lines, "{not json"], image_positions=4)  # 4 visual tokens per image (N)


def test_each_skipped_record_is_counted_under_its_own_reason(mixed):
    stats = DataStats.of(mixed)
    assert stats.skipped == {"no_trained_tokens": 1, NO_FEATURES: 1, "missing_id": 1, "invalid_json": 1}
    assert stats.samples == 3 and stats.text_only == 1 and stats.with_image == 2
    reasons = {r.id: r.skip for r in mixed}
    assert reasons["too-long"] == "no_trained_tokens" and reasons["no-features"] == NO_FEATURES
    assert reasons["ok-1"] is None and reasons["ok-2"] is None and reasons["text"] is None


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
    assert sum(summary["skipped"].values()) == summary["skipped_total"] == 4


def test_skips_become_one_mlflow_metric_per_reason(mixed):
    metrics = DataStats.of(mixed).metrics()
    assert metrics["skipped_no_features"] == 1 and metrics["skipped_no_trained_tokens"] == 1
    assert metrics["records_in"] == 7 and metrics["samples"] == 3 and metrics["skipped_total"] == 4
    assert metrics["samples_text_only"] == 1
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


def test_text_only_rows_train_apart_from_the_feature_join(mixed):
    assert all(row.image_keys for rows in by_image_key(mixed).values() for row in rows)  # the join: image rows only
    text = text_only_rows(mixed)
    assert len(text) == 1 and text[0]["features"] is None and text[0]["has_image"] is False
    assert text[0]["length"] == len(text[0]["input_ids"])  # no image positions


def test_a_batch_mixing_image_and_text_only_rows_trains_every_row(mixed):
    feats = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float16)  # [N, Dv]
    image_rows = [training_row(r, feats) for rows in by_image_key(mixed).values() for r in rows]
    rows = [image_rows[0], *text_only_rows(mixed), image_rows[1]]  # text-only in the middle of the batch
    batch = collate(rows, pad_token_id=0)
    assert batch["image_features"].shape == (2, 4, 8)  # [M, N, Dv]: only the rows with an image
    model = build_model(SimpleNamespace(lm="tiny", projector="mlp2x_gelu"), load_tokenizer("tiny"), 8)
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["image_features"])
    trained = sum(int((torch.from_numpy(r["labels"].astype(np.int64))[1:] != IGNORE_INDEX).sum()) for r in rows)
    assert out.num_label_tokens == trained  # every row's reply is a target, the text-only one included
    assert out.logits.shape[1] == max(r["length"] for r in rows)  # the image rows grew by N - 1 positions
    out.loss.backward()
    assert model.projector[0].weight.grad is not None


def test_max_length_counts_the_image_positions_and_the_cut_tokens_are_counted(tmp_path):
    reply = "A red square on a white ground. " * 4  # long enough that a cut leaves trained tokens
    lines = [json.dumps(_record("img", "<image>\nWhat shape is it?", reply=reply)),
             json.dumps(_record("txt", "What shape is it?", image=None, reply=reply))]
    free = DataStats.of(_rows(tmp_path, lines, max_length=256, image_positions=1))
    assert free.truncated == 0 and free.truncated_tokens == 0
    full = {r.id: r for r in _rows(tmp_path, lines, max_length=256, image_positions=1)}
    # 40 image positions leave 256 - 39 ids for the image record; the text-only one keeps its 256
    limit = len(full["img"].input_ids) + 39 - 5
    rows = {r.id: r for r in _rows(tmp_path, lines, max_length=limit, image_positions=40)}
    assert len(rows["img"].input_ids) == len(full["img"].input_ids) - 5 and rows["img"].cut == 5
    assert training_row(rows["img"], np.zeros((40, 8), np.float16))["length"] == limit  # the LM sees max_length
    assert rows["txt"].cut == 0 and not rows["txt"].truncated
    stats = DataStats.of(rows.values())
    assert (stats.truncated, stats.truncated_tokens) == (1, 5)
    assert stats.metrics()["truncated_tokens"] == 5


def test_an_image_longer_than_max_length_is_a_counted_skip(tmp_path):
    rows = _rows(tmp_path, [json.dumps(_record("img", "<image>\nWhat?"))], max_length=32, image_positions=40)
    assert DataStats.of(rows).skipped == {"image_truncated": 1}


def test_interleave_keeps_every_row_of_both_and_spreads_the_extra_ones():
    stream = [{"i": i} for i in range(200)]
    extra = [{"t": k} for k in range(50)]
    out = list(interleave(iter(stream), extra, len(stream), seed=3))
    assert [r for r in out if "i" in r] == stream  # the stream's own order is kept
    assert sorted(r["t"] for r in out if "t" in r) == list(range(50))
    positions = [n for n, r in enumerate(out) if "t" in r]
    assert positions[0] < 60 and positions[-1] > 190  # spread over the epoch, not bunched at one end
    # a stream shorter than announced still ends with every extra row
    assert len(list(interleave(iter(stream[:10]), extra, len(stream), seed=3))) == 60
