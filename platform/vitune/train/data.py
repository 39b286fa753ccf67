"""Training data: records → tokenized rows that carry their skip reason → rows joined to feature-store shards.

Every record is read and validated once (``vitune.data.records``), tokenized once with the core templates,
and becomes one ``TokenizedRow``: ``TOKEN_DTYPE`` arrays of ids and labels and, when it cannot be trained,
the reason why. A reason is the ``kind`` of the record's validation or mask error (``bad_type``,
``template_mismatch``, ``image_truncated``, ... — the vocabulary ``vitune data inspect`` reports), or
``no_features`` for an image the feature store lacks, or ``visual_token_budget`` for a record whose images take
more visual tokens than ``train.max_visual_tokens``. ``DataStats`` counts the rows: rows in = rows trained +
rows skipped, per reason. ``model_max_length`` counts each image's own visual tokens (the feature store's
``visual_tokens``: a function of the image's size for anyres, the fixed N for pad), as LLaVA truncates after
the ``<image>`` expansion; the tokens truncation cuts are counted too, and a row's ``length`` (what length
grouping sorts by) is that expanded length. Token ids stay int32 until ``collate`` turns them into the int64
tensors the model takes.

A record may hold several images (LLaVA-NeXT-Interleave): its row carries its image keys in ``<image>`` order
and, once joined, one feature array per image in that order; ``collate`` passes the batch's images in reading
order, which is the order ``vitune.model.vlm.splice_image_features`` consumes them in.

An anyres store (``image_aspect_ratio: anyres`` / ``anyres_max_N``) holds each image's tiles ``[T, N, D]`` and
its size: a row's images count ``vision_recipe.visual_tokens(model recipe, w, h)`` each (the store's
``visual_tokens(recipe)``), its rows carry each image's ``(width, height)`` (``with_image_sizes``), and
``collate`` passes the per-image tile tensors with ``image_sizes`` in the same reading order.

Text-only records (LLaVA-1.5's ShareGPT share) train too: they have no features to join, so they never enter
the feature stream; each rank takes its share of them from the object store and ``interleave`` mixes them
into its stream of joined image rows. ``collate`` batches image and text-only rows together (the model splices
features into the rows that hold ``<image>`` only), and ``vitune.train.sampler`` orders them.

The records are small and the features big, so the join runs where the features are read: the trainable
single-image rows cross Ray once, into the object store, and each feature shard's block is matched against
them; feature bytes never cross the cluster in a shuffle. A multi-image row needs features from several
shards, which no one block holds: the driver looks its keys up in the store directly (``FeatureStore.get``, each
shard read once) and the joined rows travel with the text-only ones (``side_rows``). That suits a modest
multi-image share; a large one would want its own keyed join. Everything here but the join task runs without
Ray.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitune import IGNORE_INDEX
from vitune.data.masks import MaskError, tokenize_record
from vitune.data.records import Record, normalize_image_token, read_records_with_errors
from vitune.features.store import TILE_BYTE_ORDER
from vitune.train.packing import balanced_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TOKEN_DTYPE = np.int32  # ids and labels in rows, the object store and Arrow; int64 only in collated tensors
NO_FEATURES = "no_features"  # one of the record's images has no row in the feature store
VISUAL_TOKEN_BUDGET = "visual_token_budget"  # the record's images take more than train.max_visual_tokens


@dataclass(frozen=True)
class TokenizedRow:
    """One input record, tokenized: ``skip`` is why it cannot be trained (None when it can)."""

    id: str
    image_keys: tuple[str, ...]  # in <image> order; () for a text-only (or unreadable) record
    input_ids: np.ndarray  # [T] TOKEN_DTYPE (empty when skipped before tokenizing)
    labels: np.ndarray  # [T] TOKEN_DTYPE, IGNORE_INDEX outside the trained spans
    truncated: bool = False
    skip: str | None = None
    cut: int = 0  # tokens truncation removed
    visual_tokens: tuple[int, ...] = ()  # the positions each image takes in the LM's sequence, in order
    # anyres: each image's original (width, height), in order (the model packs its tiles by it); () for pad
    image_sizes: tuple[tuple[int, int], ...] = ()

    @property
    def has_image(self) -> bool:
        return bool(self.image_keys)

    @property
    def multi_image(self) -> bool:
        return len(self.image_keys) > 1

    @property
    def length(self) -> int:
        """Positions the LM sees: text tokens + each image's visual tokens (what length grouping sorts by)."""
        return len(self.input_ids) + sum(self.visual_tokens) - len(self.visual_tokens)

    @property
    def trainable(self) -> bool:
        return self.skip is None


