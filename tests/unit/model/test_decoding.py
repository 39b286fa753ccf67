"""The one decode loop (`vitune.model.decoding`): greedy parity with transformers, batches equal to single
prompts, rows joining and leaving mid-decode, stop tokens, and sampling (seeded, grouped per row)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from tests.unit.model.test_vlm import DV, N, peaky_model
from vitune.data.tokenizer import load_tokenizer
from vitune.model.decoding import DecodeBatch, DecodeRow, sample_next, sample_with_uniforms, seeded_generator
from vitune.model.vlm import VisionLanguageModel


@pytest.fixture(scope="module")
def model() -> VisionLanguageModel:
    return peaky_model(load_tokenizer("tiny"))


def _features(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, N, DV, generator=torch.Generator().manual_seed(seed))


def _drain(batch: DecodeBatch, joining: dict[int, Sequence[DecodeRow]] | None = None) -> dict[object, list[int]]:
    """Run `batch` until every row is done, as the serving engine does (rows in `joining[k]` join before step k,
    finished rows leave at once); each row's tokens by payload."""
    joining = dict(joining or {})
    out: dict[object, list[int]] = {row.payload: [] for row in batch.rows}
    step = 0
    while batch.rows or joining:
        newcomers = joining.pop(step, ())
        batch.join(newcomers)
        out.update({row.payload: [] for row in newcomers})
        if batch.rows:
            for row, token in zip(batch.rows, batch.sample().tolist(), strict=True):
                out[row.payload] += row.accept(token, ())
            batch.keep([i for i, row in enumerate(batch.rows) if row.finish_reason is None])
            if batch.rows:
                assert bool(batch.mask[:, 0].any()), "a leading cache column only padding uses was kept"
                batch.step()
        step += 1
    return out


def test_greedy_matches_hf_generate_text_only(model: VisionLanguageModel) -> None:
    prompt = [1, 300, 301, 302]
    ours = model.generate([prompt], max_new_tokens=12, stop_token_ids=())
    with torch.no_grad():
        hf = model.lm.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, 4, dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model.pad_token_id,
        )
    assert ours == [hf[0, len(prompt) :].tolist()]


def test_batched_generation_equals_one_by_one(model: VisionLanguageModel) -> None:
    img = model.image_token_id
    prompts = [[1, 300, img, 301], [1, 310, 311, 312, 313, 314, 315], [1, img, 320], [1, 2]]
    feats = _features(2, seed=3)
    image_features = [feats[0], None, feats[1], None]
    batched = model.generate(prompts, image_features, max_new_tokens=10, stop_token_ids=())
    singles = [
        model.generate([p], [f], max_new_tokens=10, stop_token_ids=())[0]
        for p, f in zip(prompts, image_features, strict=True)
    ]
    assert batched == singles
    assert all(len(seq) == 10 for seq in batched)
    assert batched[0] != model.generate([prompts[0]], [torch.zeros(N, DV)], max_new_tokens=10, stop_token_ids=())[0]


def test_rows_joining_and_leaving_mid_decode_match_decoding_alone(model: VisionLanguageModel) -> None:
    img = model.image_token_id
    feats = _features(3, seed=5)
    specs = {  # payload: (prompt, features, max_new_tokens)
        "a": ([1, 300, img, 301], feats[0], 12),
        "b": ([1, 310, 311, 312, 313, 314, 315, 316, 317, 318], None, 3),  # the longest prompt leaves first
        "c": ([1, img, 320], feats[1], 8),
        "d": ([1, 2], None, 6),
        "e": ([1, 330, 331, img], feats[2], 5),
    }
    alone = {k: model.generate([p], [f], max_new_tokens=n, stop_token_ids=())[0] for k, (p, f, n) in specs.items()}
    rows = {k: DecodeRow(p, f, n, payload=k) for k, (p, f, n) in specs.items()}
    batch = DecodeBatch(model)
    batch.join([rows["a"], rows["b"]])
    got = _drain(batch, {2: [rows["c"]], 4: [rows["d"], rows["e"]]})  # b leaves after step 2, c joins before
    assert got == alone
    assert [len(got[k]) for k in "abcde"] == [12, 3, 8, 6, 5]
    assert not batch.rows and batch.mask is None


def test_stop_tokens_end_a_sequence_and_are_not_emitted(model: VisionLanguageModel) -> None:
    prompts = [[1, 300, 301], [1, 400]]
    free = model.generate(prompts, max_new_tokens=8, stop_token_ids=())
    stop = free[0][3]
    stopped = model.generate(prompts, max_new_tokens=8, stop_token_ids=(stop,))
    first = free[0].index(stop)
    assert stopped[0] == free[0][:first]
    cut = free[1].index(stop) if stop in free[1] else len(free[1])
    assert stopped[1] == free[1][:cut]
    steps = list(model.generate_stream(prompts, max_new_tokens=8, stop_token_ids=(stop,)))
    assert steps[first].finish_reasons[0] == "stop" and steps[first].tokens[0] == []
    assert all(step.tokens[0] == [] for step in steps[first:])
    assert [sum((s.tokens[i] for s in steps), []) for i in range(2)] == stopped


