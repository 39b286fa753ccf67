"""LLaVA-1.5's modality-grouped megabatch sampler: one modality per megabatch, longest first, balanced across
ranks, random megabatch order, and every index exactly once per epoch (global order and the per-rank stream)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vitune.train.data import TokenizedRow, training_row
from vitune.train.sampler import (
    even_chunks,
    grouped_micro_batches,
    in_order_micro_batches,
    modality_grouped_order,
    modality_megabatches,
    rank_micro_batches,
)

MICRO, RANKS = 4, 2


@pytest.fixture
def data() -> tuple[list[int], list[bool]]:
    rng = random.Random(7)
    has_image = [rng.random() < 0.7 for _ in range(203)]  # a 70 / 30 mix, counts that do not divide evenly
    lengths = [rng.randint(600, 900) if img else rng.randint(20, 700) for img in has_image]
    return lengths, has_image


def test_even_chunks_deals_longest_first_to_the_lightest_chunk():
    # by hand: 0(10)→A, 1(9)→B, 2(8)→B (9<10), 3(3)→A, 4(2)→A (13<17; A full: 0,3,4 = 15), 5(1)→B = 18
    assert even_chunks([0, 1, 2, 3, 4, 5], [10, 9, 8, 3, 2, 1], 2) == [[0, 3, 4], [1, 2, 5]]
    # a count that does not divide: dealt round-robin, as LLaVA's split_to_even_chunks
    assert even_chunks([0, 1, 2, 3, 4], [5, 4, 3, 2, 1], 2) == [[0, 2, 4], [1, 3]]


def test_every_index_once_per_epoch(data):
    lengths, has_image = data
    for seed in range(3):
        order = modality_grouped_order(lengths, has_image, MICRO, RANKS, seed)
        assert sorted(order) == list(range(len(lengths)))


def test_one_modality_per_megabatch_longest_first(data):
    lengths, has_image = data
    megabatches = modality_megabatches(lengths, has_image, MICRO, RANKS, random.Random(0))
    *full, leftover = megabatches
    assert all(len(mb) == MICRO * RANKS for mb in full)
    for mb in full:
        assert len({has_image[i] for i in mb}) == 1, "a full megabatch mixes modalities"
        for chunk in (mb[:MICRO], mb[MICRO:]):  # each rank's micro-batch: longest first
            assert [lengths[i] for i in chunk] == sorted((lengths[i] for i in chunk), reverse=True)
    # both modalities' short last megabatches end the epoch together, in index order (LLaVA's additional batch)
    assert leftover == sorted(leftover) and len(leftover) < 2 * MICRO * RANKS
    assert {has_image[i] for mb in full for i in mb} == {True, False}


def test_megabatches_come_in_random_order(data):
    lengths, has_image = data
    orders = {tuple(modality_grouped_order(lengths, has_image, MICRO, RANKS, seed)) for seed in range(4)}
    assert len(orders) == 4
    assert modality_grouped_order(lengths, has_image, MICRO, RANKS, 1) == \
        modality_grouped_order(lengths, has_image, MICRO, RANKS, 1)  # reproducible per seed
    # the modalities interleave at megabatch granularity instead of running one after the other
    kinds = [has_image[mb[0]] for mb in modality_megabatches(lengths, has_image, MICRO, RANKS, random.Random(2))[:-1]]
    assert sum(a != b for a, b in zip(kinds, kinds[1:], strict=False)) >= 5


def test_ranks_of_a_step_get_balanced_lengths_and_one_modality(data):
    lengths, has_image = data
    order = modality_grouped_order(lengths, has_image, MICRO, RANKS, seed=3)
    per_rank = [rank_micro_batches(order, MICRO, RANKS, r) for r in range(RANKS)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(order) // MICRO // RANKS
    n_full = len(modality_megabatches(lengths, has_image, MICRO, RANKS, random.Random(3))) - 1
    gaps, random_gaps = [], []
    shuffled = random.Random(0).sample(range(len(lengths)), len(lengths))
    for step in range(n_full):
        a, b = per_rank[0][step], per_rank[1][step]
        assert has_image[a[0]] == has_image[b[0]] and len({has_image[i] for i in a + b}) == 1
        gap = abs(sum(lengths[i] for i in a) - sum(lengths[i] for i in b))
        assert gap <= max(lengths[i] for i in a + b)  # the greedy deal's bound: at most one sample apart
        gaps.append(gap)
        ra, rb = shuffled[step * 8:step * 8 + 4], shuffled[step * 8 + 4:step * 8 + 8]
        random_gaps.append(abs(sum(lengths[i] for i in ra) - sum(lengths[i] for i in rb)))
    assert sum(gaps) < sum(random_gaps) / 3  # far better balanced than a random split


def test_rank_micro_batches_cover_the_order_once():
    order = list(range(37))
    batches = [rank_micro_batches(order, 4, 3, r) for r in range(3)]
    assert [len(b) for b in batches] == [3, 3, 3]  # 9 full micro-batches of 4, 3 per rank; 1 row dropped
    seen = [i for b in batches for mb in b for i in mb]
    assert sorted(seen) == list(range(36))


def test_one_modality_only_is_plain_length_grouping():
    lengths = list(range(1, 30))
    order = modality_grouped_order(lengths, [True] * 29, 2, 2, seed=0)
    assert sorted(order) == list(range(29))
    for start in range(0, 28, 4):  # each full megabatch of 4 is dealt from longest first
        mb = order[start:start + 4]
        assert lengths[mb[0]] == max(lengths[i] for i in mb)


def _rows(data):
    lengths, has_image = data
    return [{"id": i, "length": n, "has_image": img} for i, (n, img) in enumerate(zip(lengths, has_image, strict=True))]


def test_the_per_rank_stream_keeps_every_row_and_one_modality_per_step(data):
    rows = _rows(data)
    accum = 2  # micro-batches per optimizer step on this rank
    batches = list(grouped_micro_batches(iter(rows), MICRO, accum, seed=5, window=3))
    assert all(len(b) == MICRO for b in batches)
    seen = [r["id"] for b in batches for r in b]
    assert len(seen) == len(set(seen)) == len(rows) - len(rows) % MICRO  # all but a short tail, once each
    steps = [batches[k] + batches[k + 1] for k in range(0, len(batches) - 1, 2)]
    mixed = [s for s in steps if len({r["has_image"] for r in s}) > 1]
    assert len(mixed) <= 2  # only the epoch's leftover megabatch may mix (windows carry theirs forward)
    assert mixed == [] or steps.index(mixed[0]) >= len(steps) - 2


def test_the_random_sampler_keeps_the_arrival_order(data):
    rows = _rows(data)
    batches = list(in_order_micro_batches(iter(rows), MICRO))
    assert [r["id"] for b in batches for r in b] == list(range(len(rows) - len(rows) % MICRO))


def test_length_grouping_sorts_by_the_real_length_text_plus_visual_tokens():
    """A multi-image row with few token ids but many visual tokens is the long one of its megabatch."""
    def tokenized(rid: str, n_ids: int, counts: tuple[int, ...]) -> TokenizedRow:
        ids = np.arange(n_ids, dtype=np.int32)
        return TokenizedRow(rid, tuple(f"{rid}-{i}.png" for i in range(len(counts))), ids, ids, visual_tokens=counts)

    multi = tokenized("multi", 20, (300, 300))  # 20 ids, 618 positions
    single = tokenized("single", 200, (50,))  # 200 ids, 249 positions
    rows = [{**training_row(r, [np.zeros((n, 2)) for n in r.visual_tokens] if r.multi_image else
                            np.zeros((50, 2))), "id": r.id} for r in (single, multi)]
    assert [r["length"] for r in rows] == [249, 618]
    for seed in range(4):  # one megabatch of two micro-batches of one: longest (by real length) first
        batches = list(grouped_micro_batches(iter(rows), 1, 2, seed=seed))
        assert [b[0]["id"] for b in batches] == ["multi", "single"]
