"""What a worker writes: DeepSpeed checkpoints holding the loop's position, and the trained model folder.

A checkpoint is DeepSpeed's (tag ``ds``) plus ``train_state.json`` (step, epoch, micro-batch in the epoch) on
rank 0. The model folder is written from rank 0: the full weights (ZeRO-3 shards gathered first), or under
LoRA the adapter and the projector, naming the base LM and its weights' digest. An anyres model's folder also
holds its ``image_newline`` and its packing recipe (``vitune.model.folder``), so it serves as trained; a run whose
tower trained writes the tower's weights there too (the folder's tower then replaces the pretrained one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from vitune.config import TrainJobConfig
from vitune.model import lora
from vitune.model.folder import save_model_folder
from vitune.model.projector import build_projector
from vitune.model.vlm import VisionLanguageModel, build_model

DS_TAG = "ds"
STATE_FILE = "train_state.json"


def save_checkpoint(engine: Any, folder: Path, position: dict[str, int], rank: int, lora_only: bool) -> None:
    """DeepSpeed's checkpoint of ``engine`` into ``folder``, ``position`` as its client state (and a file on rank 0).

    ``lora_only``: the frozen base is rebuilt from its source on a restart, so the checkpoint holds the adapter,
    the projector and their optimizer state only.
    """
    engine.save_checkpoint(str(folder), tag=DS_TAG, client_state=position, exclude_frozen_parameters=lora_only)
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps(position))


def load_checkpoint(engine: Any, folder: Path, lora_only: bool) -> dict[str, int]:
    """Restore ``engine`` from ``folder``; the loop position saved with it."""
    _, client = engine.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=not lora_only)
    return client or json.loads((folder / STATE_FILE).read_text())


def gathered_state(model: torch.nn.Module, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """Full weights on rank 0 (ZeRO-3 shards gathered); None on other ranks."""
    def snapshot() -> dict[str, torch.Tensor] | None:
        if rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    if zero_stage == 3:
        import deepspeed  # deferred: slow to import and probes accelerators; only training processes need it

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return snapshot()
    return snapshot()


def gathered_params(named: list[tuple[str, torch.Tensor]], zero_stage: int, rank: int) -> dict[str, torch.Tensor]:
    """CPU copies of ``named`` on rank 0 (ZeRO-3 gathers one parameter at a time); empty on other ranks."""
    out: dict[str, torch.Tensor] = {}
    for name, p in named:
        if zero_stage == 3:
            import deepspeed  # deferred, as in gathered_state

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[name] = p.detach().cpu().clone()
        elif rank == 0:
            out[name] = p.detach().cpu().clone()
    return out


def save_full_model(model: VisionLanguageModel, tokenizer: Any, cfg: TrainJobConfig, feature_dim: int,
                    fingerprint: dict, uri: str, *, rank: int, include_lm: bool, steps: int) -> None:
    """The trained model's folder at ``uri``, written by rank 0 from the gathered weights (every rank calls it)."""
    state = gathered_state(model, cfg.train.zero_stage, rank)
    if rank != 0:
        return
    # a plain copy of the model for saving: ZeRO-3 leaves the engine's parameters partitioned
    clean = build_model(cfg.model, tokenizer, feature_dim,
                        lm=_lm_copy(model.lm) if cfg.train.zero_stage == 3 else model.lm, recipe=model.recipe)
    if _with_tower_copy(clean, model, cfg) is None:  # a frozen tower ran in the step: the folder names it
        state = {k: v for k, v in state.items() if not k.startswith("vision_tower.")}
    clean.load_state_dict(state)
    save_model_folder(clean.float(), tokenizer, cfg.model, fingerprint, uri, include_lm=include_lm,
                      extra={"stage": cfg.stage, "steps": steps})


def save_lora_model(model: VisionLanguageModel, tokenizer: Any, cfg: TrainJobConfig, feature_dim: int,
                    fingerprint: dict, uri: str, *, rank: int, steps: int, trainable: dict[str, Any]) -> None:
    """A LoRA model folder: the adapter (peft format) + the projector, naming the base and its weights' digest."""
    settings, zero_stage = cfg.train.lora, cfg.train.zero_stage
    state = gathered_params([(n, p) for n, p in model.named_parameters() if p.requires_grad], zero_stage, rank)
    quantized = settings.quantization != "none"
    base = [] if quantized else list(lora.base_parameters(model.lm))  # 4-bit weights: nothing to compare
    base_state = gathered_params(base, zero_stage, rank)
    if model.image_newline is not None and not model.image_newline.requires_grad:  # anyres, kept at its init
        state.update(gathered_params([("image_newline", model.image_newline)], zero_stage, rank))
    if rank != 0:
        return
    lm_width = model.lm.get_input_embeddings().embedding_dim
    projector = build_projector(cfg.model.projector, feature_dim, lm_width)
    projector.load_state_dict({k.removeprefix("projector."): v.float() for k, v in state.items()
                               if k.startswith("projector.")})
    lm_state = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
    meta = {"base_digest": lora.base_digest(base_state.items()) if base_state else None,
            "base_dtype": str(next(iter(base_state.values())).dtype).removeprefix("torch.") if base_state
            else None, "quantization": settings.quantization, **trainable}
    clean = VisionLanguageModel(projector, model.lm, model.image_token_id, pad_token_id=model.pad_token_id,
                                eos_token_id=list(model.eos_token_ids), recipe=model.recipe)
    if _with_tower_copy(clean, model, cfg) is not None:  # the tuned tower's weights, gathered with the adapter's
        clean.vision_tower.visual.load_state_dict({k.removeprefix("vision_tower.visual."): v.float()
                                                   for k, v in state.items() if k.startswith("vision_tower.")})
    if clean.image_newline is not None:  # anyres: the newline the run trained (or kept at its init)
        with torch.no_grad():
            clean.image_newline.copy_(state["image_newline"].float())
    save_model_folder(clean, tokenizer, cfg.model, fingerprint, uri, include_lm=False,
                      extra={"stage": cfg.stage, "steps": steps, "lora": settings.model_dump()},
                      adapter=(lambda d: lora.save_adapter(model.lm, lm_state, d), meta))


def _with_tower_copy(clean: VisionLanguageModel, model: VisionLanguageModel, cfg: TrainJobConfig) -> Any:
    """A fresh, unpartitioned copy of ``model``'s tower on ``clean`` when it trained (its weights are loaded from
    the gathered state): what the folder stores. A frozen tower is the pretrained one, which the folder names."""
    tower = model.vision_tower
    if tower is None:
        return None
    if not tower.weights_trained:
        return None
    from vitune.model.vision import load_vision_tower  # deferred: open_clip is slow to import

    copy = load_vision_tower(cfg.model.vision, recipe=tower.recipe)
    copy.weights_trained = True
    return clean.attach_tower(copy).vision_tower


def _lm_copy(lm: torch.nn.Module) -> torch.nn.Module:
    """A fresh, unpartitioned LM of the same architecture (weights are loaded from the gathered state)."""
    return AutoModelForCausalLM.from_config(lm.config)
