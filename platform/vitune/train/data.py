"""Training data: records → tokenized rows that carry their skip reason → rows joined to feature-store shards.

Every record is read and validated once (``vitune.data.records``), tokenized once with the core templates,
and becomes one ``TokenizedRow``: ``TOKEN_DTYPE`` arrays of ids and labels and, when it cannot be trained,
the reason why. A reason is the ``kind`` of the record's validation or mask error (``bad_type``,
``template_mismatch``, ``image_truncated``, ... — the vocabulary ``vitune data inspect`` reports), or
``text_only`` / ``no_features`` for a record this feature-store pipeline cannot join. ``DataStats`` counts
the rows: rows in = rows trained + rows skipped, per reason. Token ids stay int32 until ``collate`` turns
them into the int64 tensors the model takes.

The records are small and the features big, so the join runs where the features are read: the trainable
rows cross Ray once, into the object store, and each feature shard's block is matched against them; feature
bytes never cross the cluster in a shuffle. The epoch shuffle is a per-epoch file order plus a local buffer,
then length-grouped micro-batches (LLaVA's ``group_by_modality_length`` idea) keep padding small. Everything
here but the join task runs without Ray.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitune import IGNORE_INDEX
from vitune.data.records import Record, normalize_image_token, read_records_with_errors
from vitune.data.templates import MaskError, tokenize_record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TOKEN_DTYPE = np.int32  # ids and labels in rows, the object store and Arrow; int64 only in collated tensors
TEXT_ONLY = "text_only"  # no image: the feature-store pipeline does not train text-only records yet
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

    @property
    def trainable(self) -> bool:
        return self.skip is None


_NO_TOKENS = np.zeros(0, dtype=TOKEN_DTYPE)


def tokenize_row(record: Record, template: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TokenizedRow:
    """A validated record → its ``TokenizedRow``; one whose labels cannot be built carries its mask error's kind."""
    record = normalize_image_token(record)
    image_key = record.image or ""
    try:
        sample = tokenize_record(record, template, tokenizer, max_length)
    except MaskError as err:
        log.warning("skipping record: %s", err)
        return TokenizedRow(record.id, image_key, _NO_TOKENS, _NO_TOKENS, skip=err.kind)
    return TokenizedRow(record.id, image_key, np.asarray(sample.input_ids, dtype=TOKEN_DTYPE),
                        np.asarray(sample.labels, dtype=TOKEN_DTYPE), truncated=sample.truncated)


def tokenize_records(uris: Sequence[str], template: str, tokenizer: PreTrainedTokenizerBase,
                     max_length: int) -> list[TokenizedRow]:
    """One row per input record of every file: invalid records carry their validation error's kind."""
    rows: list[TokenizedRow] = []
    for uri in uris:
        records, errors = read_records_with_errors(uri)
        for err in errors:
            log.warning("skipping invalid record: %s", err)
            rows.append(TokenizedRow(err.record_id or "", "", _NO_TOKENS, _NO_TOKENS, skip=err.kind))
        rows.extend(tokenize_row(r, template, tokenizer, max_length) for r in records)
    return rows


def check_features(rows: Iterable[TokenizedRow], feature_keys: Collection[str]) -> list[TokenizedRow]:
    """Mark the trainable rows the feature store cannot feed: ``text_only``, or ``no_features`` for their image."""
    out = []
    for row in rows:
        if row.trainable and not row.image_key:
            row = replace(row, skip=TEXT_ONLY)
        elif row.trainable and row.image_key not in feature_keys:
            row = replace(row, skip=NO_FEATURES)
        out.append(row)
    return out


@dataclass
class DataStats:
    """What the training data holds: rows in = rows trained (``samples``) + rows skipped, per reason."""

    records: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    @classmethod
    def of(cls, rows: Iterable[TokenizedRow]) -> DataStats:
        stats = cls()
        for row in rows:
            stats.records += 1
            if row.trainable:
                stats.samples += 1
                stats.truncated += row.truncated
            else:
                stats.skipped[row.skip] += 1
        if stats.skipped:
            log.warning("%d of %d records skipped: %s", stats.skipped_total, stats.records, dict(stats.skipped))
        return stats

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "samples": self.samples, "skipped": dict(self.skipped),
                "skipped_total": self.skipped_total, "truncated": self.truncated}

    def metrics(self) -> dict[str, float]:
        """The MLflow form: ``records_in``, ``samples``, ``truncated``, ``skipped_total`` and ``skipped_<reason>``."""
        out = {"records_in": self.records, "samples": self.samples, "truncated": self.truncated,
               "skipped_total": self.skipped_total}
        out.update({f"skipped_{reason}": n for reason, n in sorted(self.skipped.items())})
        return out


def by_image_key(rows: Iterable[TokenizedRow]) -> dict[str, list[TokenizedRow]]:
    """The trainable rows grouped by image key: the table each join task looks feature rows up in."""
    out: dict[str, list[TokenizedRow]] = defaultdict(list)
    for row in rows:
        if row.trainable:
            out[row.image_key].append(row)
    return dict(out)


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


def length_grouped(rows: Iterable[dict], micro_batch_size: int, megabatch: int, seed: int) -> Iterator[list[dict]]:
    """Micro-batches of similar length: buffer ``megabatch`` micro-batches of rows, sort by (modality,
    length), cut, shuffle the cut order. Leftover rows that do not fill a micro-batch are dropped."""
    rng = random.Random(seed)
    buf: list[dict] = []
    size = micro_batch_size * megabatch

    def flush(rows: list[dict]) -> Iterator[list[dict]]:
        rows.sort(key=lambda r: (r["has_image"], r["length"]))
        chunks = [rows[i:i + micro_batch_size] for i in range(0, len(rows) - micro_batch_size + 1, micro_batch_size)]
        rng.shuffle(chunks)
        yield from chunks

    for row in rows:
        buf.append(row)
        if len(buf) == size:
            yield from flush(buf)
            buf = []
    if buf:
        yield from flush(buf)


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
