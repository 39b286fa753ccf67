"""The one decode loop: a batch of rows that prefill, step with a KV cache, sample, and join and leave.

Every decoder in vitune drives this module. `VisionLanguageModel.generate` / `generate_stream` (and through
them batch inference in evaluation) call `decode_stream`, which prefills all prompts at once and steps until
every row is done; the serving engine holds a `DecodeBatch` itself and admits and drops rows between steps
(continuous batching). The steps are the same for both:

- join: the new rows' prompts are left padded and spliced with their image features (`model.splice`), then
  prefilled into a fresh `DynamicCache`; a running batch pads its cache and the newcomers' on the left to
  one length and concatenates them on the batch axis;
- sample: each row's next token from the last logits, greedy at temperature 0, else nucleus sampling by
  inverse CDF (`sample_with_uniforms`): rows that share temperature and top_p sample in one call, each with a
  uniform from its own CPU generator (a seeded request) or the batch's;
- leave: `keep` drops finished rows from the cache (`batch_select_indices`) and trims cache columns that
  only padding used;
- step: the sampled tokens go through the LM one position further.

The model is driven only through its attributes (`splice`, `lm`, `pad_token_id`, `eos_token_ids`, `device`,
`image_token_id`), so this module does not import `vitune.model.vlm`; a row carries an opaque `payload` (the
engine's request), so it never imports `vitune.serve`. All KV-cache code lives here.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vitune import IMAGE_TOKEN


@dataclass
class GenerationStep:
    """One decoding step: per sequence the new token ids (`[]` once finished) and why it finished."""

    tokens: list[list[int]]
    finish_reasons: list[str | None]  # "stop" | "length" at the step a sequence ends, else None


def seeded_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or from fresh entropy when `seed` is None. Sampling draws one uniform
    per row from it (`sample_with_uniforms`), so its draws are the same on any device and cost one small copy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_with_uniforms(logits: torch.Tensor, temperature: float, top_p: float,
                         uniforms: torch.Tensor) -> torch.Tensor:
    """`[B, V]` logits → `[B]` next tokens by inverse CDF: row b takes the token where its cumulative
    (temperature-scaled, top_p-truncated) probability first exceeds `uniforms[b]` (in [0, 1)) of its mass."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p; the first always stays
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) > top_p, 0.0)
    cdf = probs.cumsum(dim=-1)  # [B, V], non-decreasing
    target = uniforms.to(device=cdf.device, dtype=cdf.dtype).unsqueeze(-1) * cdf[:, -1:]  # [B, 1]
    index = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)  # [B, 1]
    return (index if order is None else order.gather(-1, index)).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """`[B, V]` logits → `[B]` next tokens: argmax at temperature 0, else nucleus sampling with one uniform per
    row from `generator` (a CPU generator, `seeded_generator`)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    return sample_with_uniforms(logits, temperature, top_p, torch.rand(logits.shape[0], generator=generator))


@dataclass(eq=False)
class DecodeRow:
    """One sequence of a `DecodeBatch`: its prompt, sampling settings, progress and the caller's payload."""

    prompt_ids: Sequence[int]  # one <image> token per image, in reading order
    # the prompt's images' tower features in placeholder order: one [N, Dv] per image (anyres: its tiles'
    # [T, N, Dv], with its size), or that one tensor for a prompt of one image; None without images
    features: torch.Tensor | Sequence[torch.Tensor] | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    generator: torch.Generator | None = None  # None = the batch's shared generator
    payload: Any = None  # whatever the caller needs back with the row (the engine: its request)
    generated: int = 0  # tokens emitted so far (stop tokens are not emitted)
    finish_reason: str | None = None  # set when the row is done: "stop" | "length" | the caller's reason
    image_size: tuple[int, int] | None = None  # (width, height) of a one-image prompt: what anyres packs by
    # several images: each one's (width, height), None for an anyres image given as its base view alone
    image_sizes: Sequence[tuple[int, int] | None] | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")

    def image_features(self) -> list[torch.Tensor]:
        """The row's images' features, one tensor per image in placeholder order."""
        if self.features is None:
            return []
        return [self.features] if isinstance(self.features, torch.Tensor) else list(self.features)

    def sizes(self) -> list[tuple[int, int] | None]:
        """Each image's `(width, height)` (None where not given), one per image in placeholder order."""
        count = len(self.image_features())
        if self.image_sizes is not None:
            if len(self.image_sizes) != count:
                raise ValueError(f"{len(self.image_sizes)} image sizes for {count} images")
            return list(self.image_sizes)
        return [self.image_size] * count if count == 1 else [None] * count

    def accept(self, token: int, stops: Container[int]) -> list[int]:
        """Record the row's sampled `token`: the tokens to emit (`[]` for a stop token); sets `finish_reason`."""
        if token in stops:
            self.finish_reason = "stop"
            return []
        self.generated += 1
        if self.generated >= self.max_new_tokens:
            self.finish_reason = "length"
        return [token]


