"""Training data: every record becomes one tokenized row, and a row that cannot train is counted under its reason;
text-only records train beside image records, ``max_length`` counts each image's own visual tokens, and a record
with several images joins and collates one feature array per image, in ``<image>`` order."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vitune import IGNORE_INDEX, storage
from vitune.data.tokenizer import load_tokenizer
from vitune.features.store import FeatureStore, shard_name, shard_table, write_manifest, write_shard
from vitune.model.vlm import build_model
from vitune.train.data import (
    NO_FEATURES,
    TOKEN_DTYPE,
    VISUAL_TOKEN_BUDGET,
    DataStats,
    by_image_key,
    check_features,
    collate,
    image_features_to,
    interleave,
    multi_image_keys,
    multi_image_rows,
    side_rows,
    text_only_rows,
    tokenize_records,
    training_row,
)

IN_STORE = {"a.png", "b.png", "long.png"}


def _record(rid: str, question: str, image: str | None = "a.png", reply: str = "A red square.") -> dict:
    rec = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]}
    return {**rec, "image": image} if image else rec


def _rows(tmp_path, lines: list[str], template: str = "vicuna_v1", max_length: int = 64,
          image_positions: int | dict[str, int] = 1, max_visual_tokens: int | None = None):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = tokenize_records([str(path)], template, load_tokenizer("tiny"), max_length, image_positions,
                            max_visual_tokens)
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


# --- several images per record (LLaVA-NeXT-Interleave) ---------------------------------------------------------

COUNTS = {"a.png": 4, "b.png": 6, "long.png": 30}  # each image's own visual tokens (as anyres sizes give)


def _multi(rid: str, images: list[str], question: str = "Compare <image> with <image>.", **kw) -> dict:
    return _record(rid, question, image=images, **kw)  # type: ignore[arg-type]


def test_a_multi_image_row_keeps_its_images_in_order_and_counts_each_ones_tokens(tmp_path):
    rows = {r.id: r for r in _rows(tmp_path, [json.dumps(_multi("two", ["b.png", "a.png"])),
                                              json.dumps(_record("one", "<image>\nWhat?", image="a.png"))],
                                   image_positions=COUNTS)}
    two = rows["two"]
    assert two.trainable and two.image_keys == ("b.png", "a.png") and two.visual_tokens == (6, 4)
    assert two.length == len(two.input_ids) - 2 + 10  # both <image> ids become their own counts
    assert rows["one"].visual_tokens == (4,) and rows["one"].length == len(rows["one"].input_ids) + 3
    assert training_row(two, [np.zeros((6, 8)), np.zeros((4, 8))])["length"] == two.length
    with pytest.raises(ValueError, match="'two' has 2 image"):
        training_row(two, np.zeros((6, 8)))  # one array for a two-image row


def test_max_length_is_checked_after_expanding_each_image_to_its_own_count(tmp_path):
    reply = "A red square on a white ground. " * 4
    line = json.dumps(_multi("two", ["a.png", "long.png"], reply=reply))
    (full,) = _rows(tmp_path, [line], max_length=512, image_positions=COUNTS)
    assert full.trainable and full.cut == 0
    limit = full.length - 5  # five positions short once both images are expanded (4 + 30)
    (cut,) = _rows(tmp_path, [line], max_length=limit, image_positions=COUNTS)
    assert cut.trainable and cut.cut == 5 and cut.length == limit
    assert len(cut.input_ids) == len(full.input_ids) - 5
    # the same ids with one position per image would fit: the limit is the expanded length, not the ids
    (flat,) = _rows(tmp_path, [line], max_length=limit, image_positions=1)
    assert flat.cut == 0
    (none,) = _rows(tmp_path, [line], max_length=30, image_positions=COUNTS)  # 34 visual tokens alone
    assert none.skip == "image_truncated"


def test_a_record_over_the_visual_token_budget_is_a_counted_skip(tmp_path):
    lines = [json.dumps(_multi("two", ["a.png", "long.png"])),  # 4 + 30 = 34 visual tokens
             json.dumps(_record("one", "<image>\nWhat?", image="long.png")),  # 30
             json.dumps(_record("text", "What is a square?", image=None))]
    rows = {r.id: r for r in _rows(tmp_path, lines, max_length=256, image_positions=COUNTS, max_visual_tokens=32)}
    assert rows["two"].skip == VISUAL_TOKEN_BUDGET and rows["one"].trainable and rows["text"].trainable
    stats = DataStats.of(rows.values())
    assert stats.skipped == {VISUAL_TOKEN_BUDGET: 1} and stats.metrics()["skipped_visual_token_budget"] == 1
    free = DataStats.of(_rows(tmp_path, lines, max_length=256, image_positions=COUNTS))  # None = no budget
    assert free.skipped_total == 0 and free.multi_image == 1


def test_multi_image_rows_are_joined_apart_and_travel_with_the_text_only_rows(tmp_path):
    lines = [json.dumps(_multi("two", ["b.png", "a.png"])), json.dumps(_record("one", "<image>\nQ?")),
             json.dumps(_multi("gone", ["a.png", "missing.png"])), json.dumps(_record("text", "Q?", image=None))]
    rows = _rows(tmp_path, lines, image_positions=COUNTS)
    assert {r.id: r.skip for r in rows}["gone"] == NO_FEATURES  # one missing image is enough
    assert [r.id for rs in by_image_key(rows).values() for r in rs] == ["one"]  # the streaming join: one image
    assert multi_image_keys(rows) == {"a.png", "b.png"}
    feats = {k: np.full((n, 8), i, np.float16) for i, (k, n) in enumerate(COUNTS.items())}
    (two,) = multi_image_rows(rows, feats)
    assert [f[0, 0] for f in two["features"]] == [1, 0]  # b.png then a.png: the <image> order
    assert two["has_image"] and two["length"] == len(two["input_ids"]) + 8
    stats = DataStats.of(rows)
    assert (stats.single_image, stats.multi_image, stats.text_only, stats.side) == (1, 1, 1, 2)
    assert len(side_rows(rows, lambda keys: {k: feats[k] for k in keys})) == stats.side
    with pytest.raises(ValueError, match="'two'.*b.png"):
        multi_image_rows(rows, {"a.png": feats["a.png"]})


def _batch_rows(tmp_path, shapes: dict[str, tuple[int, ...]]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Rows of one batch: a two-image row, a text-only row, a one-image row; features of the given shapes."""
    counts = {k: int(np.prod(shape[:-1])) for k, shape in shapes.items()}  # tiles x N visual tokens each
    lines = [json.dumps(_multi("two", ["b.png", "a.png"])), json.dumps(_record("one", "What? <image>")),
             json.dumps(_record("text", "What is a square?", image=None))]
    rows = _rows(tmp_path, lines, image_positions=counts)
    rng = np.random.default_rng(0)
    feats = {k: rng.standard_normal(shape).astype(np.float16) for k, shape in shapes.items()}
    one = [training_row(r, feats[r.image_keys[0]]) for rs in by_image_key(rows).values() for r in rs]
    two = multi_image_rows(rows, feats)
    return [two[0], *text_only_rows(rows), one[0]], feats


