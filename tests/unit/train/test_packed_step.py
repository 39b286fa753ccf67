"""Packed micro-batches train as padded ones do: the same loss and every gradient to float tolerance, and no
sample's logits move when another sample of its row changes (attention stops at the boundary). For the tiny
Llama and the tiny Qwen2 (GQA, q/k/v bias, tied embeddings), under sdpa and eager attention; the samples mix
one-image, two-image (images of different visual-token counts) and text-only records of varied lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitune.config import TrainJobConfig, load_config
from vitune.data.records import validate_record
from vitune.data.tokenizer import load_tokenizer
from vitune.model.vlm import build_model, packed_position_ids
from vitune.train.data import collate, collate_packed, tokenize_row, training_row
from vitune.train.packing import position_ids

N, DIM = 8, 16  # patches per tile, tower width
TILES = {"a.png": 1, "b.png": 3, "c.png": 2, "d.png": 1}  # tiles per image: 8, 24, 16, 8 visual tokens


def _records() -> list[dict]:
    out = []
    for i in range(7):
        if i % 3 == 2:  # text only
            conv = [{"from": "human", "value": f"What is {i} plus one?"},
                    {"from": "gpt", "value": f"It is {i + 1}. " * (1 + i)}]
            out.append({"id": f"t{i}", "conversations": conv})
            continue
        keys = sorted(TILES)
        image = [keys[i % 4], keys[(i + 1) % 4]] if i % 3 == 1 else keys[i % 4]
        prompt = "Compare <image> with <image>." if isinstance(image, list) else "<image>\nWhat is it?"
        out.append({"id": f"i{i}", "image": image, "conversations": [
            {"from": "human", "value": prompt}, {"from": "gpt", "value": "Noise and more noise. " * (1 + 2 * i)}]})
    return out


def _rows(tok, cfg: TrainJobConfig) -> list[dict]:
    rng = np.random.default_rng(0)
    feats = {k: rng.standard_normal((t, N, DIM)).astype(np.float32) for k, t in TILES.items()}
    rows = []
    for i, raw in enumerate(_records()):
        record = validate_record(raw, i)
        counts = {k: t * N for k, t in TILES.items()}
        sample = tokenize_row(record, cfg.model.template, tok, cfg.model.max_length, counts)
        assert sample.trainable, sample.skip
        images = [feats[k] for k in record.images] or None
        rows.append(training_row(sample, images))
    # one row trains on every token, its first included (a pretraining-style sample): packed, the token before
    # it is another sample's, which must not learn to predict it
    rows[2] = {**rows[2], "labels": rows[2]["input_ids"].copy()}
    return rows


def _setup(lm: str, attn: str):
    cfg = load_config(TrainJobConfig, "tiny", ["stage=finetune", f"model.lm={lm}"])
    tok = load_tokenizer(lm)
    model = build_model(cfg.model, tok, DIM).float()
    model.lm.set_attn_implementation(attn)
    return model, tok, _rows(tok, cfg)


def _run(model, batch: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                image_features=batch["image_features"], segment_ids=batch.get("segment_ids"))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lm", ["tiny", "tiny-qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_padded(lm: str, attn: str) -> None:
    model, tok, rows = _setup(lm, attn)
    lengths = [r["length"] for r in rows]
    budget = 2 * max(lengths)
    padded_out, padded_grads = _run(model, collate(rows, tok.pad_token_id))
    packed = collate_packed(rows, tok.pad_token_id, budget)
    assert packed["input_ids"].shape[0] < len(rows)  # it did pack
    assert packed["num_positions"] < len(rows) * max(lengths)
    packed_out, packed_grads = _run(model, packed)
    assert packed_out.num_label_tokens == padded_out.num_label_tokens
    torch.testing.assert_close(packed_out.loss, padded_out.loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("lm", ["tiny", "tiny-qwen2"])
def test_attention_stops_at_the_sample_boundary(lm: str) -> None:
    model, tok, rows = _setup(lm, "sdpa")
    picked = [rows[0], rows[1], rows[3]]  # one image, two images, one image: one row, back to back

    def logits_by_sample(batch_rows: list[dict]) -> list[torch.Tensor]:
        batch = collate_packed(batch_rows, tok.pad_token_id, sum(r["length"] for r in batch_rows), one_row=True)
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        image_features=batch["image_features"], segment_ids=batch["segment_ids"])
        assert out.logits.shape[0] == 1
        return [out.logits[0, out.segment_ids[0] == k] for k in range(len(batch_rows))]

    before = logits_by_sample(picked)
    # each packed sample's logits are its logits alone
    for row, packed in zip(picked, before, strict=True):
        alone = collate([row], tok.pad_token_id)
        with torch.no_grad():
            ref = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"],
                        image_features=alone["image_features"]).logits[0]
        torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
    # a different middle sample (other text, other image features, the same length): its neighbours do not move
    middle = dict(picked[1])
    ids = middle["input_ids"].copy()
    text = ids != model.image_token_id
    ids[text] = (ids[text] * 7 + 3) % (len(tok) - 1)
    ids[ids == model.image_token_id] = 5  # (a remapped text id that happened to hit the image token)
    ids[~text] = model.image_token_id
    middle["input_ids"] = ids
    middle["features"] = [f[::-1].copy() * -2 for f in middle["features"]]
    after = logits_by_sample([picked[0], middle, picked[2]])
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=1e-5)
    assert (after[1] - before[1]).abs().max() > 1e-2  # the change itself reached the logits


def test_positions_restart_at_each_sample_and_after_the_padding() -> None:
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [3, 3, 4, 4, 4, 4, 4, 4]])
    expected = [position_ids([3, 2, 1, 2]), position_ids([2, 6])]
    assert packed_position_ids(segments).tolist() == expected


def test_flash_attention_takes_packed_samples_in_one_row() -> None:
    # transformers reads packed boundaries from position ids for a batch of one row only (flash's cu_seqlens)
    model, tok, rows = _setup("tiny", "sdpa")
    batch = collate_packed(rows, tok.pad_token_id, 2 * max(r["length"] for r in rows))
    model.lm.config._attn_implementation = "flash_attention_2"  # the guard runs before any attention kernel
    with pytest.raises(ValueError, match="takes packed samples as one row"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              image_features=batch["image_features"], segment_ids=batch["segment_ids"])


def test_a_packing_budget_below_max_length_names_both_fields() -> None:
    with pytest.raises(ValueError, match=r"train.packing_budget=100 is below model.max_length=512"):
        load_config(TrainJobConfig, "tiny", ["model.max_length=512", "train.packing_budget=100"])
