"""The vision-language model: projector + any Hugging Face causal LM, with the `<image>` splice.

The vision tower is not part of this module while it is frozen, so training consumes
precomputed features and eval/serving compute them with `vitune.model.vision`. A sample holds any number of
`<image>` tokens (several images per conversation, in order); each expands to its image's visual tokens. With
a pad/crop recipe those are the N projected features of its one tile (`image_features` `[M, N, Dv]`); with an
AnyRes recipe (`recipe`, a `vitune.vision_recipe.VisionRecipe` with `image_mode="anyres"`) an image's tiles
`[T_i, N, Dv]` are projected and packed by `vitune.model.anyres` (base view, unpadded grid, the learned
`image_newline` per row), so each image has its own count, `vision_recipe.visual_tokens(recipe, w, h)`;
`image_sizes` gives each image's original `(width, height)`.

A run that reads the pixel store (`vitune.features.pixels`: the tower tunes, LLaVA-NeXT's `mm_vision_tower`, or
a frozen tower runs in the step) attaches its tower (`attach_tower`); `forward` then takes the tiles'
`pixel_values` and runs the tower in the step.

`splice_image_features` is the single definition of that expansion (training with right padding,
batched generation with left padding): it builds the expanded token sequence, embeds it, and writes
the projected features in through an image mask (the nanoVLM way). It takes one `[M, N, D]` tensor (a
fixed count) or one `[n_i, D]` tensor per image (variable counts). Labels at image positions are
`IGNORE_INDEX`; the attention mask and position ids follow the expanded sequence.

`generate` / `generate_stream` delegate to `vitune.model.decoding`, the one decode loop (prefill with left
padding through `splice`, KV-cache steps, sampling) that the serving engine drives as well.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitune import IGNORE_INDEX, IMAGE_TOKEN
from vitune.config import STAGE_TUNABLE_PARTS, STAGES
from vitune.data import tokenizer as tokenizer_lib
from vitune.model.anyres import pack_image_features
from vitune.model.decoding import GenerationStep, decode_stream
from vitune.model.lm import INIT_SEED, load_lm
from vitune.model.projector import build_projector
from vitune.vision_recipe import VisionRecipe

logger = logging.getLogger(__name__)

ImageEmbeds = torch.Tensor | Sequence[torch.Tensor]  # [M, N, D], or one [n_i, D] per image


@dataclass
class SplicedInputs:
    """An expanded batch ready for the LM (`T'` = longest sequence after expansion)."""

    inputs_embeds: torch.Tensor  # [B, T', D]
    attention_mask: torch.Tensor  # [B, T'] long
    position_ids: torch.Tensor  # [B, T'] long
    labels: torch.Tensor | None  # [B, T'] long, IGNORE_INDEX at image and padding positions
    image_mask: torch.Tensor  # [B, T'] bool, True where image features were written
    # packed rows only: each position's sample (the input's segment ids carried through the expansion), -1 at
    # padding; None for a batch of one sample per row
    segment_ids: torch.Tensor | None = None  # [B, T'] long


class VLMOutput(dict):
    """Forward result: `loss` [] (mean CE over trained tokens), `logits` [B, T', V], `labels` and
    `attention_mask` [B, T'] (the expanded ones the logits line up with), `num_label_tokens`.

    A dict with attribute access, so DeepSpeed ZeRO-3 sees the tensors it must hook (it walks dicts and
    tuples, not dataclasses) without importing transformers at module import.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _image_lengths(image_embeds: ImageEmbeds | None, device: torch.device) -> torch.Tensor:
    """`[M]` visual tokens of each image: N each for an `[M, N, D]` tensor, `n_i` for a list of `[n_i, D]`."""
    if image_embeds is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    if isinstance(image_embeds, torch.Tensor):
        return torch.full((image_embeds.shape[0],), image_embeds.shape[1], dtype=torch.long, device=device)
    bad = [i for i, e in enumerate(image_embeds) if e.dim() != 2 or e.shape[0] < 1]
    if bad:
        shapes = [tuple(image_embeds[i].shape) for i in bad]
        raise ValueError(f"image embeddings {bad} have shapes {shapes}; each image's must be [n_i >= 1, D]")
    return torch.tensor([e.shape[0] for e in image_embeds], dtype=torch.long, device=device)


def splice_image_features(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    embed_tokens: nn.Module,
    image_token_id: int,
    image_embeds: ImageEmbeds | None,
    labels: torch.Tensor | None = None,
    padding_side: Literal["right", "left"] = "right",
    pad_token_id: int = 0,
    segment_ids: torch.Tensor | None = None,
) -> SplicedInputs:
    """Expand each `<image>` token into its image's projected features.

    `input_ids`/`attention_mask`/`labels` are `[B, T]` with padding on either side (only positions
    where the mask is 1 are kept, in order). `image_embeds` is `[M, N, D]` (N features each) or a sequence of
    M `[n_i, D]` tensors (a count per image), already projected, where M is the number of `<image>` tokens in
    the batch (a sample may hold several, LLaVA-NeXT-Interleave's form); they are consumed in reading order,
    sample by sample and within a sample left to right. The result is padded on `padding_side`.

    `segment_ids` `[B, T]` (packed rows, `vitune.train.data.collate_packed`): which sample each token belongs to;
    the result's `segment_ids` give each expanded position its token's sample (an image's visual tokens all its
    `<image>`'s), -1 at padding, which `packed_position_ids` turns into positions that restart per sample.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    batch, _ = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()  # [B, T]
    is_image = (input_ids == image_token_id) & valid  # [B, T]
    num_images = int(is_image.sum())
    image_lengths = _image_lengths(image_embeds, device)  # [M]
    if num_images != image_lengths.shape[0]:
        raise ValueError(f"batch holds {num_images} {IMAGE_TOKEN} tokens but {image_lengths.shape[0]} image "
                         "feature tensors")

    extra = torch.zeros_like(input_ids, dtype=torch.long)  # [B, T] positions an image token adds
    extra[is_image] = image_lengths - 1  # row-major, so in batch order
    width = valid.long() + extra  # [B, T] positions each token takes
    end = width.cumsum(dim=1)  # [B, T]
    lengths = end[:, -1] if end.shape[1] else torch.zeros(batch, dtype=torch.long, device=device)  # [B]
    new_len = int(lengths.max()) if batch else 0
    offset = new_len - lengths if padding_side == "left" else torch.zeros_like(lengths)  # [B]
    start = end - width + offset[:, None]  # [B, T] first new position of each token

    new_ids = torch.full((batch, new_len), pad_token_id, dtype=input_ids.dtype, device=device)
    new_labels = torch.full_like(new_ids, IGNORE_INDEX) if labels is not None else None
    image_mask = torch.zeros(batch, new_len, dtype=torch.bool, device=device)

    text_b, text_t = (valid & ~is_image).nonzero(as_tuple=True)
    text_dest = start[text_b, text_t]
    new_ids[text_b, text_dest] = input_ids[text_b, text_t]
    if labels is not None:
        new_labels[text_b, text_dest] = labels[text_b, text_t]
    img_b, img_t = is_image.nonzero(as_tuple=True)  # row-major, so in batch order
    # each image's positions: its first position + 0 .. n_i - 1, every image's one after the other
    first = torch.repeat_interleave(start[img_b, img_t], image_lengths)  # [sum n_i]
    within = torch.arange(int(image_lengths.sum()), device=device)
    within = within - torch.repeat_interleave(image_lengths.cumsum(0) - image_lengths, image_lengths)
    image_mask[torch.repeat_interleave(img_b, image_lengths), first + within] = True

    positions = torch.arange(new_len, device=device)[None, :]  # [1, T']
    new_mask = ((positions >= offset[:, None]) & (positions < (offset + lengths)[:, None])).long()  # [B, T']
    position_ids = (new_mask.cumsum(dim=1) - 1).masked_fill(new_mask == 0, 0)  # [B, T']

    new_segments = None
    if segment_ids is not None:
        new_segments = torch.full((batch, new_len), -1, dtype=torch.long, device=device)
        tok_b, tok_t = valid.nonzero(as_tuple=True)  # every kept token fills its `width` positions from `start`
        tok_w = width[tok_b, tok_t]
        within_token = torch.arange(int(tok_w.sum()), device=device)
        within_token = within_token - torch.repeat_interleave(tok_w.cumsum(0) - tok_w, tok_w)
        dest = torch.repeat_interleave(start[tok_b, tok_t], tok_w) + within_token
        new_segments[torch.repeat_interleave(tok_b, tok_w), dest] = torch.repeat_interleave(
            segment_ids.to(device)[tok_b, tok_t].long(), tok_w)

    embeds = embed_tokens(new_ids)  # [B, T', D]
    if num_images:
        # the mask is True image by image in batch order, as the features are laid out
        flat = image_embeds if isinstance(image_embeds, torch.Tensor) else torch.cat(list(image_embeds))
        features = flat.to(device=embeds.device, dtype=embeds.dtype)  # [M, N, D] or [sum n_i, D]
        embeds = embeds.masked_scatter(image_mask[..., None].expand_as(embeds), features)
    return SplicedInputs(embeds, new_mask, position_ids, new_labels, image_mask, new_segments)


def packed_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """`[B, T]` segment ids (sample index per position, -1 at padding) → positions `0..n-1` within each run.

    Each change of segment id starts a new run (a padding tail is a run of its own), so positions restart at
    every sample boundary: what `vitune.train.packing.position_ids` gives for one row's lengths, and what
    transformers reads sample boundaries from when no 2-D mask is passed (masking_utils'
    `find_packed_sequence_indices`: a step other than +1 starts a sequence; flash-attention's `cu_seqlens`).
    """
    _, width = segment_ids.shape
    index = torch.arange(width, device=segment_ids.device).expand_as(segment_ids)  # [B, T]
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # [B, T]
    return index - run_start


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over targets that are not `IGNORE_INDEX` (0 when there are none)."""
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:].to(logits.device)  # [B, T-1]
    count = int((shift_labels != IGNORE_INDEX).sum())
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / max(count, 1), count


class VisionLanguageModel(nn.Module):
    """Projector + causal LM. `forward` trains on features; `generate*` drive `vitune.model.decoding`."""

    def __init__(
        self,
        projector: nn.Module,
        lm: nn.Module,
        image_token_id: int,
        pad_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        recipe: VisionRecipe | None = None,
    ) -> None:
        super().__init__()
        self.projector = projector
        self.lm = lm
        # anyres: how tiles become visual tokens (None: one tile, its features as they are)
        self.recipe = recipe if recipe is not None and recipe.image_mode == "anyres" else None
        if self.recipe is not None and self.recipe.patch_merge == "spatial_unpad":
            embeddings = lm.get_input_embeddings()
            weight, width = embeddings.weight, embeddings.embedding_dim  # embedding_dim: right under ZeRO-3 too
            # LLaVA-NeXT's init: randn / sqrt(hidden), from a seed of its own (no draw on the caller's RNG)
            init = torch.randn(width, generator=torch.Generator().manual_seed(INIT_SEED)) / math.sqrt(width)
            self.image_newline = nn.Parameter(init.to(device=weight.device, dtype=weight.dtype))  # [D]
        else:
            self.register_parameter("image_newline", None)
        self.add_module("vision_tower", None)  # attach_tower: a run that reads pixels runs its tower here
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        if eos_token_id is None:
            eos_token_id = getattr(lm.config, "eos_token_id", None)
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_id or ())

    def attach_tower(self, tower: nn.Module) -> VisionLanguageModel:
        """Own `tower` (a `vitune.model.vision.VisionTower`), so `forward(pixel_values=...)` runs it in the step,
        `freeze` can tune it, and DeepSpeed shards, checkpoints and steps it with the rest."""
        self.vision_tower = tower
        return self

    def tower_features(self, pixel_values: torch.Tensor, num_tiles: Sequence[int]) -> list[torch.Tensor]:
        """Every image's tiles `[sum T_i, 3, S, S]` → each image's features `[T_i, N, Dv]`, through the attached
        tower (with autograd when it trains): what the feature job would store for a frozen tower."""
        if self.vision_tower is None:
            raise ValueError("pixel_values need a vision tower in the model (attach_tower): this model trains on "
                             "stored features")
        if sum(num_tiles) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} tiles but num_tiles adds up to {sum(num_tiles)}")
        return list(self.vision_tower(pixel_values).split(list(num_tiles)))  # each [T_i, N, Dv]

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        """Tower features `[M, N, Dv]` → LM-space embeddings `[M, N, Dl]`."""
        weight = next(self.projector.parameters(), None)
        target = weight if weight is not None else self.lm.get_input_embeddings().weight
        return self.projector(image_features.to(device=target.device, dtype=target.dtype))

    def embed_images(
        self,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> ImageEmbeds | None:
        """Tower features → each image's visual tokens in LM space (None when there are no images).

        `[M, N, Dv]` (one tile per image) → `[M, N, Dl]`. A sequence of per-image tile features `[T_i, N, Dv]`
        (`[N, Dv]` is one tile) → a list of `[n_i, Dl]`: with an anyres recipe packed by
        `vitune.model.anyres.pack_image_features` from each image's `(width, height)` in `image_sizes` (None: the
        image is its base view alone, one tile kept as it is), else the tiles' features in order. All tiles go
        through the projector in one call.
        """
        if image_features is None or len(image_features) == 0:
            return None
        if isinstance(image_features, torch.Tensor):
            if self.recipe is not None:
                raise ValueError("an anyres model takes a list of per-image tile features [T_i, N, Dv] and "
                                 "image_sizes, not one [M, N, Dv] tensor")
            return self.project(image_features)
        tiles = [f if f.dim() == 3 else f[None] for f in image_features]  # each [T_i, N, Dv]
        projected = self.project(torch.cat(tiles)).split([t.shape[0] for t in tiles])  # each [T_i, N, Dl]
        if self.recipe is None:
            return [p.flatten(0, 1) for p in projected]
        if image_sizes is None or len(image_sizes) != len(tiles):
            given = "none" if image_sizes is None else len(image_sizes)
            raise ValueError(f"an anyres model needs each image's (width, height): {len(tiles)} images, "
                             f"{given} image_sizes")
        return [self._base_view_only(p, i) if size is None
                else pack_image_features(p, self.recipe, int(size[0]), int(size[1]), self.image_newline)
                for i, (p, size) in enumerate(zip(projected, image_sizes, strict=True))]

    @staticmethod
    def _base_view_only(projected: torch.Tensor, index: int) -> torch.Tensor:
        """An anyres image given as its base view alone (size None: OpenAI's `detail: low`) → its one tile's
        features `[N, Dl]`, as `vision_recipe.visual_tokens(..., base_only=True)` counts them."""
        if projected.shape[0] != 1:
            raise ValueError(f"image {index} has no size, so it must be its base view alone (one tile), got "
                             f"{projected.shape[0]} tiles")
        return projected[0]

    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None,
        labels: torch.Tensor | None = None,
        padding_side: Literal["right", "left"] = "right",
        image_sizes: Sequence[tuple[int, int]] | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> SplicedInputs:
        """Project (and for anyres pack) the features and splice them into the embedded token sequence."""
        image_embeds = self.embed_images(image_features, image_sizes)
        return splice_image_features(
            input_ids.to(self.device),
            attention_mask.to(self.device) if attention_mask is not None else None,
            self.lm.get_input_embeddings(),
            self.image_token_id,
            image_embeds,
            labels=labels.to(self.device) if labels is not None else None,
            padding_side=padding_side,
            pad_token_id=self.pad_token_id,
            segment_ids=segment_ids,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        pixel_values: torch.Tensor | None = None,
        num_tiles: Sequence[int] | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> VLMOutput:
        """`input_ids [B, T]` (right padded) + `image_features` (`[M, N, Dv]`, or per image `[T_i, N, Dv]` with
        `image_sizes` for anyres: see `embed_images`) → logits `[B, T', V]` and loss. A model with its tower
        attached takes the images' tiles instead: `pixel_values [sum T_i, 3, S, S]` and each image's `num_tiles`.

        `segment_ids [B, T]` marks packed rows (several samples each, `vitune.train.data.collate_packed`): the LM
        then gets positions that restart per sample and no 2-D mask, from which transformers builds the
        block-diagonal causal mask (sdpa, eager, flex) or flash-attention's `cu_seqlens`, so no sample attends
        to another; the output's `segment_ids [B, T']` say which sample each logit belongs to."""
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("give image_features or pixel_values, not both")
            image_features = self.tower_features(pixel_values, num_tiles or [])
        spliced = self.splice(input_ids, attention_mask, image_features, labels=labels, image_sizes=image_sizes,
                              segment_ids=segment_ids)
        mask, positions = spliced.attention_mask, spliced.position_ids
        if spliced.segment_ids is not None:
            attn = getattr(self.lm.config, "_attn_implementation", None) or ""
            if attn.startswith("flash") and spliced.segment_ids.shape[0] > 1:
                # transformers derives cu_seqlens from position ids for a batch of one row only; more rows would
                # attend across samples silently
                raise ValueError(f"{attn} takes packed samples as one row; got {spliced.segment_ids.shape[0]} rows")
            mask, positions = None, packed_position_ids(spliced.segment_ids)
        out = self.lm(inputs_embeds=spliced.inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        loss, count = None, 0
        if spliced.labels is not None:
            loss, count = causal_lm_loss(out.logits, spliced.labels)
        return VLMOutput(loss=loss, logits=out.logits, labels=spliced.labels,
                         attention_mask=spliced.attention_mask, num_label_tokens=count,
                         segment_ids=spliced.segment_ids)

    def generate_stream(
        self,
        prompts: Sequence[Sequence[int]],
        image_features: Sequence[torch.Tensor | None] | None = None,
        **options: Any,
    ) -> Iterator[GenerationStep]:
        """Decode a batch with a KV cache, yielding each step's new tokens: `vitune.model.decoding.decode_stream`.

        `options`: `max_new_tokens`, `temperature`, `top_p`, `stop_token_ids`, `seed`, `image_sizes` (each
        prompt's image `(width, height)`, which an anyres model needs with its `[T_i, N, Dv]` tile features), as
        there.
        """
        return decode_stream(self, prompts, image_features, **options)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        image_features: Sequence[torch.Tensor | None] | None = None,
        **options: Any,
    ) -> list[list[int]]:
        """Batched decoding (options as `generate_stream`); each prompt's new token ids without the stop token."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in decode_stream(self, prompts, image_features, **options):
            for i, toks in enumerate(step.tokens):
                outputs[i].extend(toks)
        return outputs

    def freeze_for_stage(self, stage: str) -> dict[str, dict[str, int]]:
        """`freeze` with the stage's default parts (align: the projector; finetune: projector + LM)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
        return self.freeze(STAGE_TUNABLE_PARTS[stage], label=f"stage {stage}")

    def freeze(self, parts: Collection[str], label: str = "tunable parts") -> dict[str, dict[str, int]]:
        """Set `requires_grad` by LLaVA-NeXT's `mm_tunable_parts` names and log what trains and what is frozen.

        `mm_mlp_adapter` is the projector; `mm_language_model` is every parameter outside the tower and the
        projector, as LLaVA-NeXT's train.py unfreezes it: the LM and an anyres model's `image_newline` (frozen at
        its init in align). `mm_vision_tower` is the attached tower (`attach_tower`; a model without one cannot tune
        it); an attached tower left out of `parts` runs frozen in the step.
        """
        holds = {"mm_mlp_adapter", "mm_language_model"} | ({"mm_vision_tower"} if self.vision_tower is not None
                                                             else set())
        unknown = sorted(set(parts) - holds)
        if unknown:
            raise ValueError(f"cannot tune {', '.join(unknown)} here: this model holds the projector "
                             "(mm_mlp_adapter) and the LM (mm_language_model)"
                             + (" and the vision tower (mm_vision_tower)" if self.vision_tower is not None else ""))
        lm_trains = "mm_language_model" in parts
        train_groups = {"projector": "mm_mlp_adapter" in parts, "lm": lm_trains}
        if self.image_newline is not None:
            train_groups["image_newline"] = lm_trains
        if self.vision_tower is not None:
            train_groups["vision_tower"] = "mm_vision_tower" in parts
        counts: dict[str, dict[str, int]] = {}
        for group, trains in train_groups.items():
            part: nn.Module | nn.Parameter = getattr(self, group)
            if group == "vision_tower" and trains:
                part.make_trainable(part.grad_checkpointing)  # lifts the tower's own freeze (and its eval mode)
            else:
                part.requires_grad_(trains)
            n_params = part.numel() if isinstance(part, nn.Parameter) else sum(p.numel() for p in part.parameters())
            counts[group] = {"trainable": n_params if trains else 0, "frozen": 0 if trains else n_params}
            logger.info("%s: %s %s (%d parameters)", label, group, "trains" if trains else "frozen", n_params)
        total = sum(c["trainable"] for c in counts.values())
        if not total:
            raise ValueError(f"{label}: {', '.join(parts) or 'no part'} leaves nothing to train")
        logger.info("%s: %d trainable parameters in all", label, total)
        return counts


def _stop_ids(tokenizer: Any, lm: nn.Module) -> list[int]:
    """Default stop tokens: the tokenizer's EOS plus any the LM's generation config names."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = getattr(lm, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if config is not None else None
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys(ids))


def build_model(
    model_cfg: Any,
    tokenizer: Any,
    vision_hidden_size: int,
    dtype: torch.dtype | None = None,
    lm: nn.Module | None = None,
    recipe: VisionRecipe | None = None,
) -> VisionLanguageModel:
    """Build the VLM of a `ModelConfig`: LM by path (or the tiny preset) + a freshly initialised projector.

    Pass `lm` to reuse an already loaded language model (e.g. from a model folder), and `recipe` for an anyres
    model (its tiles are packed by the recipe; spatial_unpad adds a freshly initialised `image_newline`).
    """
    image_token_id = tokenizer_lib.image_token_id(tokenizer)
    if lm is None:
        lm = load_lm(model_cfg.lm, tokenizer, dtype)
    lm_width = lm.get_input_embeddings().embedding_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        projector = build_projector(model_cfg.projector, vision_hidden_size, lm_width)
    weight = lm.get_input_embeddings().weight
    projector.to(device=weight.device, dtype=weight.dtype)
    model = VisionLanguageModel(
        projector, lm, image_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=_stop_ids(tokenizer, lm),
        recipe=recipe,
    )
    logger.info(
        "model: projector %s (%d -> %d), LM %s (%d parameters), %s id %d",
        model_cfg.projector,
        vision_hidden_size,
        lm_width,
        model_cfg.lm,
        sum(p.numel() for p in lm.parameters()),
        IMAGE_TOKEN,
        image_token_id,
    )
    return model