@pytest.mark.parametrize("shapes", [{"a.png": (4, 8), "b.png": (4, 8)}, {"a.png": (1, 4, 8), "b.png": (2, 4, 8)}],
                         ids=["pad", "tiles"])
def test_multi_image_collate_feeds_the_model_in_reading_order(tmp_path, shapes):
    rows, feats = _batch_rows(tmp_path, shapes)
    batch = collate(rows, pad_token_id=0)
    images = batch["image_features"]
    expected = [feats["b.png"], feats["a.png"], feats["a.png"]]  # row 0's two images, then row 2's one
    if len(shapes["a.png"]) == 2:
        assert isinstance(images, torch.Tensor) and images.shape == (3, 4, 8)  # [M, N, Dv]: the pad form
    else:
        assert isinstance(images, list) and [tuple(t.shape) for t in images] == [(2, 4, 8), (1, 4, 8), (1, 4, 8)]
    for got, want in zip(images, expected, strict=True):
        assert torch.equal(got, torch.from_numpy(want))
    assert image_features_to(images, "cpu") is not None and image_features_to(None, "cpu") is None

    n_a, n_b = (int(np.prod(shapes[k][:-1])) for k in ("a.png", "b.png"))
    model = build_model(SimpleNamespace(lm="tiny", projector="mlp2x_gelu"), load_tokenizer("tiny"), 8)
    spliced = model.splice(batch["input_ids"], batch["attention_mask"], images, labels=batch["labels"])
    assert spliced.image_mask.sum(dim=1).tolist() == [n_b + n_a, 0, n_a]
    assert (spliced.labels[spliced.image_mask] == IGNORE_INDEX).all()  # no loss on image positions
    # the first row's image positions hold b.png's projected features, then a.png's: reading order
    first = spliced.inputs_embeds[0][spliced.image_mask[0]]
    flat = np.concatenate([feats["b.png"].reshape(-1, 8), feats["a.png"].reshape(-1, 8)])
    projected = model.project(torch.from_numpy(flat))
    assert torch.allclose(first, projected.to(first.dtype), atol=1e-5)
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], images)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[1] == max(r["length"] for r in rows)  # the real (expanded) length
    assert batch["num_tokens"] == sum(r["length"] for r in rows)
    out.loss.backward()
    assert model.projector[0].weight.grad is not None


