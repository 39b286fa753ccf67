"""Packing samples into rows up to a token budget: the packer, torch-free.

A packed row holds several whole samples back to back; a sample's length is its length after the visual-token
splice (text tokens plus every image's visual tokens), so the budget is what the language model sees. The
packer is first-fit-decreasing: samples longest first, each into the first row with room, a new row when none
has it. FFD uses at most 11/9·OPT + 1 rows, and on the length mixes LLaVA data has it is within a row of the
optimum; it needs the whole window in hand, which the length-grouped stream gives (train/sampler.py).

What a packed micro-batch holds is what it held padded: the sampler's (``train/sampler.py``: LLaVA's modality /
length megabatches, or random) micro-batch of ``train.micro_batch_size`` samples, laid out in fewer, fuller rows
(``balanced_rows``; ``train/data.py`` ``collate_packed``). So modality grouping, the step plan (micro-batches per
epoch), the loss normalisation (the mean over the micro-batch's label tokens) and a resumed run's micro-batch
index are unchanged, and the packed stream is a pure function of the seed and the row stream, as the padded one
is. Packing across micro-batches (a token budget per micro-batch, a varying sample count) would pack tighter but
make the step count data-dependent and differ between ranks.

A sample longer than the budget is an error naming it, not a silent truncation: the budget is a config value
and the caller decides (``train.model_max_length`` bounds samples already).

Pure Python on purpose: the GPU benchmark (benchmarks/gpu/) imports it with only torch and transformers there.
"""

from __future__ import annotations

from collections.abc import Sequence


def default_budget(max_length: int) -> int:
    """``train.packing_budget`` when unset: 1.5 × ``model.max_length`` positions a row.

    A budget of ``max_length`` itself cannot pair a sample near the cap with anything but a short one; twice it
    packs tightest but, under sdpa's masked attention, computes each row's full width² scores. Measured with
    ``benchmarks/train_step.py --packing`` (tiny models, CPU): 1.5× is the smallest that brings the anyres mix's
    padding under 5%, and its tokens/s still rise over padded rows (2× fell below them there). Flash-attention
    packs one row and ignores the budget.
    """
    return max_length * 3 // 2


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into rows whose totals are at most ``budget``.

    Rows come out in the order they were opened (the first holds the longest sample); within a row the
    indices keep the order they were placed in, longest first. Ties keep the input order, so the result is
    a pure function of its input.
    """
    if budget <= 0:
        raise ValueError(f"packing budget must be positive, got {budget}")
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing budget of {budget}")
        if n <= 0:
            raise ValueError(f"sample {i} has {n} tokens; a packed sample needs at least one")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def position_ids(lengths: Sequence[int]) -> list[int]:
    """Position ids of one packed row: ``0..n-1`` for each sample in turn (they restart at each boundary).

    transformers reads the restarts as sample boundaries when no 2-D attention mask is passed
    (masking_utils ``find_packed_sequence_indices``), and flash-attention derives ``cu_seqlens`` from them.
    """
    return [p for n in lengths for p in range(n)]



def balanced_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """The rows of a micro-batch's samples that compute the fewest positions: what ``collate_packed`` packs by.

    A packed micro-batch is a ``[rows, width]`` tensor whose width is its longest row, so it computes
    ``rows × longest`` positions. FFD minimises the row count but fills the first rows to the budget and
    leaves the last one short, which is padding; with one row more the rows may even out. So the candidates
    are FFD's rows and, for every row count from FFD's up to one sample a row, longest-processing-time's
    (each sample, longest first, to the row with the fewest tokens so far), kept when no row is over the
    budget; the fewest positions win, then the fewest rows. Deterministic; quadratic in the micro-batch size.
    """
    best = first_fit_decreasing(lengths, budget)
    best_cost = len(best) * max((sum(lengths[i] for i in row) for row in best), default=0)
    for count in range(len(best), len(lengths) + 1):
        rows: list[list[int]] = [[] for _ in range(count)]
        totals = [0] * count
        for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
            r = totals.index(min(totals))
            rows[r].append(i)
            totals[r] += lengths[i]
        if max(totals) <= budget and count * max(totals) < best_cost:
            best, best_cost = rows, count * max(totals)
    return best


def padding_share(lengths: Sequence[int], rows: Sequence[Sequence[int]]) -> float:
    """The share of a packed micro-batch's ``rows × longest row`` positions that hold no sample token."""
    totals = [sum(lengths[i] for i in row) for row in rows]
    return 1.0 - sum(totals) / max(len(totals) * max(totals, default=0), 1)
