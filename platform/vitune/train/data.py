"""Training data: records → tokenized rows that carry their skip reason → rows joined to feature-store shards.

Every record is read and validated once (``vitune.data.records``), tokenized once with the core templates,
and becomes one ``TokenizedRow``: ``TOKEN_DTYPE`` arrays of ids and labels and, when it cannot be trained,
the reason why. A reason is the ``kind`` of the record's validation or mask error (``bad_type``,
``template_mismatch``, ``image_truncated``, ... — the vocabulary ``vitune data inspect`` reports), or
``no_features`` for an image the feature store lacks. ``DataStats`` counts the rows: rows in = rows trained +
rows skipped, per reason. ``model_max_length`` counts the image's N positions, as LLaVA truncates after the
``<image>`` expansion; the tokens truncation cuts are counted too. Token ids stay int32 until ``collate`` turns
them into the int64 tensors the model takes.

Text-only records (LLaVA-1.5's ShareGPT share) train too: they have no features to join, so they never enter
the feature stream; each rank takes its share of them from the object store and ``interleave`` mixes them
into its stream of joined image rows. ``collate`` batches image and text-only rows together (the model splices
features into the rows that hold ``<image>`` only), and ``vitune.train.sampler`` orders them.

The records are small and the features big, so the join runs where the features are read: the trainable
image rows cross Ray once, into the object store, and each feature shard's block is matched against them;
feature bytes never cross the cluster in a shuffle. Everything here but the join task runs without Ray.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitune import IGNORE_INDEX
from vitune.data.masks import MaskError, tokenize_record
from vitune.data.records import Record, normalize_image_token, read_records_with_errors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TOKEN_DTYPE = np.int32  # ids and labels in rows, the object store and Arrow; int64 only in collated tensors
NO_FEATURES = "no_features"  # the record's image has no row in the feature store


@dataclass(frozen=True)
class TokenizedRow:
    """One input record, tokenized: ``skip`` is why it cannot be trained (None when it can)."""

    id: str
    image_key: str  # "" for a text-only (or unreadable) record
    input_ids: np.ndarray  # [T] TOKEN_DTYPE (empty when skipped before tokenizing)
    labels: np.ndarray  # [T] TOKEN_DTYPE, IGNORE_INDEX outside the trained spans
    truncated: bool = False
    skip: str | None = None
    cut: int = 0  # tokens truncation removed

    @property
    def has_image(self) -> bool:
        return bool(self.image_key)

    @property
    def trainable(self) -> bool:
        return self.skip is None


_NO_TOKENS = np.zeros(0, dtype=TOKEN_DTYPE)


def tokenize_row(record: Record, template: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 image_positions: int | Mapping[str, int] = 1) -> TokenizedRow:
    """A validated record → its ``TokenizedRow``; one whose labels cannot be built carries its mask error's kind.

    ``max_length`` counts the visual tokens the ``<image>`` token expands to (LLaVA's ``model_max_length``
    applies after the expansion), so a record with an image of N visual tokens keeps ``max_length - (N - 1)``
    token ids at most. ``image_positions`` is N for every image, or N by image key (the feature store's
    ``visual_tokens``, which reads ``vitune.vision_recipe``); a key it lacks has no features and is skipped later.
    """
    record = normalize_image_token(record)
    image_key = record.image or ""
    if isinstance(image_positions, Mapping):
        image_positions = image_positions.get(image_key, 1)
    limit = max_length - (image_positions - 1) if image_key else max_length
    if limit < 2:  # not even <image> and one trained token fit
        log.warning("skipping record %s: %d image positions leave no room in %d", record.id, image_positions,
                    max_length)
        return TokenizedRow(record.id, image_key, _NO_TOKENS, _NO_TOKENS, skip="image_truncated")
    try:
        sample = tokenize_record(record, template, tokenizer, limit)
    except MaskError as err:
        log.warning("skipping record: %s", err)
        return TokenizedRow(record.id, image_key, _NO_TOKENS, _NO_TOKENS, skip=err.kind)
    return TokenizedRow(record.id, image_key, np.asarray(sample.input_ids, dtype=TOKEN_DTYPE),
                        np.asarray(sample.labels, dtype=TOKEN_DTYPE), truncated=sample.truncated, cut=sample.num_cut)


def tokenize_records(uris: Sequence[str], template: str, tokenizer: PreTrainedTokenizerBase,
                     max_length: int, image_positions: int | Mapping[str, int] = 1) -> list[TokenizedRow]:
    """One row per input record of every file: invalid records carry their validation error's kind."""
    rows: list[TokenizedRow] = []
    for uri in uris:
        records, errors = read_records_with_errors(uri)
        for err in errors:
            log.warning("skipping invalid record: %s", err)
            rows.append(TokenizedRow(err.record_id or "", "", _NO_TOKENS, _NO_TOKENS, skip=err.kind))
        rows.extend(tokenize_row(r, template, tokenizer, max_length, image_positions) for r in records)
    return rows


def check_features(rows: Iterable[TokenizedRow], feature_keys: Collection[str]) -> list[TokenizedRow]:
    """Mark the trainable image rows the feature store cannot feed as ``no_features``; text-only rows train."""
    out = []
    for row in rows:
        if row.trainable and row.has_image and row.image_key not in feature_keys:
            row = replace(row, skip=NO_FEATURES)
        out.append(row)
    return out