_NO_TOKENS = np.zeros(0, dtype=TOKEN_DTYPE)


def image_visual_tokens(keys: Sequence[str], image_positions: int | Mapping[str, int]) -> tuple[int, ...]:
    """Each image's visual tokens: ``image_positions`` is N for every image, or the count by image key (the
    feature store's ``visual_tokens``); a key it lacks counts 1 (it has no features and is skipped later)."""
    if isinstance(image_positions, Mapping):
        return tuple(int(image_positions.get(k, 1)) for k in keys)
    return (int(image_positions),) * len(keys)


def tokenize_row(record: Record, template: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 image_positions: int | Mapping[str, int] = 1,
                 max_visual_tokens: int | None = None) -> TokenizedRow:
    """A validated record → its ``TokenizedRow``; one whose labels cannot be built carries its mask error's kind.

    ``max_length`` counts the visual tokens each ``<image>`` expands to (LLaVA's ``model_max_length`` applies
    after the expansion), so a record whose images take V visual tokens in all keeps ``max_length - (V - M)``
    token ids at most (M images). ``image_positions``: see ``image_visual_tokens``. ``max_visual_tokens`` (None
    = no limit) skips a record whose images take more than that, as ``visual_token_budget``.
    """
    record = normalize_image_token(record)
    keys = record.images
    counts = image_visual_tokens(keys, image_positions)
    if max_visual_tokens is not None and sum(counts) > max_visual_tokens:
        log.warning("skipping record %s: its %d image(s) take %d visual tokens, over the budget of %d "
                    "(train.max_visual_tokens)", record.id, len(keys), sum(counts), max_visual_tokens)
        return TokenizedRow(record.id, keys, _NO_TOKENS, _NO_TOKENS, skip=VISUAL_TOKEN_BUDGET, visual_tokens=counts)
    try:
        sample = tokenize_record(record, template, tokenizer, max_length, visual_tokens=counts)
    except MaskError as err:
        log.warning("skipping record: %s", err)
        return TokenizedRow(record.id, keys, _NO_TOKENS, _NO_TOKENS, skip=err.kind, visual_tokens=counts)
    return TokenizedRow(record.id, keys, np.asarray(sample.input_ids, dtype=TOKEN_DTYPE),
                        np.asarray(sample.labels, dtype=TOKEN_DTYPE), truncated=sample.truncated, cut=sample.num_cut,
                        visual_tokens=counts)


def tokenize_records(uris: Sequence[str], template: str, tokenizer: PreTrainedTokenizerBase,
                     max_length: int, image_positions: int | Mapping[str, int] = 1,
                     max_visual_tokens: int | None = None) -> list[TokenizedRow]:
    """One row per input record of every file: invalid records carry their validation error's kind."""
    rows: list[TokenizedRow] = []
    for uri in uris:
        records, errors = read_records_with_errors(uri)
        for err in errors:
            log.warning("skipping invalid record: %s", err)
            rows.append(TokenizedRow(err.record_id or "", (), _NO_TOKENS, _NO_TOKENS, skip=err.kind))
        rows.extend(tokenize_row(r, template, tokenizer, max_length, image_positions, max_visual_tokens)
                    for r in records)
    return rows


def check_features(rows: Iterable[TokenizedRow], feature_keys: Collection[str]) -> list[TokenizedRow]:
    """Mark the trainable image rows the feature store cannot feed (any of their images) as ``no_features``;
    text-only rows train."""
    out = []
    for row in rows:
        if row.trainable and any(key not in feature_keys for key in row.image_keys):
            row = replace(row, skip=NO_FEATURES)
        out.append(row)
    return out


