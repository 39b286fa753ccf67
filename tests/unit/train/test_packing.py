"""The packer: every sample once, no row over budget, FFD's order, and errors that name the sample."""

from __future__ import annotations

import random

import pytest

from vitune.train.packing import first_fit_decreasing, position_ids


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