class DecodeBatch:
    """The rows decoding together: their KV cache, attention mask, next positions, logits and sampled tokens.

    Rows join by a prefill of their own whose cache is merged into the running one; rows leave through
    `keep`. Joining while rows run needs plain `DynamicLayer` caches (full attention); with other cache
    layers rows join only an empty batch (`can_join`).
    """

    def __init__(self, model: Any, generator: torch.Generator | None = None) -> None:
        self.model = model
        self.generator = generator if generator is not None else seeded_generator()
        self.rows: list[DecodeRow] = []
        self.cache: Any = None  # transformers DynamicCache
        self.mask: torch.Tensor | None = None  # [B, T] long
        self.positions: torch.Tensor | None = None  # [B, 1] long, each row's next position id
        self.logits: torch.Tensor | None = None  # [B, V] each row's next-token logits
        self.tokens: torch.Tensor | None = None  # [B] the tokens `sample` drew, fed by `step`

    def can_join(self) -> bool:
        # deferred: transformers is heavy and only decoding needs its cache classes
        from transformers.cache_utils import DynamicLayer

        return not self.rows or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def _inputs(self, rows: Sequence[DecodeRow]) -> tuple[torch.Tensor, torch.Tensor, Any, dict[str, Any]]:
        """Left-padded `input_ids` and `attention_mask` `[B, T]`, the features and `splice`'s other arguments.

        The images of all rows, row by row and within a row in placeholder order, are the splice's reading order.
        For a one-tile model given no sizes the features are stacked `[M, N, Dv]`; for an anyres model (or when
        rows give sizes) they go as a list of each image's `[T_i, N, Dv]` with `image_sizes` (None: an image
        given as its base view alone).
        """
        longest = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), longest), self.model.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
        features: list[torch.Tensor] = []
        sizes: list[tuple[int, int] | None] = []
        for i, row in enumerate(rows):
            mine = row.image_features()
            n_image = sum(1 for tok in row.prompt_ids if tok == self.model.image_token_id)
            if n_image != len(mine):
                raise ValueError(f"prompt {i} holds {n_image} {IMAGE_TOKEN} tokens but {len(mine)} images' features")
            features += mine
            sizes += row.sizes()
            if row.prompt_ids:
                input_ids[i, longest - len(row.prompt_ids) :] = torch.tensor(list(row.prompt_ids), dtype=torch.long)
                attention_mask[i, longest - len(row.prompt_ids) :] = 1
        if not features:
            return input_ids, attention_mask, None, {}
        if getattr(self.model, "recipe", None) is not None or any(size is not None for size in sizes):
            return input_ids, attention_mask, features, {"image_sizes": sizes}
        stacked = torch.stack([f[0] if f.dim() == 3 else f for f in features])  # [M, N, Dv], one tile each
        return input_ids, attention_mask, stacked, {}

    @torch.no_grad()
    def join(self, rows: Sequence[DecodeRow]) -> None:
        """Prefill `rows` and append them to the batch."""
        # deferred: transformers is heavy and only decoding needs its cache classes
        from transformers import DynamicCache

        if not rows:
            return
        if not self.can_join():
            raise RuntimeError("rows can join a running batch only when its cache layers are plain DynamicLayers")
        model = self.model
        input_ids, attention_mask, features, extra = self._inputs(rows)
        spliced = model.splice(input_ids, attention_mask, features, padding_side="left", **extra)
        cache = DynamicCache(config=model.lm.config)
        out = model.lm(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                       position_ids=spliced.position_ids, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]  # [B2, V]
        positions = spliced.position_ids[:, -1:] + 1  # [B2, 1]
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, spliced.attention_mask
            self.positions, self.logits, self.tokens = positions, logits, None
            return
        width = max(self.mask.shape[1], spliced.attention_mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(spliced.attention_mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])
        self.tokens = None
        self.rows += rows

    def sample(self) -> torch.Tensor:
        """Each row's next token `[B]`: greedy rows by argmax, the others by inverse CDF in one call per
        (temperature, top_p), each row's uniform drawn from its own generator (or the batch's shared one), so a
        seeded row draws the same whoever its neighbours are."""
        groups: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault((row.temperature, row.top_p), []).append(i)
        device = self.logits.device
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=device)
        for (temperature, top_p), members in groups.items():
            index = torch.tensor(members, device=device)
            if temperature == 0:
                tokens[index] = self.logits[index].argmax(dim=-1)
                continue
            own = [self.rows[i].generator for i in members]
            shared = iter(torch.rand(own.count(None), generator=self.generator).tolist())
            uniforms = torch.tensor([next(shared) if g is None else torch.rand(1, generator=g).item() for g in own])
            tokens[index] = sample_with_uniforms(self.logits[index], temperature, top_p, uniforms)
        self.tokens = tokens
        return tokens

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows at `indices` (in order); drop the cache columns no remaining row attends to."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache = self.mask = self.positions = self.logits = self.tokens = None
            return
        index = torch.tensor(list(indices), dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        if self.tokens is not None:
            self.tokens = self.tokens[index]
        unused = int(self.mask.any(dim=0).long().argmax())  # leading columns that are padding for every row
        if unused and self.can_join():
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    @torch.no_grad()
    def step(self) -> None:
        """Feed each row its sampled token; the logits become those of the token after it."""
        if self.tokens is None:
            raise RuntimeError("step() feeds the tokens sample() drew; call sample() first")
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)  # [B, T+1]
        out = self.model.lm(input_ids=self.tokens[:, None].to(self.model.device), attention_mask=self.mask,
                            position_ids=self.positions, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.logits = out.logits[:, -1, :]
        self.positions = self.positions + 1
        self.tokens = None


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` on the left of `dim` to `width` (cache entries and mask columns of padding)."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _size_fields(size: Any) -> dict[str, Any]:
    """`decode_stream`'s per-prompt size as `DecodeRow` fields: one `(w, h)`, or a list of them (or None)."""
    if size is None:
        return {}
    if len(size) == 2 and not any(v is None or isinstance(v, tuple | list) for v in size):  # (w, h) numbers
        return {"image_size": (int(size[0]), int(size[1]))}
    return {"image_sizes": list(size)}


@torch.no_grad()
def decode_stream(
    model: Any,
    prompts: Sequence[Sequence[int]],
    image_features: Sequence[torch.Tensor | None] | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    image_sizes: Sequence[tuple[int, int] | None] | None = None,
) -> Iterator[GenerationStep]:
    """Decode `prompts` together, yielding each step's new tokens (stop tokens are not emitted).

    `prompts` are token id lists, each holding any number of `<image>` tokens; `image_features[i]` is
    `[N, Dv]` for a prompt with one image, a list of those in placeholder order for several, and None without;
    for an anyres model each image's are its tile features `[T_i, N, Dv]` and `image_sizes[i]` its
    `(width, height)` (a list of them for several images). Greedy at `temperature == 0`, nucleus
    sampling otherwise from one generator seeded by `seed` (fresh entropy when None). Stops at
    `stop_token_ids` (default: the model's EOS ids). Finished rows stay in the batch until all are done,
    so every row sees the same batch at every step.
    """
    if image_features is None:
        image_features = [None] * len(prompts)
    if len(image_features) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(image_features)} image_features entries")
    if image_sizes is None:
        image_sizes = [None] * len(prompts)
    if len(image_sizes) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(image_sizes)} image_sizes entries")
    rows = [DecodeRow(prompt, feats, max_new_tokens, temperature, top_p, **_size_fields(size))
            for prompt, feats, size in zip(prompts, image_features, image_sizes, strict=True)]
    if not rows or max_new_tokens <= 0:
        return
    stops = set(model.eos_token_ids if stop_token_ids is None else stop_token_ids)
    batch = DecodeBatch(model, seeded_generator(seed))
    batch.join(rows)
    while True:
        tokens = batch.sample().tolist()
        emitted: list[list[int]] = []
        reasons: list[str | None] = []
        for row, token in zip(rows, tokens, strict=True):
            done = row.finish_reason is not None
            emitted.append([] if done else row.accept(token, stops))
            reasons.append(None if done else row.finish_reason)
        yield GenerationStep(emitted, reasons)
        if all(row.finish_reason is not None for row in rows):
            return
        batch.step()