def with_image_sizes(rows: Iterable[TokenizedRow], sizes: Mapping[str, tuple[int, int]]) -> list[TokenizedRow]:
    """Each trainable image row with its images' original ``(width, height)`` (an anyres store's ``size``
    column, ``FeatureStore.image_sizes``): what ``training_row`` hands the model to pack the tiles by. Run after
    ``check_features``: a trainable row's keys are all in the store, so a key without a size is an error."""
    out = []
    for row in rows:
        if row.trainable and row.has_image:
            missing = [key for key in row.image_keys if key not in sizes]
            if missing:
                raise ValueError(f"record {row.id!r}: the feature store records no size for image(s) {missing}")
            row = replace(row, image_sizes=tuple((int(sizes[k][0]), int(sizes[k][1])) for k in row.image_keys))
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
    multi_image: int = 0  # trained rows with several images

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
                stats.multi_image += row.multi_image
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

    @property
    def single_image(self) -> int:
        """Trained rows with one image: the rows the streaming join feeds."""
        return self.with_image - self.multi_image

    @property
    def side(self) -> int:
        """Trained rows that travel beside the feature stream (``side_rows``): text-only and multi-image."""
        return self.text_only + self.multi_image

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "samples": self.samples, "skipped": dict(self.skipped),
                "skipped_total": self.skipped_total, "truncated": self.truncated,
                "truncated_tokens": self.truncated_tokens, "text_only": self.text_only,
                "multi_image": self.multi_image}

    def metrics(self) -> dict[str, float]:
        """The MLflow form: ``records_in``, ``samples``, ``samples_text_only``, ``samples_multi_image``,
        ``truncated``, ``truncated_tokens``, ``skipped_total`` and ``skipped_<reason>``."""
        out = {"records_in": self.records, "samples": self.samples, "samples_text_only": self.text_only,
               "samples_multi_image": self.multi_image,
               "truncated": self.truncated, "truncated_tokens": self.truncated_tokens,
               "skipped_total": self.skipped_total}
        out.update({f"skipped_{reason}": n for reason, n in sorted(self.skipped.items())})
        return out


def by_image_key(rows: Iterable[TokenizedRow]) -> dict[str, list[TokenizedRow]]:
    """The trainable single-image rows grouped by image key: the table each join task looks feature rows up in
    (multi-image rows are joined apart, by ``multi_image_rows``)."""
    out: dict[str, list[TokenizedRow]] = defaultdict(list)
    for row in rows:
        if row.trainable and len(row.image_keys) == 1:
            out[row.image_keys[0]].append(row)
    return dict(out)


def text_only_rows(rows: Iterable[TokenizedRow]) -> list[dict[str, Any]]:
    """The trainable text-only rows as training rows (no features): what ranks mix into the feature stream."""
    return [training_row(row, None) for row in rows if row.trainable and not row.has_image]


def multi_image_keys(rows: Iterable[TokenizedRow]) -> set[str]:
    """The image keys the trainable multi-image rows need: what the driver looks up in the store."""
    return {key for row in rows if row.trainable and row.multi_image for key in row.image_keys}


