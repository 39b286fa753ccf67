"""Stage-2 training-step throughput on one GPU, packing on and off: tokens/s, MFU, peak memory, data wait.

    python benchmarks/gpu/stage2_step.py                 # 7B as LLaVA-1.5 (pad) and 1.6 (anyres), 0.5B OneVision
    python benchmarks/gpu/stage2_step.py --tiny          # tiny shapes on CPU, in seconds (the CPU test runs it)

Needs only torch and transformers (no Ray, DeepSpeed, open_clip or network): the language models are built at
random from their configs and the features are drawn at random in the feature store's format, fp16 ``[T, N, D]``
per image (``T`` tiles of ``N`` patch features, ``T = 1`` for pad). vitune's torch-only modules do the rest,
so the step is vitune's: the projector (``model.projector``), the AnyRes packing of tiles into visual tokens
with the learned newline (``model.anyres``, counts from ``vision_recipe.visual_tokens``), LLaVA's
modality-grouped order (``train.sampler``) and the first-fit-decreasing packer (``train.packing``).

What a step is: a micro-batch through projector + LM (``inputs_embeds``, the visual tokens written in through
an image mask), the causal-LM loss on the answer tokens, backward, and AdamW over every parameter of projector
and LM (stage 2 tunes both; the tower is not in the step, its features come from the store). Parameters,
gradients and AdamW's two moments are all bf16 (8 bytes a parameter, so the 7B's 54 GB fits an 80 GB card with
gradient checkpointing); a mixed-precision job with fp32 master weights (16 bytes a parameter, ZeRO-sharded
across GPUs in vitune's real jobs) runs the same bf16 matmuls, so tokens/s and MFU carry over, memory does not.

Packing off is LLaVA's ``group_by_modality_length`` order cut into micro-batches of ``--batch`` samples padded
to their longest (2-D attention mask). Packing on takes the same order in windows of ``--window`` samples,
packs each window first-fit-decreasing into rows of at most the budget (the shape's ``max_length``) and feeds
``--batch`` rows a step: the same tensor bound ``[batch, max_length]``, more samples in it. A packed row has no
2-D mask: position ids restart at each sample and transformers reads the restarts as boundaries (SDPA:
``masking_utils.find_packed_sequence_indices`` builds a block-diagonal causal mask; flash-attention 2: the
micro-batch is flattened into one row with no padding at all and ``cu_seqlens`` come from the position ids).
Each sample's first label is ignored, so no token is trained to predict the next sample. Before the cases,
``packing_check`` shows on the machine itself that a packed sample's logits equal the sample's alone and that
a row whose positions do not restart gives different ones (the run stops with exit 1 otherwise).

The sample mix (``sample_mix``), stated: LLaVA-665K's shape, about 6% text-only conversations (its ShareGPT
share) and single-image ones otherwise; an image's size drawn from ``IMAGE_SIZES`` (COCO, GQA/VG, TextVQA-like
sizes), its visual tokens from the recipe; text tokens log-normal, median 150 (sigma 0.8) with an image and 600
(sigma 0.9) without, a 35-token system prompt first, 60% of the rest trained; a sample is cut at ``max_length``.

Printed: one Markdown row per (model, packing): real (non-pad) tokens/s, the padding share, MFU, peak memory
and the data-wait share (batches are built in a background thread; the wait is the time a step blocks on it).
MFU = model FLOPs / (step time x the device's bf16 dense peak), model FLOPs = 6 x (LM matmul parameters:
decoder layers + LM head, not the embedding lookup) x real tokens + 6 x projector parameters x tile features +
attention 12 x layers x (heads x head_dim) x s^2 summed per sample (the work a sample needs, the same number
packed or not; gradient checkpointing's recompute not counted, as in PaLM's MFU). Exits 1 if any case fails
(out of memory included: the row says so and the other cases still run).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import logging
import math
import queue
import random
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))  # vitune's torch-only modules

from vitune import IGNORE_INDEX  # noqa: E402
from vitune.model.anyres import pack_image_features  # noqa: E402
from vitune.model.projector import build_projector  # noqa: E402
from vitune.train.packing import first_fit_decreasing, position_ids  # noqa: E402
from vitune.train.sampler import modality_grouped_order  # noqa: E402
from vitune.vision_recipe import VisionRecipe, tiles_for, visual_tokens  # noqa: E402

log = logging.getLogger("benchmarks.gpu.stage2_step")

# bf16 dense peak TFLOPs (no sparsity), matched on torch.cuda.get_device_name(): first match wins
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))

# (width, height, weight): the image sizes of LLaVA-665K's sources, roughly as often as they occur there
IMAGE_SIZES = ((640, 480, 0.35), (640, 427, 0.20), (480, 640, 0.10), (500, 375, 0.10), (1280, 720, 0.10),
               (800, 600, 0.05), (1024, 768, 0.05), (336, 336, 0.05))
TEXT_ONLY_SHARE = 0.061  # LLaVA-665K: 40,688 ShareGPT conversations of 665,298
SYSTEM_TOKENS = 35  # the conversation template's system prompt, before the image
TRAINED_SHARE = 0.6  # of the text after the system prompt: the answers

LLAVA_16_GRID = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # (h, w), CLIP-336 tiles


@dataclass(frozen=True)
class Shape:
    """A model shape: the LM's config, the tower's feature geometry (the recipe) and the step's sizes."""

    name: str
    lm: dict  # the transformers config: its model_type and fields
    recipe: VisionRecipe
    max_length: int  # samples are cut here; the packing budget
    batch: int  # samples a step unpacked, rows a step packed
    text_scale: float = 1.0  # tiny shapes shrink the text lengths with the visual ones