def test_the_driver_data_path_joins_a_row_whose_images_sit_in_different_shards(tmp_path):
    """What ``run_training`` does before Ray: counts from the store, ``check_features``, ``side_rows(store.get)``."""
    n, d = 4, 8
    fp = {"tower": "t", "pretrained": None, "feature_layer": -2, "select": "patch", "image_size": 16,
          "image_mode": "pad", "patch_size": 8, "num_patches": n, "hidden_size": d}
    shards = [["a.png", "b.png"], ["c.png"]]
    feats = {k: np.full((n, d), i, np.float16) for i, k in enumerate(["a.png", "b.png", "c.png"])}
    out = str(tmp_path / "store")
    for i, keys in enumerate(shards):
        table = shard_table(keys, np.stack([feats[k] for k in keys]), {"shard": i, "quarantined": 0})
        write_shard(storage.join(out, shard_name(i)), table)
    write_manifest(out, shards, fp, (n, d))
    store = FeatureStore.open(out)
    assert store.visual_tokens() == {"a.png": n, "b.png": n, "c.png": n}
    lines = [json.dumps(_multi("two", ["c.png", "a.png"])), json.dumps(_record("text", "Q?", image=None)),
             json.dumps(_multi("gone", ["c.png", "zz.png"]))]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = tokenize_records([str(path)], "vicuna_v1", load_tokenizer("tiny"), 64, store.visual_tokens())
    rows = check_features(rows, set(store.keys()))
    assert [r.skip for r in rows] == [None, None, NO_FEATURES]
    side = side_rows(rows, store.get)
    assert [r["has_image"] for r in side] == [False, True]
    np.testing.assert_array_equal(np.stack(side[1]["features"]), np.stack([feats["c.png"], feats["a.png"]]))
    assert side[1]["length"] == len(side[1]["input_ids"]) + 2 * (n - 1)


def test_the_visual_token_budget_is_a_train_config_field_off_by_default():
    from vitune.config import TrainJobConfig, load_config

    assert load_config(TrainJobConfig, "tiny").train.max_visual_tokens is None
    assert load_config(TrainJobConfig, "tiny", ["train.max_visual_tokens=2880"]).train.max_visual_tokens == 2880
    with pytest.raises(ValueError, match="max_visual_tokens"):
        load_config(TrainJobConfig, "tiny", ["train.max_visual_tokens=0"])


def test_masks_want_one_visual_token_count_per_image():
    from vitune.data.masks import MaskError, tokenize_record
    from vitune.data.records import validate_record

    record = validate_record(_multi("two", ["a.png", "b.png"]))
    tok = load_tokenizer("tiny")
    with pytest.raises(MaskError, match="'two': 1 visual-token counts given for 2 <image> tokens") as info:
        tokenize_record(record, "vicuna_v1", tok, 64, visual_tokens=[4])
    assert info.value.kind == "image_token_count"
    sample = tokenize_record(record, "vicuna_v1", tok, 64, visual_tokens=[4, 6])
    assert sample.visual_tokens == (4, 6) and sample.length == len(sample.input_ids) + 8
