"""The one decode loop: a batch of rows (prefill, one step at a time, sampling) that rows join and leave."""

from __future__ import annotations

from typing import Any


class _Batch:
    """The rows decoding on a replica: their jobs, KV cache, attention mask, next positions and logits.

    The same steps as `VisionLanguageModel.generate_stream` (left-padded splice, prefill, one token per
    step with the cache), kept as state so rows can join and leave between steps. Rows join by a prefill
    of their own, whose cache is left-padded to the running cache's length and concatenated on the batch
    axis; leaving rows are dropped with the cache's `batch_select_indices`. Joining while rows run needs
    plain `DynamicLayer` caches (full attention); with other cache layers rows join only an empty batch.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.jobs: list[Any] = []
        self.cache: Any = None
        self.mask: Any = None  # [B, T] long
        self.positions: Any = None  # [B, 1] long, each row's next position id
        self.logits: Any = None  # [B, V] each row's next-token logits

    def can_join(self) -> bool:
        from transformers.cache_utils import DynamicLayer

        return not self.jobs or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def add(self, jobs: list[Any], features: list[Any]) -> None:
        """Prefill `jobs` (features `[N, Dv]` or None each) and append them as rows."""
        import torch
        from transformers import DynamicCache

        model = self.model
        longest = max(len(j.prompt_ids) for j in jobs)
        input_ids = torch.full((len(jobs), longest), model.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(jobs), longest, dtype=torch.long)
        for i, job in enumerate(jobs):
            input_ids[i, longest - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids, dtype=torch.long)
            attention_mask[i, longest - len(job.prompt_ids) :] = 1
        given = [f for f in features if f is not None]
        spliced = model.splice(input_ids, attention_mask, torch.stack(given) if given else None, padding_side="left")
        cache = DynamicCache(config=model.lm.config)
        out = model.lm(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                       position_ids=spliced.position_ids, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]  # [B2, V]
        positions = spliced.position_ids[:, -1:] + 1  # [B2, 1]
        if not self.jobs:
            self.jobs, self.cache, self.mask = list(jobs), cache, spliced.attention_mask
            self.positions, self.logits = positions, logits
            return
        old_len, new_len = self.mask.shape[1], spliced.attention_mask.shape[1]
        width = max(old_len, new_len)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(spliced.attention_mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])
        self.jobs += jobs

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in order); drop the cache columns no remaining row attends to."""
        import torch

        if len(rows) == len(self.jobs):
            return
        self.jobs = [self.jobs[i] for i in rows]
        if not rows:
            self.cache = self.mask = self.positions = self.logits = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        unused = int(self.mask.any(dim=0).long().argmax())  # leading columns that are padding for every row
        if unused and self.can_join():
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    def step(self, tokens: Any) -> None:
        """Feed each row's new token `[B]`; the logits become those of the token after it."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.jobs), 1)], dim=1)  # [B, T+1]
        out = self.model.lm(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions,
                            cache=self.cache, use_cache=True, logits_to_keep=1)
        self.logits = out.logits[:, -1, :]
        self.positions = self.positions + 1


def _left_pad(tensor: Any, width: int, dim: int) -> Any:
    """Zero-pad `tensor` on the left of `dim` to `width` (cache entries and mask columns of padding)."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