def multi_image_rows(rows: Iterable[TokenizedRow], features: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """The trainable multi-image rows as training rows, each with its images' features in ``<image>`` order.

    ``features`` maps image key → features (``FeatureStore.get(multi_image_keys(rows))``); ``check_features``
    has already marked the rows whose keys the store lacks, so a key missing here is an error naming the row.
    """
    out = []
    for row in rows:
        if not (row.trainable and row.multi_image):
            continue
        missing = [key for key in row.image_keys if key not in features]
        if missing:
            raise ValueError(f"record {row.id!r}: no features for image(s) {missing} (run check_features first)")
        out.append(training_row(row, [features[key] for key in row.image_keys]))
    return out


def side_rows(rows: Sequence[TokenizedRow],
              lookup: Callable[[Collection[str]], Mapping[str, np.ndarray]]) -> list[dict[str, Any]]:
    """The training rows that reach the ranks beside the feature stream: text-only and multi-image ones, the
    latter joined to the features ``lookup`` (``FeatureStore.get``: each needed shard read once) gives for the
    keys they need."""
    keys = multi_image_keys(rows)
    features = lookup(keys) if keys else {}
    if keys:
        mib = sum(np.asarray(f).nbytes for f in features.values()) / 2**20
        log.info("multi-image rows: %d images looked up in the feature store (%.1f MiB beside the stream)",
                 len(keys), mib)
    return text_only_rows(rows) + multi_image_rows(rows, features)


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


def training_row(sample: TokenizedRow, feats: np.ndarray | Sequence[np.ndarray] | None) -> dict[str, Any]:
    """One training row: a tokenized sample + its image features (one array for one image, a list in
    ``<image>`` order for several); ``length`` counts each image's visual tokens (``TokenizedRow.length``). A row
    of an anyres store (``with_image_sizes``) also carries ``image_sizes`` ``[M, 2]``, each image's (w, h)."""
    n_given = 0 if feats is None else len(feats) if isinstance(feats, (list, tuple)) else 1
    if n_given != len(sample.image_keys):
        raise ValueError(f"record {sample.id!r} has {len(sample.image_keys)} image(s) but {n_given} feature "
                         "arrays were joined to it")
    row = {"input_ids": sample.input_ids, "labels": sample.labels, "features": feats,
           "has_image": feats is not None, "length": sample.length}
    if sample.image_sizes:  # anyres only: a pad row is as it always was
        row["image_sizes"] = np.asarray(sample.image_sizes, dtype=np.int32)  # [M, 2] (width, height)
    return row


# per Ray worker process: the trainable rows of the current run, fetched from the object store once
_BY_KEY: dict[str, dict[str, list[TokenizedRow]]] = {}


def tiles_from_bytes(blob: bytes, num_tiles: int, tile_shape: tuple[int, int], key: str = "?") -> np.ndarray:
    """One row of a tile store as Ray Data hands it over (its ``features`` bytes, ``num_tiles``) → ``[T, N, D]``
    float16 (``vitune.features.store``'s layout: little-endian float16, C order)."""
    n, d = tile_shape
    flat = np.frombuffer(blob, dtype=TILE_BYTE_ORDER)
    if flat.size != num_tiles * n * d:
        raise ValueError(f"image {key!r}: {flat.size} feature values; its num_tiles={num_tiles} tiles of "
                         f"[{n}, {d}] take {num_tiles * n * d}")
    return flat.astype(np.float16, copy=False).reshape(num_tiles, n, d)


def fetched_rows(by_key_ref: list) -> dict[str, list[TokenizedRow]]:
    """The run's trainable rows by image key (``by_image_key``), fetched from the object store once per process."""
    import ray  # deferred: only the join tasks need Ray; the rest of the module runs without it (benchmarks)

    ref = by_key_ref[0]
    by_key = _BY_KEY.get(ref.hex())
    if by_key is None:
        _BY_KEY.clear()
        by_key = _BY_KEY[ref.hex()] = ray.get(ref)
    return by_key


def join_with_features(batch: dict[str, np.ndarray], by_key_ref: list,
                       tile_shape: tuple[int, int] | None = None) -> dict[str, list]:
    """Ray Data ``map_batches`` task: a block of feature rows → one training row per record using it.

    A task (not an actor) so each epoch's re-execution reuses warm workers; ``by_key_ref`` boxes the
    object-store reference so Ray hands it over unresolved and each process fetches it only once.
    ``tile_shape`` ``(N, D)``: the block is a tile store's (each row's tiles as bytes + ``num_tiles``).
    """
    by_key = fetched_rows(by_key_ref)
    cols: dict[str, list] = defaultdict(list)
    tiles = batch.get("num_tiles") if tile_shape is not None else None
    for i, (key, feats) in enumerate(zip(batch["image_key"], batch["features"], strict=True)):
        samples = by_key.get(str(key), ())
        if samples and tiles is not None:
            feats = tiles_from_bytes(feats, int(tiles[i]), tile_shape, str(key))  # [T, N, D]
        for sample in samples:
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


def row_images(row: dict) -> list[np.ndarray]:
    """A training row's feature arrays, one per image in ``<image>`` order (none for a text-only row)."""
    feats = row["features"]
    if not row["has_image"] or feats is None:
        return []
    return [np.asarray(f) for f in feats] if isinstance(feats, (list, tuple)) else [np.asarray(feats)]


def row_image_sizes(row: dict) -> list[tuple[int, int]] | None:
    """An anyres training row's ``(width, height)`` per image in ``<image>`` order; None for a pad row."""
    sizes = row.get("image_sizes")
    if sizes is None or not row["has_image"]:
        return None
    return [(int(w), int(h)) for w, h in np.asarray(sizes).reshape(-1, 2)]


def collate(rows: list[dict], pad_token_id: int) -> dict[str, Any]:
    """``collate_tokens`` + every image's features in reading order (row by row, within a row in ``<image>``
    order, as the splice consumes them): one ``[M, N, Dv]`` tensor when all are ``[N, Dv]`` of one shape (the
    pad form), else a list of M tensors (counts or tiles that differ per image); None without images.

    Rows of an anyres store add ``image_sizes``: the M images' ``(width, height)`` in the same reading order,
    which the model packs each image's tiles by (a pad batch has no such key)."""
    feats = [f for r in rows for f in row_images(r)]
    if not feats:
        images: torch.Tensor | list[torch.Tensor] | None = None
    elif all(f.ndim == 2 and f.shape == feats[0].shape for f in feats):
        images = torch.from_numpy(np.stack(feats))  # [M, N, Dv]
    else:
        # M x [n_i, Dv] or [T_i, N, Dv]; a store's tiles are read-only views of one buffer: torch takes a copy
        images = [torch.from_numpy(f if f.flags.writeable else f.copy()) for f in feats]
    out = {**collate_tokens(rows, pad_token_id), "image_features": images}
    per_row = [(r, row_image_sizes(r)) for r in rows if row_images(r)]
    if any(sizes is not None for _, sizes in per_row):
        sizes: list[tuple[int, int]] = []
        for r, row_sizes in per_row:
            if row_sizes is None or len(row_sizes) != len(row_images(r)):
                n = "no" if row_sizes is None else len(row_sizes)
                raise ValueError(f"a batch mixes anyres rows with a row of {len(row_images(r))} image(s) and {n} "
                                 "image_sizes: every image row of an anyres store carries each image's size")
            sizes.extend(row_sizes)
        out["image_sizes"] = sizes
    return out


def collate_packed(rows: list[dict], pad_token_id: int, budget: int, one_row: bool = False) -> dict[str, Any]:
    """``collate`` with the micro-batch's samples packed several to a row, up to ``budget`` positions a row.

    A sample's size is its ``length``, counted after the visual-token splice, so the budget bounds what the LM
    sees. Rows are ``packing.balanced_rows`` (first-fit-decreasing, rebalanced); ``one_row`` puts every sample in
    one row (flash-attention reads the boundaries of one row only). The micro-batch keeps its samples, so the
    sampler's grouping, the step plan and a resumed run's micro-batch index mean what they meant unpacked.
    Within a row the samples lie back to back; ``segment_ids [R, T]`` says whose each token is (-1 at padding)
    and the model restarts positions and blocks attention by it (``VisionLanguageModel.forward``). Each
    sample's first label is ``IGNORE_INDEX``: unpacked, no position predicts a sample's first token, and here
    the one before it is another sample's last. The loss is then the same mean over the same label tokens.
    Images are passed in the packed reading order, row by row, which is the order the splice consumes them in.
    """
    lengths = [int(r["length"]) for r in rows]
    layout = [list(range(len(rows)))] if one_row else balanced_rows(lengths, budget)
    ordered = [rows[i] for row in layout for i in row]
    out = collate(ordered, pad_token_id)  # the images (and anyres sizes) in packed reading order
    width = max(sum(len(rows[i]["input_ids"]) for i in row) for row in layout)
    ids = np.full((len(layout), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(layout), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(layout), width), dtype=np.int64)
    segments = np.full((len(layout), width), -1, dtype=np.int64)
    sample = 0
    for r, row in enumerate(layout):
        at = 0
        for i in row:
            n = len(rows[i]["input_ids"])
            ids[r, at:at + n], labels[r, at:at + n] = rows[i]["input_ids"], rows[i]["labels"]
            labels[r, at] = IGNORE_INDEX
            mask[r, at:at + n], segments[r, at:at + n] = 1, sample
            at, sample = at + n, sample + 1
    return {
        **out,
        "input_ids": torch.from_numpy(ids),  # [R, T]
        "attention_mask": torch.from_numpy(mask),  # [R, T] the tokens the splice keeps (not the LM's mask)
        "labels": torch.from_numpy(labels),  # [R, T]
        "segment_ids": torch.from_numpy(segments),  # [R, T]
        "num_tokens": sum(lengths),
        "num_positions": len(layout) * max(sum(lengths[i] for i in row) for row in layout),
        "num_samples": len(rows),
    }


def image_features_to(feats: torch.Tensor | Sequence[torch.Tensor] | None,
                      device: torch.device | str) -> torch.Tensor | list[torch.Tensor] | None:
    """``collate``'s ``image_features`` (one tensor, a list of per-image tensors, or None) moved to ``device``."""
    if feats is None or isinstance(feats, torch.Tensor):
        return None if feats is None else feats.to(device)
    return [f.to(device) for f in feats]
