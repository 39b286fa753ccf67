"""A run's step arithmetic and optimizer set-up, the same on every worker: the step plan, gradient accumulation,
the learning-rate schedule, the optimizer's parameter groups and the DeepSpeed config built from our config."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitune.config import TrainJobConfig

if TYPE_CHECKING:
    from vitune.model.vlm import VisionLanguageModel


def deepspeed_config(cfg: TrainJobConfig, world_size: int) -> dict[str, Any]:
    """Our config → a DeepSpeed config: ZeRO stage, precision, batch sizes, clipping, offload."""
    t = cfg.train
    accum = gradient_accumulation(cfg, world_size)
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload and t.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.offload and t.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(t.use_gpu)},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer (no op build)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def gradient_accumulation(cfg: TrainJobConfig, world_size: int) -> int:
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) × workers ({world_size})"
        )
    return t.global_batch_size // per_step


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
    warmup = math.ceil(total_steps * warmup_ratio)

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


@dataclass
class Plan:
    """How many steps the run takes; identical on every worker (equal splits)."""

    samples: int
    world_size: int
    micro_batch_size: int
    accum: int
    epochs: float
    max_steps: int | None

    @property
    def micro_per_epoch(self) -> int:
        return (self.samples // self.world_size) // self.micro_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_per_epoch // self.accum

    @property
    def total_steps(self) -> int:
        total = math.ceil(self.epochs * self.steps_per_epoch)
        return min(total, self.max_steps) if self.max_steps else total


def no_decay_names(model: Any) -> set[str]:
    """The parameters LLaVA-NeXT's trainer keeps out of weight decay: every bias and every weight of a
    normalisation layer (transformers' ``ALL_LAYERNORM_LAYERS``: ``nn.LayerNorm``, and the RMSNorms Llama-style
    models added to it)."""
    import torch  # deferred: the plan's arithmetic needs no torch

    out = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if is_norm or "bias" in name:
                out.add(full)
    return out


def param_groups(model: VisionLanguageModel, lr: float, projector_lr: float | None, weight_decay: float = 0.0,
                 tower_lr: float | None = None) -> list[dict[str, Any]]:
    """The optimizer's groups as LLaVA-NeXT's ``create_optimizer``: the trainable parameters at ``lr``, the
    projector's at ``mm_projector_lr`` and the tower's at ``mm_vision_tower_lr`` when given (else ``lr``), each
    split into a group with ``weight_decay`` and one without (biases and norm weights) when ``weight_decay`` is
    not 0. Empty groups are left out; every group names its ``part`` (what the loop logs)."""
    skip = no_decay_names(model)
    own = {"projector": projector_lr, "vision_tower": tower_lr}  # named parts with a rate of their own
    parts: dict[str, list[tuple[str, Any]]] = {"rest": [], "projector": [], "vision_tower": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = name.split(".", 1)[0]
            parts[head if head in own else "rest"].append((name, p))
    groups = []
    for part, named in parts.items():
        rate = own.get(part) or lr
        # without weight decay the split changes nothing: one group per part
        split = (([p for n, p in named if n not in skip], weight_decay), ([p for n, p in named if n in skip], 0.0))
        for params, decay in split if weight_decay else (([p for _, p in named], 0.0),):
            if params:
                groups.append({"params": params, "lr": rate, "weight_decay": decay, "part": part})
    return groups