def _clip_336(mode: str) -> VisionRecipe:
    """CLIP ViT-L/14-336's features (1024-d, 24x24 = 576 a tile), pad or LLaVA-1.6's AnyRes grid."""
    anyres = {"grid_pinpoints": LLAVA_16_GRID} if mode == "anyres" else {}
    return VisionRecipe(tower="ViT-L-14-336", pretrained=None, feature_layer=-2, select="patch", image_mode=mode,
                        image_size=336, patch_size=14, hidden_size=1024, **anyres)


def _siglip_384() -> VisionRecipe:
    """SigLIP so400m-14-384's features (1152-d, 27x27 = 729 a tile), OneVision's anyres_max_9 over (1x1)..(6x6)."""
    grid = tuple((r * 384, c * 384) for r in range(1, 7) for c in range(1, 7))
    return VisionRecipe(tower="ViT-SO400M-14-SigLIP-384", pretrained=None, feature_layer=-1, select="patch",
                        image_mode="anyres", image_size=384, patch_size=14, hidden_size=1152, grid_pinpoints=grid,
                        max_tiles=9)


LLAMA_2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
QWEN2_0_5B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
# RoPE's base (Llama-2 10,000, Qwen2 1,000,000) changes no FLOP: left at the config's default, so the field's
# name, which moved between transformers 4 and 5 (rope_theta / rope_parameters), does not matter here