@dataclass
class DataStats:
    """What the training data holds: rows in = rows trained (``samples``) + rows skipped, per reason."""

    records: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0  # trained rows that truncation shortened
    truncated_tokens: int = 0  # the tokens it cut from them
    text_only: int = 0  # trained rows without an image

    @classmethod
    def of(cls, rows: Iterable[TokenizedRow]) -> DataStats:
        stats = cls()
        for row in rows:
            stats.records += 1
            if row.trainable:
                stats.samples += 1
                stats.truncated += row.truncated
                stats.truncated_tokens += row.cut
                stats.text_only += not row.has_image
            else:
                stats.skipped[row.skip] += 1
        if stats.skipped:
            log.warning("%d of %d records skipped: %s", stats.skipped_total, stats.records, dict(stats.skipped))
        return stats

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def with_image(self) -> int:
        return self.samples - self.text_only

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "samples": self.samples, "skipped": dict(self.skipped),
                "skipped_total": self.skipped_total, "truncated": self.truncated,
                "truncated_tokens": self.truncated_tokens, "text_only": self.text_only}

    def metrics(self) -> dict[str, float]:
        """The MLflow form: ``records_in``, ``samples``, ``samples_text_only``, ``truncated``, ``truncated_tokens``,
        ``skipped_total`` and ``skipped_<reason>``."""
        out = {"records_in": self.records, "samples": self.samples, "samples_text_only": self.text_only,
               "truncated": self.truncated, "truncated_tokens": self.truncated_tokens,
               "skipped_total": self.skipped_total}
        out.update({f"skipped_{reason}": n for reason, n in sorted(self.skipped.items())})
        return out


def by_image_key(rows: Iterable[TokenizedRow]) -> dict[str, list[TokenizedRow]]:
    """The trainable image rows grouped by image key: the table each join task looks feature rows up in."""
    out: dict[str, list[TokenizedRow]] = defaultdict(list)
    for row in rows:
        if row.trainable and row.has_image:
            out[row.image_key].append(row)
    return dict(out)


def text_only_rows(rows: Iterable[TokenizedRow]) -> list[dict[str, Any]]:
    """The trainable text-only rows as training rows (no features): what ranks mix into the feature stream."""
    return [training_row(row, None) for row in rows if row.trainable and not row.has_image]


def interleave(stream: Iterable[dict], extra: Sequence[dict], stream_len: int, seed: int) -> Iterator[dict]:
    """``stream`` (about ``stream_len`` rows) with the ``extra`` rows mixed in at random places, all of both.

    Each next row is drawn from either side in proportion to the rows that side has left, so the text-only
    rows spread over the whole epoch instead of bunching at one end.
    """
    rng = random.Random(seed)
    extra = list(extra)
    rng.shuffle(extra)
    left = max(stream_len, 0)
    it = iter(stream)
    k = 0
    for row in it:
        while k < len(extra) and rng.random() * (left + len(extra) - k) < len(extra) - k:
            yield extra[k]
            k += 1
        yield row
        left = max(left - 1, 0)
    yield from extra[k:]


def training_row(sample: TokenizedRow, feats: np.ndarray | None) -> dict[str, Any]:
    """One training row: a tokenized sample + its image features; ``length`` counts the N image positions."""
    n_img = 0 if feats is None else feats.shape[0]
    length = len(sample.input_ids) + max(n_img - 1, 0)
    return {"input_ids": sample.input_ids, "labels": sample.labels, "features": feats,
            "has_image": feats is not None, "length": length}


# per Ray worker process: the trainable rows of the current run, fetched from the object store once
_BY_KEY: dict[str, dict[str, list[TokenizedRow]]] = {}


def join_with_features(batch: dict[str, np.ndarray], by_key_ref: list) -> dict[str, list]:
    """Ray Data ``map_batches`` task: a block of feature rows → one training row per record using it.

    A task (not an actor) so each epoch's re-execution reuses warm workers; ``by_key_ref`` boxes the
    object-store reference so Ray hands it over unresolved and each process fetches it only once.
    """
    import ray  # deferred: only this task needs Ray; the rest of the module runs without it (benchmarks)

    ref = by_key_ref[0]
    by_key = _BY_KEY.get(ref.hex())
    if by_key is None:
        _BY_KEY.clear()
        by_key = _BY_KEY[ref.hex()] = ray.get(ref)
    cols: dict[str, list] = defaultdict(list)
    for key, feats in zip(batch["image_key"], batch["features"], strict=True):
        for sample in by_key.get(str(key), ()):
            for name, value in training_row(sample, feats).items():
                cols[name].append(value)
    return dict(cols)


def collate_tokens(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor | int]:
    """Right-padded int64 ``input_ids/attention_mask/labels`` and the batch's token counts.

    ``num_tokens`` counts the positions that hold a real token (an image's N patches included),
    ``num_positions`` all positions the step computes (padding included).
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)  # int64 from here on: the one conversion
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    lengths = [int(r["length"]) for r in rows]
    return {
        "input_ids": torch.from_numpy(ids),  # [B, T]
        "attention_mask": torch.from_numpy(mask),  # [B, T]
        "labels": torch.from_numpy(labels),  # [B, T]
        "num_tokens": sum(lengths),
        "num_positions": max(lengths) * len(rows),
    }


def collate(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor | int | None]:
    """``collate_tokens`` + the image features of the rows that have one."""
    feats = [np.asarray(r["features"]) for r in rows if r["has_image"]]
    return {**collate_tokens(rows, pad_token_id),
            "image_features": torch.from_numpy(np.stack(feats)) if feats else None}  # [M, N, Dv]