def test_stream_reports_length_and_stops_when_all_done(model: VisionLanguageModel) -> None:
    steps = list(model.generate_stream([[1, 300]], max_new_tokens=3, stop_token_ids=()))
    assert len(steps) == 3
    assert [s.finish_reasons[0] for s in steps] == [None, None, "length"]
    assert model.generate([[1, 300]], max_new_tokens=0) == [[]]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model: VisionLanguageModel) -> None:
    prompts = [[1, 300, 301], [1, 310]]
    kwargs = dict(max_new_tokens=8, temperature=1.0, stop_token_ids=())
    a = model.generate(prompts, seed=7, **kwargs)
    assert a == model.generate(prompts, seed=7, **kwargs)
    assert a != model.generate(prompts, seed=8, **kwargs)
    greedy = model.generate(prompts, max_new_tokens=8, stop_token_ids=())
    assert model.generate(prompts, seed=1, top_p=1e-6, **kwargs) == greedy


def test_rows_sample_by_their_own_settings_and_generator(model: VisionLanguageModel) -> None:
    """A seeded row draws the same tokens whoever shares its batch; greedy rows stay greedy beside sampled ones."""
    seeded = [1, 300, 301]

    def seeded_row() -> DecodeRow:
        return DecodeRow(seeded, max_new_tokens=10, temperature=1.0, generator=seeded_generator(11),
                         payload="seeded")

    alone = _drain(_joined(model, [seeded_row()]))["seeded"]
    mixed = _drain(_joined(model, [
        DecodeRow([1, 400, 401, 402], max_new_tokens=10, payload="greedy"),
        DecodeRow([1, 310], max_new_tokens=10, temperature=1.0, payload="shared"),  # draws from the batch's generator
        seeded_row(),
        DecodeRow([1, 320, 321], max_new_tokens=10, temperature=0.7, top_p=0.9, payload="nucleus"),
    ]))
    assert mixed["seeded"] == alone
    assert mixed["greedy"] == model.generate([[1, 400, 401, 402]], max_new_tokens=10, stop_token_ids=())[0]
    unseeded = DecodeRow(seeded, max_new_tokens=10, temperature=1.0, payload="other")  # the batch's generator
    assert alone != _drain(_joined(model, [unseeded]))["other"]


def _joined(model: VisionLanguageModel, rows: list[DecodeRow]) -> DecodeBatch:
    batch = DecodeBatch(model, seeded_generator(0))
    batch.join(rows)
    return batch


def test_sample_next_greedy_and_nucleus() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    gen = seeded_generator(0)
    assert sample_next(logits, 0.0, 1.0, gen).tolist() == [1, 0]
    # top_p just above the top token's mass keeps two tokens: index 1 and 3 only, never 0 or 2
    draws = {tuple(sample_next(logits[:1], 1.0, 0.5, gen).tolist()) for _ in range(200)}
    assert draws == {(1,), (3,)}


def test_inverse_cdf_sampling_follows_the_distribution() -> None:
    """Frequencies over 20,000 draws match softmax(logits / T) within 0.015, top_p's kept tokens renormalised."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = (probs.log() * 0.7).repeat(20_000, 1)  # at temperature 0.7: softmax(logits / 0.7) = probs
    gen = seeded_generator(3)
    counts = torch.bincount(sample_next(logits, 0.7, 1.0, gen), minlength=4) / 20_000
    assert torch.allclose(counts, probs, atol=0.015), counts
    # top_p 0.75: 0.5 + 0.3 reach it, so only the first two stay, at 0.5/0.8 and 0.3/0.8
    counts = torch.bincount(sample_next(logits, 0.7, 0.75, gen), minlength=4) / 20_000
    assert torch.allclose(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015), counts
    # the edges of [0, 1): the first kept token and the last kept one, never a dropped one
    edges = torch.tensor([0.0, 1.0 - 2**-24])
    assert sample_with_uniforms(logits[:2], 0.7, 1.0, edges).tolist() == [0, 3]
    assert sample_with_uniforms(logits[:2], 0.7, 0.75, edges).tolist() == [0, 1]


def test_rows_are_checked(model: VisionLanguageModel) -> None:
    with pytest.raises(ValueError, match="prompt 0 holds 1 <image> tokens but 0 images' features"):
        model.generate([[1, model.image_token_id]], [None], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    batch = _joined(model, [DecodeRow([1, 300], max_new_tokens=2)])
    with pytest.raises(RuntimeError, match="sample"):
        batch.step()
