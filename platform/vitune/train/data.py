"""Training data: records tokenized with the core templates, joined to feature-store shards by image key.

The records are small and the features big, so the join runs where the features are read: each
feature shard's block is matched against the tokenized records (shared once through the object store),
and feature bytes never cross the cluster in a shuffle. The epoch shuffle is a per-epoch file order
plus a local buffer, then length-grouped micro-batches (LLaVA's ``group_by_modality_length`` idea) keep
padding small. The same pieces run without Ray for single-process timing.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vitune.data.records import Record, normalize_image_token, read_records_with_errors
from vitune.data.templates import IGNORE_INDEX, MaskError, tokenize_record

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    """Accounting of what the training data holds: records in = samples + skipped."""

    records: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "samples": self.samples, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "truncated": self.truncated}


def load_records(uris: list[str], stats: DataStats) -> list[Record]:
    """Read and validate every record file; invalid records are counted skips with their reason."""
    out: list[Record] = []
    for uri in uris:
        records, errors = read_records_with_errors(uri)
        stats.records += len(records) + len(errors)
        for err in errors:
            stats.skipped[f"invalid:{getattr(err, 'kind', 'record')}"] += 1
            log.warning("skipping invalid record: %s", err)
        out.extend(normalize_image_token(r) for r in records)
    return out


def tokenize_rows(rows: Iterable[dict], template: str, tokenizer: Any, max_length: int) -> tuple[list[dict], Counter]:
    """Tokenize LLaVA record dicts; a record whose labels cannot be built is a counted skip, never silent."""
    from vitune.data.records import validate_record

    out, skipped = [], Counter()
    for row in rows:
        rec = normalize_image_token(validate_record(row))
        try:
            sample = tokenize_record(rec, template, tokenizer, max_length)
        except MaskError as err:
            skipped[f"mask:{getattr(err, 'kind', 'error')}"] += 1
            log.warning("skipping record: %s", err)
            continue
        out.append({
            "id": rec.id,
            "image_key": rec.image or "",
            "input_ids": np.asarray(sample.input_ids, dtype=np.int32),
            "labels": np.asarray(sample.labels, dtype=np.int32),
            "truncated": sample.truncated,
        })
    return out, skipped


class TokenizeBatch:
    """Ray Data ``map_batches`` callable: record JSON strings → input_ids/labels (tokenizer loaded once)."""

    def __init__(self, template: str, tokenizer_name: str, max_length: int):
        from vitune.data.tokenizer import load_tokenizer

        self.template, self.max_length = template, max_length
        self.tokenizer = load_tokenizer(tokenizer_name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import json

        rows, skipped = tokenize_rows((json.loads(s) for s in batch["record"]), self.template, self.tokenizer,
                                      self.max_length)
        return {
            "id": [r["id"] for r in rows],
            "image_key": [r["image_key"] for r in rows],
            "input_ids": [r["input_ids"] for r in rows],
            "labels": [r["labels"] for r in rows],
            "truncated": [r["truncated"] for r in rows],
            "skipped": [json.dumps(dict(skipped))] * len(rows) if rows else [],
        }


def training_row(sample: dict, feats: np.ndarray | None) -> dict:
    """One training row: a tokenized sample + its image features; ``length`` counts the N image positions."""
    n_img = 0 if feats is None else feats.shape[0]
    length = len(sample["input_ids"]) + max(n_img - 1, 0)
    return {"input_ids": sample["input_ids"], "labels": sample["labels"], "features": feats,
            "has_image": feats is not None, "length": length}


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


def collate(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor | int]:
    """Right-padded ``input_ids/attention_mask/labels`` + the image features of the rows that have one."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(np.asarray(r["input_ids"], dtype=np.int64))
        labels[i, :n] = torch.as_tensor(np.asarray(r["labels"], dtype=np.int64))
        mask[i, :n] = 1
    feats = [torch.as_tensor(np.asarray(r["features"])) for r in rows
             if r["has_image"] and r.get("features") is not None]
    # rows may carry raw image bytes instead (the frozen tower then runs in the loop: benchmarks only)
    images = [r["image_bytes"] for r in rows if r.get("image_bytes") is not None]
    padded_tokens = int(sum(r["length"] for r in rows))
    max_len = max(r["length"] for r in rows)
    return {
        "input_ids": ids,  # [B, T]
        "attention_mask": mask,  # [B, T]
        "labels": labels,  # [B, T]
        "image_features": torch.stack(feats) if feats else None,  # [M, N, Dv]
        "images": images,
        "num_tokens": padded_tokens,
        "num_padded": max_len * len(rows),
    }