def _tiny(base: dict, recipe: VisionRecipe, **lm: int) -> tuple[dict, VisionRecipe]:
    """A base config shrunk (its family and field names kept) and its recipe at 56-px tiles of 14-px patches."""
    grid = tuple((h // recipe.image_size * 56, w // recipe.image_size * 56) for h, w in recipe.grid_pinpoints)
    return {**base, **lm}, dataclasses.replace(recipe, image_size=56, hidden_size=32, grid_pinpoints=grid)


SHAPES = {
    # LLaVA-1.6 Vicuna-7B: Llama-2-7B, mlp2x_gelu from CLIP-336, anyres; model_max_length 4096 as its scripts
    "llava-7b": Shape("llava-7b", LLAMA_2_7B, _clip_336("anyres"), max_length=4096, batch=2),
    "llava-7b-pad": Shape("llava-7b-pad", LLAMA_2_7B, _clip_336("pad"), max_length=4096, batch=2),  # LLaVA-1.5
    # LLaVA-OneVision Qwen2-0.5B: SigLIP-384, anyres_max_9 (IMAGE_SIZES make 2-9 tiles, 1,485-5,967 visual tokens)
    "qwen2-0.5b": Shape("qwen2-0.5b", QWEN2_0_5B, _siglip_384(), max_length=8192, batch=2),
}
_tiny_llama = _tiny(LLAMA_2_7B, _clip_336("anyres"), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
_tiny_llama_pad = (_tiny_llama[0], dataclasses.replace(_tiny_llama[1], image_mode="pad", grid_pinpoints=()))
_tiny_qwen = _tiny(QWEN2_0_5B, _siglip_384(), hidden_size=56, intermediate_size=112, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=640, max_position_embeddings=512)
TINY_SHAPES = {
    "tiny-llava-pad": Shape("tiny-llava-pad", *_tiny_llama_pad, max_length=384, batch=2, text_scale=0.1),
    "tiny-llava": Shape("tiny-llava", *_tiny_llama, max_length=384, batch=2, text_scale=0.1),
    "tiny-qwen2": Shape("tiny-qwen2", *_tiny_qwen, max_length=512, batch=2, text_scale=0.1),
}
DEFAULT_SHAPES = ("llava-7b-pad", "llava-7b", "qwen2-0.5b")


def shape_named(name: str) -> Shape:
    """The shape ``name``; an error listing the valid names on an unknown one."""
    known = {**SHAPES, **TINY_SHAPES}
    if name not in known:
        raise ValueError(f"unknown shape {name!r}; valid: {', '.join(known)}")
    return known[name]


# ----------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Sample:
    """One conversation's layout after the visual-token splice: system, image, the rest of the text."""

    system: int  # text tokens before the image
    image: tuple[int, int] | None  # (width, height), or None for a text-only sample
    visual: int  # visual tokens of the image (0 without one)
    text: int  # text tokens after the image
    trained: int  # of those, the last ``trained`` are labelled

    @property
    def length(self) -> int:
        return self.system + self.visual + self.text


def sample_mix(shape: Shape, n: int, seed: int) -> list[Sample]:
    """``n`` samples drawn from the stated LLaVA-665K-like mix (module docstring), cut at ``max_length``."""
    rng = random.Random(seed)
    sizes, weights = [s[:2] for s in IMAGE_SIZES], [s[2] for s in IMAGE_SIZES]
    out = []
    for _ in range(n):
        text_only = rng.random() < TEXT_ONLY_SHARE
        image = None if text_only else rng.choices(sizes, weights)[0]
        visual = visual_tokens(shape.recipe, *image) if image else 0
        median, sigma = (600, 0.9) if text_only else (150, 0.8)
        text = max(2, round(rng.lognormvariate(math.log(median * shape.text_scale), sigma)))
        system = min(round(SYSTEM_TOKENS * shape.text_scale) or 1, text - 1)
        rest = min(text - system, shape.max_length - system - visual)
        if rest < 1:
            raise ValueError(f"shape {shape.name}: an image of {image} makes {visual} visual tokens, no room for text "
                             f"within max_length {shape.max_length}")
        out.append(Sample(system, image, visual, rest, max(1, round(rest * TRAINED_SHARE))))
    return out


def micro_batches(samples: Sequence[Sample], shape: Shape, packed: bool, steps: int, window: int, budget: int,
                  seed: int) -> list[list[list[int]]]:
    """``steps`` micro-batches, each a list of rows, each row the indices of its samples.

    Both modes read LLaVA's modality-grouped order (megabatches of ``batch x 8`` samples, as one rank of an
    8-GPU job sees them). Unpacked: ``batch`` samples a micro-batch, one a row. Packed: each window of
    ``window`` samples packed first-fit-decreasing into rows of at most ``budget`` tokens (a window holds one
    modality but at its edges, as the sampler's megabatches do), ``batch`` rows a micro-batch.
    """
    lengths = [s.length for s in samples]
    order = modality_grouped_order(lengths, [s.image is not None for s in samples], shape.batch, 8, seed)
    batches: list[list[list[int]]] = []
    if not packed:
        for start in range(0, len(order) - shape.batch + 1, shape.batch):
            batches.append([[i] for i in order[start:start + shape.batch]])
    else:
        rows: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            rows += [[chunk[k] for k in row] for row in first_fit_decreasing([lengths[i] for i in chunk], budget)]
        batches = [rows[k:k + shape.batch] for k in range(0, len(rows) - shape.batch + 1, shape.batch)]
    if len(batches) < steps:
        raise ValueError(f"{len(samples)} samples make {len(batches)} micro-batches, fewer than the {steps} steps")
    return batches[:steps]


@dataclass
class Batch:
    """One micro-batch on the host, pinned when a GPU will read it."""

    input_ids: torch.Tensor  # [R, S] long
    labels: torch.Tensor  # [R, S] long, IGNORE_INDEX off the answers
    position_ids: torch.Tensor  # [R, S] long, restarting at every sample
    attention_mask: torch.Tensor | None  # [R, S] long unpacked; None packed (boundaries from the position ids)
    image_mask: torch.Tensor  # [R, S] bool, where visual tokens go
    features: torch.Tensor  # [sum T, N, D] fp16, every image's tiles in the order their tokens appear
    tiles: list[int]  # tiles per image
    sizes: list[tuple[int, int]]  # (width, height) per image
    real_tokens: int  # sample tokens (not padding)
    tile_tokens: int  # features through the projector (sum T x N)
    attention_flops: float  # 12 x L x (heads x head_dim) x s^2 summed over samples


class FeaturePool:
    """Random fp16 features in the store's layout, ``[T, N, D]`` per image, drawn once per image size.

    A batch gathers its images' arrays from here, as the trainer gathers rows read from the store (from page
    cache, not over the network), so the data thread does a store read's copying, not random number generation.
    """

    def __init__(self, recipe: VisionRecipe, copies: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        n, d = recipe.tokens_per_tile, recipe.hidden_size
        self._arrays = {(w, h): [torch.randn(tiles_for(recipe, w, h), n, d, generator=g).to(torch.float16)
                                 for _ in range(copies)] for w, h, _ in IMAGE_SIZES}
        self._turn = 0

    def get(self, size: tuple[int, int]) -> torch.Tensor:
        arrays = self._arrays[size]
        self._turn += 1
        return arrays[self._turn % len(arrays)]


def build_batch(rows: Sequence[Sequence[int]], samples: Sequence[Sample], pool: FeaturePool, shape: Shape,
                packed: bool, flatten: bool, pin: bool, rng: torch.Generator) -> Batch:
    """The tensors of one micro-batch (``flatten``: the packed rows laid end to end as one row, no padding)."""
    if flatten:
        rows = [[i for row in rows for i in row]]
    lm, vocab = shape.lm, shape.lm["vocab_size"]
    head_dim = lm["hidden_size"] // lm["num_attention_heads"]
    width = max(sum(samples[i].length for i in row) for row in rows)
    r = len(rows)
    input_ids = torch.randint(0, vocab, (r, width), generator=rng)
    labels = torch.full((r, width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((r, width), dtype=torch.long)
    attention = torch.zeros((r, width), dtype=torch.long)
    image_mask = torch.zeros((r, width), dtype=torch.bool)
    features, tiles, sizes = [], [], []
    real = attn = 0
    for k, row in enumerate(rows):
        lengths = [samples[i].length for i in row]
        used = sum(lengths)
        pad = width - used
        # packed: the tail is a sequence of its own (positions from 0), attending to nothing real
        pos[k] = torch.tensor(position_ids(lengths + [pad] if pad and packed else lengths) + ([] if packed else
                              list(range(used, width))))
        attention[k, :used] = 1
        at = 0
        for i in row:
            s = samples[i]
            if s.image is not None:
                image_mask[k, at + s.system:at + s.system + s.visual] = True
                f = pool.get(s.image)
                features.append(f)
                tiles.append(f.shape[0])
                sizes.append(s.image)
            end = at + s.length
            labels[k, end - s.trained:end] = input_ids[k, end - s.trained:end]
            at = end
            attn += 12 * lm["num_hidden_layers"] * lm["num_attention_heads"] * head_dim * s.length ** 2
        real += used
    n, d = shape.recipe.tokens_per_tile, shape.recipe.hidden_size
    feats = torch.cat(features) if features else torch.zeros((0, n, d), dtype=torch.float16)
    batch = Batch(input_ids, labels, pos, None if packed else attention, image_mask, feats, tiles, sizes, real,
                  feats.shape[0] * n, float(attn))
    if pin:
        for name in ("input_ids", "labels", "position_ids", "attention_mask", "image_mask", "features"):
            t = getattr(batch, name)
            if t is not None:
                setattr(batch, name, t.pin_memory())
    return batch


class Prefetcher:
    """Builds the micro-batches in a background thread, ``depth`` ahead; ``next()`` re-raises its errors."""

    _DONE = object()

    def __init__(self, make: Iterator[Batch], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True, name="stage2-data")
        self._thread.start()

    def _run(self, make: Iterator[Batch]) -> None:
        try:
            for batch in make:
                if not self._put(batch):
                    return
            self._put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless the consumer has closed the feed (then False: it reads no more)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"the data thread failed: {item}") from item
        if item is self._DONE:
            raise RuntimeError("the data thread ran out of micro-batches")
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------- the model


class Stage2Model(nn.Module):
    """Projector + causal LM, the visual tokens written into the embeddings through the image mask."""

    def __init__(self, lm: nn.Module, recipe: VisionRecipe):
        super().__init__()
        self.lm = lm
        self.recipe = recipe
        hidden = lm.config.hidden_size
        self.projector = build_projector("mlp2x_gelu", recipe.hidden_size, hidden)
        self.image_newline = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))  # LLaVA-NeXT's init

    def forward(self, batch: Batch) -> object:
        """transformers' output for the batch: ``loss`` (mean over the answer tokens) and ``logits`` ``[R, S, V]``."""
        embeds = self.lm.get_input_embeddings()(batch.input_ids)  # [R, S, H]
        if batch.tiles:
            projected = self.projector(batch.features.to(embeds.dtype))  # [sum T, N, H]
            if self.recipe.image_mode == "anyres":
                visual = torch.cat([pack_image_features(t, self.recipe, w, h, self.image_newline)
                                    for t, (w, h) in zip(projected.split(batch.tiles), batch.sizes, strict=True)])
            else:
                visual = projected.flatten(0, 1)
            embeds = embeds.masked_scatter(batch.image_mask[..., None], visual.to(embeds.dtype))
        return self.lm(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                       labels=batch.labels, use_cache=False)


def build_model(shape: Shape, attn: str, device: torch.device, dtype: torch.dtype, checkpointing: bool) -> Stage2Model:
    """The shape's LM at random from its config, and projector + newline, on ``device`` in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(shape.lm)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    import transformers

    # transformers 4.56 renamed torch_dtype to dtype; an older one would ignore the new name and build fp32
    key = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, **{key: dtype})
        model = Stage2Model(lm, shape.recipe).to(device=device, dtype=dtype)
    if checkpointing:  # transformers 5 renamed it; 4's name still works there, with a warning
        enable = getattr(lm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    model.train()
    return model


def matmul_params(model: Stage2Model) -> tuple[int, int]:
    """(LM parameters every token multiplies: decoder layers + LM head; the projector's parameters)."""
    lm = model.lm
    layers = sum(p.numel() for p in lm.model.layers.parameters())
    return layers + lm.get_output_embeddings().weight.numel(), sum(p.numel() for p in model.projector.parameters())


def _sample_slice(batch: Batch, start: int, end: int, image: int | None) -> Batch:
    """One sample of a one-row packed batch, alone (its own positions from 0, its image's tiles only)."""
    first = sum(batch.tiles[:image]) if image is not None else 0
    tiles = batch.tiles[image:image + 1] if image is not None else []
    return Batch(batch.input_ids[:, start:end], batch.labels[:, start:end],
                 torch.arange(end - start, device=batch.input_ids.device)[None], None, batch.image_mask[:, start:end],
                 batch.features[first:first + sum(tiles)], tiles, batch.sizes[image:image + 1] if tiles else [],
                 end - start, 0, 0.0)


def packing_check(attn: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Packed attention stays inside each sample, on this device and transformers: the evidence, measured.

    Three samples of the tiny LLaVA shape in one packed row (as the packed cases feed them): each sample's
    logits there against the same sample run alone (``leak_free``, relative max difference), and against the
    same row with positions that do not restart (``leaking``: one long causal sequence, what a packer without
    boundaries computes). ``ok`` when the packed row matches within the dtype's noise and the leaking one does
    not, so the check can tell the two apart on the machine it runs on.
    """
    shape = TINY_SHAPES["tiny-llava"]
    with_image = [s for s in sample_mix(shape, 32, seed) if s.image is not None]
    samples = [with_image[0], with_image[1], dataclasses.replace(with_image[2], text=40, trained=20)]
    model = build_model(shape, attn, device, dtype, checkpointing=False).eval()
    flatten = attn == "flash_attention_2"
    packed = _to(build_batch([[0, 1, 2]], samples, FeaturePool(shape.recipe, 1, seed), shape, True, flatten, False,
                             torch.Generator().manual_seed(seed)), device)
    leaking = dataclasses.replace(packed, position_ids=torch.arange(packed.input_ids.shape[1], device=device)[None])
    worst = {"leak_free": 0.0, "leaking": 0.0}
    with torch.no_grad():
        together = model(packed).logits.float()
        mixed = model(leaking).logits.float()
        at = 0
        for k, s in enumerate(samples):
            alone = model(_sample_slice(packed, at, at + s.length, k)).logits.float()[0]
            scale = alone.abs().max().item()
            for key, row in (("leak_free", together), ("leaking", mixed)):
                worst[key] = max(worst[key], (row[0, at:at + s.length] - alone).abs().max().item() / scale)
            at += s.length
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return {**worst, "tolerance": tolerance,
            "ok": worst["leak_free"] <= tolerance < worst["leaking"] and worst["leaking"] > 4 * worst["leak_free"]}


# ----------------------------------------------------------------------------------------------- the run


def device_peak(device: torch.device, override: float | None) -> tuple[str, float | None]:
    """The device's name and bf16 dense peak TFLOPs (``--peak-tflops`` first; None where unknown)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if override:
        return name, override
    for key, peak in PEAK_TFLOPS:
        if device.type == "cuda" and key.lower() in name.lower():
            return name, peak
    return name, None


def pick_attention(requested: str, device: torch.device) -> str:
    """``auto``: flash-attention 2 where it is installed and a GPU runs, SDPA otherwise."""
    if requested != "auto":
        return requested
    return "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def _to(batch: Batch, device: torch.device) -> Batch:
    moved = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    for name, value in moved.items():
        if isinstance(value, torch.Tensor):
            moved[name] = value.to(device, non_blocking=True)
    return Batch(**moved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(model: Stage2Model, optimizer: torch.optim.Optimizer, shape: Shape, packed: bool, attn: str,
             args: argparse.Namespace, device: torch.device, peak: float | None) -> dict:
    """Warm-up then timed steps of one (model, packing) case: its row."""
    samples = sample_mix(shape, args.samples, args.seed)
    steps = args.warmup + args.steps
    budget = args.pack_budget or shape.max_length
    plan = micro_batches(samples, shape, packed, steps, args.window, budget, args.seed)
    pool = FeaturePool(shape.recipe, copies=2, seed=args.seed)
    flatten = packed and attn == "flash_attention_2"
    rng = torch.Generator().manual_seed(args.seed)
    pin = device.type == "cuda"
    feed = Prefetcher(build_batch(rows, samples, pool, shape, packed, flatten, pin, rng) for rows in plan)
    n_lm, n_proj = matmul_params(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals = {"time": 0.0, "wait": 0.0, "real": 0, "slots": 0, "flops": 0.0, "samples": 0, "loss": 0.0}
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            host = feed.next()
            t1 = time.perf_counter()
            batch = _to(host, device)
            loss = model(batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            t2 = time.perf_counter()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"step {step}: the loss is {loss.item()}")
            if step >= args.warmup:
                totals["time"] += t2 - t0
                totals["wait"] += t1 - t0
                totals["real"] += host.real_tokens
                totals["slots"] += host.input_ids.numel()
                totals["samples"] += sum(len(r) for r in plan[step])
                totals["loss"] = loss.item()
                totals["flops"] += 6 * n_lm * host.real_tokens + 6 * n_proj * host.tile_tokens + host.attention_flops
    finally:
        feed.close()
    achieved = totals["flops"] / totals["time"] / 1e12
    return {
        "model": shape.name, "packing": "on" if packed else "off", "attention": attn, "steps": args.steps,
        "samples_per_step": totals["samples"] / args.steps,
        "tokens_per_s": totals["real"] / totals["time"],
        "padding_share": 1 - totals["real"] / totals["slots"],
        "tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "data_wait_share": totals["wait"] / totals["time"],
        "step_s": totals["time"] / args.steps,
        "loss": totals["loss"],
        "status": "ok",
    }


COLUMNS = ("model", "packing", "attention", "samples/step", "real tokens/s", "padding share", "TFLOPs", "MFU",
           "peak memory GiB", "data wait share", "step s", "status")


def format_row(row: dict) -> str:
    """One Markdown table row (``n/a`` where a figure does not apply, ``-`` where the case failed)."""
    if row["status"] != "ok":
        cells = [row["model"], row["packing"], row.get("attention", "-")] + ["-"] * 8 + [row["status"]]
    else:
        def num(v: float | None, fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        cells = [row["model"], row["packing"], row["attention"], f"{row['samples_per_step']:.2f}",
                 f"{row['tokens_per_s']:.0f}", f"{row['padding_share']:.3f}", f"{row['tflops']:.3g}",
                 num(row["mfu"], ".3f"), num(row["peak_memory_gib"], ".1f"), f"{row['data_wait_share']:.3f}",
                 f"{row['step_s']:.3f}", "ok"]
    return "| " + " | ".join(cells) + " |"


def _failure(shape: Shape, packed: bool, attn: str, error: BaseException) -> dict:
    kind = "OOM" if isinstance(error, torch.OutOfMemoryError) else type(error).__name__
    log.error("%s packing %s failed: %s: %s", shape.name, "on" if packed else "off", kind, error,
              exc_info=not isinstance(error, torch.OutOfMemoryError))
    return {"model": shape.name, "packing": "on" if packed else "off", "attention": attn,
            "status": f"FAILED ({kind})"}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny shapes, on CPU unless --device says otherwise")
    p.add_argument("--shapes", nargs="+", help=f"default {' '.join(DEFAULT_SHAPES)} (--tiny: the tiny ones); "
                   f"valid: {', '.join([*SHAPES, *TINY_SHAPES])}")
    p.add_argument("--packing", choices=("both", "on", "off"), default="both")
    p.add_argument("--steps", type=int, default=None, help="timed steps a case (default 15; --tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny 1)")
    p.add_argument("--samples", type=int, default=2048, help="samples drawn from the mix a case")
    p.add_argument("--batch", type=int, default=None, help="samples (off) / rows (on) a step, for every shape "
                   "(default the shape's: 2)")
    p.add_argument("--window", type=int, default=256, help="samples the packer sees at once")
    p.add_argument("--pack-budget", type=int, default=None, help="tokens a packed row holds (default max_length)")
    p.add_argument("--attn", choices=("auto", "sdpa", "flash_attention_2", "eager"), default="auto")
    p.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off (on by default)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--device", default=None, help="default cuda where there is one (--tiny: cpu)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 dense peak, if not in the table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the check and the rows to this file as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    t_start = time.perf_counter()
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    try:
        shapes = [shape_named(n) for n in (args.shapes or (TINY_SHAPES if args.tiny else DEFAULT_SHAPES))]
    except ValueError as e:
        p.error(str(e))
    if args.batch is not None:
        if args.batch < 1:
            p.error("--batch must be at least 1")
        shapes = [dataclasses.replace(s, batch=args.batch) for s in shapes]
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    name, peak = device_peak(device, args.peak_tflops)
    attn = pick_attention(args.attn, device)
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.packing]
    torch.manual_seed(args.seed)
    sys.stdout.write(f"device: {name}; bf16 dense peak: {f'{peak:g} TFLOPs' if peak else 'unknown (MFU n/a)'}; "
                     f"torch {torch.__version__}; attention {attn}; gradient checkpointing "
                     f"{'off' if args.no_checkpointing else 'on'}; AdamW on bf16 parameters and states; "
                     f"{args.warmup} warm-up + {args.steps} timed steps a case\n\n")
    check = packing_check(attn, device, torch.bfloat16, args.seed)
    sys.stdout.write(f"packing check ({attn}, bf16): a packed sample's logits differ from it alone by "
                     f"{check['leak_free']:.2e} (tolerance {check['tolerance']:g}); with positions that do not "
                     f"restart by {check['leaking']:.2e}: {'ok' if check['ok'] else 'FAILED'}\n\n")
    if not check["ok"]:
        log.error("packed attention crosses sample boundaries (or the check cannot tell): the packed rows would be "
                  "wrong on this transformers (%s) and attention (%s)", __import__("transformers").__version__, attn)
        return 1
    sys.stdout.write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
    sys.stdout.flush()
    rows = []
    model = optimizer = built = None
    for shape in shapes:
        # shapes that differ in their recipe only (llava-7b-pad, llava-7b) share one model and optimizer
        key = (json.dumps(shape.lm, sort_keys=True), shape.recipe.hidden_size)
        if key != built:
            model = optimizer = built = None
            _free(device)
            error = None
            try:
                t_build = time.perf_counter()
                model = build_model(shape, attn, device, torch.bfloat16, not args.no_checkpointing)
                optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
                built = key
                log.info("%s: %.1fM parameters, built in %.1f s", shape.name,
                         sum(q.numel() for q in model.parameters()) / 1e6, time.perf_counter() - t_build)
            except Exception as e:  # noqa: BLE001 - reported as this shape's rows, the run goes on and exits 1
                error = [_failure(shape, packed, attn, e) for packed in modes]
            if error:  # out of the except block: its traceback, which holds the tensors, is gone
                rows += error
                sys.stdout.write("".join(format_row(r) + "\n" for r in error))
                model = optimizer = None
                _free(device)
                continue
        model.recipe = shape.recipe
        for packed in modes:
            try:
                row = run_case(model, optimizer, shape, packed, attn, args, device, peak)
            except Exception as e:  # noqa: BLE001 - as above
                row = _failure(shape, packed, attn, e)
            if row["status"] != "ok":  # free the failed step's tensors (an OOM's) before the next case
                optimizer.zero_grad(set_to_none=True)
                _free(device)
            rows.append(row)
            sys.stdout.write(format_row(row) + "\n")
            sys.stdout.flush()
    model = optimizer = None
    _free(device)
    elapsed = time.perf_counter() - t_start
    failed = [r for r in rows if r["status"] != "ok"]
    sys.stdout.write(f"\nelapsed: {elapsed:.0f} s; {len(rows) - len(failed)} of {len(rows)} cases ok\n")
    if elapsed > 480 and not args.shapes and args.steps == 15:
        log.warning("the default run took %.0f s, over its 8-minute bound: a slower device, or a regression", elapsed)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "peak_tflops": peak, "attention": attn,
                                               "torch": torch.__version__, "packing_check": check, "rows": rows,
                                               "elapsed_s": elapsed}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
