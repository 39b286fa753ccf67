"""Modality-grouped, length-grouped sample order: LLaVA-1.5's ``group_by_modality_length`` megabatches.

The algorithm of LLaVA's ``LengthGroupedSampler(group_by_modality=True)`` (``llava/train/llava_trainer.py``),
written from its description:

- the samples are split by modality (with an image / text only); each modality is shuffled and cut into
  *megabatches* of ``micro_batch_size × chunks`` samples, where ``chunks`` is the number of micro-batches one
  optimizer step takes across the cluster (ranks × gradient-accumulation steps);
- within a megabatch the samples are sorted longest first and dealt into ``chunks`` micro-batches of equal
  size and near-equal total length (each sample to the micro-batch with the least length so far);
- the full megabatches of both modalities are shuffled together; each modality's last megabatch goes last,
  merged into one (in index order), as LLaVA appends its ``additional_batch``.

The flat order is then dealt to ranks micro-batch by micro-batch (micro-batch ``j`` of the order goes to
rank ``j % ranks``, as the Trainer's distributed loader does), so every optimizer step sees one modality and
the ranks of a step get micro-batches of similar total length. Every index appears once per epoch.

``grouped_micro_batches`` applies the same algorithm to one rank's stream of training rows, over a window of
``WINDOW_MEGABATCHES`` megabatches (the feature store streams rows; no rank holds the whole epoch), carrying
each window's unfinished megabatches into the next so only the epoch's last one mixes modalities.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence

WINDOW_MEGABATCHES = 16  # per-rank buffer of the streaming path, in megabatches


def even_chunks(indices: Sequence[int], lengths: Sequence[int], chunks: int) -> list[list[int]]:
    """``indices`` (longest first) dealt into ``chunks`` equal-size lists of near-equal total length.

    Each index goes to the list with the smallest total so far; a full list takes no more. When the count
    does not divide evenly the indices are dealt round-robin instead (LLaVA's fallback).
    """
    if len(indices) % chunks:
        return [list(indices[i::chunks]) for i in range(chunks)]
    per_chunk = len(indices) // chunks
    out: list[list[int]] = [[] for _ in range(chunks)]
    totals = [0.0] * chunks
    for index in indices:
        target = totals.index(min(totals))
        out[target].append(index)
        totals[target] += lengths[index]
        if len(out[target]) == per_chunk:
            totals[target] = float("inf")
    return out


def _length_grouped(indices: list[int], lengths: Sequence[int], size: int, chunks: int,
                    rng: random.Random) -> list[list[int]]:
    """``indices`` shuffled, cut into megabatches of ``size``, each sorted longest first and dealt into chunks."""
    order = list(indices)
    rng.shuffle(order)
    megabatches = []
    for start in range(0, len(order), size):
        longest_first = sorted(order[start:start + size], key=lambda i: lengths[i], reverse=True)
        megabatches.append([i for chunk in even_chunks(longest_first, lengths, chunks) for i in chunk])
    return megabatches


def modality_megabatches(lengths: Sequence[int], has_image: Sequence[bool], micro_batch_size: int, chunks: int,
                         rng: random.Random) -> list[list[int]]:
    """The epoch's megabatches in order: full one-modality megabatches shuffled, then the leftovers.

    With one modality only, its megabatches keep the order they were cut in (the last may be short).
    """
    if len(lengths) != len(has_image):
        raise ValueError(f"{len(lengths)} lengths but {len(has_image)} modality flags")
    size = micro_batch_size * chunks
    image = [i for i, flag in enumerate(has_image) if flag]
    text = [i for i, flag in enumerate(has_image) if not flag]
    if not image or not text:
        return _length_grouped(image or text, lengths, size, chunks, rng)
    image_mbs = _length_grouped(image, lengths, size, chunks, rng)
    text_mbs = _length_grouped(text, lengths, size, chunks, rng)
    leftover = sorted(image_mbs.pop() + text_mbs.pop())
    full = image_mbs + text_mbs
    rng.shuffle(full)
    return full + [leftover]


def modality_grouped_order(lengths: Sequence[int], has_image: Sequence[bool], micro_batch_size: int, chunks: int,
                           seed: int) -> list[int]:
    """Every index once, in ``modality_megabatches`` order (one epoch of LLaVA's sampler, seeded)."""
    rng = random.Random(seed)
    return [i for mb in modality_megabatches(lengths, has_image, micro_batch_size, chunks, rng) for i in mb]


def rank_micro_batches(order: Sequence[int], micro_batch_size: int, ranks: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a global ``order``: micro-batch ``j`` goes to rank ``j % ranks``.

    Every rank gets the same number; the tail that cannot give each rank a full micro-batch is dropped
    (as a distributed loader drops an uneven last batch).
    """
    batches = [list(order[i:i + micro_batch_size])
               for i in range(0, len(order) - micro_batch_size + 1, micro_batch_size)]
    per_rank = len(batches) // ranks
    return batches[rank::ranks][:per_rank]


def grouped_micro_batches(rows: Iterable[dict], micro_batch_size: int, chunks: int, seed: int,
                          window: int = WINDOW_MEGABATCHES) -> Iterator[list[dict]]:
    """One rank's stream of training rows (``length``, ``has_image``) → micro-batches in megabatch order.

    ``chunks`` is this rank's micro-batches per optimizer step (its accumulation steps). Rows that do not
    fill a last micro-batch are dropped.
    """
    rng = random.Random(seed)
    size = micro_batch_size * chunks
    buf: list[dict] = []

    def cut(batch_rows: list[dict], final: bool) -> tuple[list[list[dict]], list[dict]]:
        megabatches = modality_megabatches([int(r["length"]) for r in batch_rows],
                                           [bool(r["has_image"]) for r in batch_rows], micro_batch_size, chunks, rng)
        keep = megabatches if final else [mb for mb in megabatches if len(mb) == size]
        if not final and len(keep) == len(megabatches):
            keep = keep[:-1]  # the modality-mixed tail may happen to be full: still carry it
        order = [batch_rows[i] for mb in keep for i in mb]
        kept = {i for mb in keep for i in mb}
        carry = [r for i, r in enumerate(batch_rows) if i not in kept]
        n = len(order) - len(order) % micro_batch_size
        return [order[i:i + micro_batch_size] for i in range(0, n, micro_batch_size)], carry + order[n:]

    for row in rows:
        buf.append(row)
        if len(buf) >= size * window:
            batches, buf = cut(buf, final=False)
            yield from batches
    if buf:
        batches, _ = cut(buf, final=True)
        yield from batches


def in_order_micro_batches(rows: Iterable[dict], micro_batch_size: int) -> Iterator[list[dict]]:
    """Micro-batches in arrival order (the rows come shuffled): the plain random sampler. A short tail is dropped."""
    buf: list[dict] = []
    for row in rows:
        buf.append(row)
        if len(buf) == micro_batch_size:
            yield buf
            buf = []
