"""The packer: every sample once, no row over budget, FFD's order, and errors that name the sample."""

from __future__ import annotations

import random

import pytest

from vitune.train.packing import balanced_rows, first_fit_decreasing, padding_share, position_ids


def test_every_sample_once_within_budget() -> None:
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 60))]
        rows = first_fit_decreasing(lengths, 128)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
        # first fit leaves at most one row half empty or worse (two such rows would have merged)
        assert sum(sum(lengths[i] for i in row) <= 64 for row in rows) <= 1


def test_longest_first_and_fills_gaps() -> None:
    assert first_fit_decreasing([3, 7, 5, 5], 10) == [[1, 0], [2, 3]]


def test_over_budget_names_the_sample() -> None:
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        first_fit_decreasing([3, 11], 10)


def test_position_ids_restart_per_sample() -> None:
    assert position_ids([2, 3]) == [0, 1, 0, 1, 2]


def test_balanced_rows_compute_no_more_positions_than_ffd_or_padding() -> None:
    rng = random.Random(1)
    for _ in range(50):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 16))]
        rows = balanced_rows(lengths, 128)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        totals = [sum(lengths[i] for i in row) for row in rows]
        ffd = [sum(lengths[i] for i in row) for row in first_fit_decreasing(lengths, 128)]
        assert max(totals) <= 128
        assert len(rows) * max(totals) <= min(len(ffd) * max(ffd), len(lengths) * max(lengths))


def test_balanced_rows_even_out_what_ffd_leaves_short() -> None:
    # FFD fills [100, 28] and leaves [64] short: 2 rows × 128 positions; [100] and [64, 28] take 2 × 100
    lengths = [100, 64, 28]
    assert first_fit_decreasing(lengths, 128) == [[0, 2], [1]]
    assert balanced_rows(lengths, 128) == [[0], [1, 2]]
    assert padding_share(lengths, [[0], [1, 2]]) == 1 - 192 / 200
