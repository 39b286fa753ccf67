"""LoRA and QLoRA over the VLM's language model (peft): wrap, count, digest, merge, adapter save and load.

The finetune stage with ``train.lora.enabled`` wraps the LM in a peft ``PeftModel`` whose low-rank adapters
train while the base weights stay frozen; the projector trains fully beside it. By default the adapters sit on
every ``nn.Linear`` of the LM except its output head, as LLaVA's ``find_all_linear_names`` chooses them.
QLoRA (``train.lora.quantization=nf4``) loads the base in 4-bit NF4 with double quantisation and bf16 compute
(bitsandbytes, the ``qlora`` extra).

A LoRA model folder holds ``adapter/`` in peft's own format (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained`` over the base) next to the projector;
``vitune_model.json`` names the base LM and a digest of the base weights the adapter was trained over.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file, save_model
from torch import nn

from vitune.config import LoraConfig

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def quantization_unavailable() -> str | None:
    """Why a 4-bit NF4 base cannot be built in this environment, or None when it can."""
    try:
        import bitsandbytes  # noqa: F401  - deferred: an optional extra, imported only to probe it
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}); install the extra: pip install 'vitune[qlora]'"
    return None


def lora_target_modules(lm: nn.Module) -> list[str]:
    """The short names of every linear layer of ``lm`` but its output head (LLaVA's ``find_all_linear_names``)."""
    head = lm.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in lm.named_modules()
             if isinstance(module, nn.Linear) and module is not head}
    return sorted(names)


def peft_config(settings: LoraConfig, lm: nn.Module, base_name: str | None = None) -> PeftLoraConfig:
    """Our ``train.lora`` block → peft's ``LoraConfig`` (target modules resolved against ``lm``)."""
    targets = settings.target_modules or lora_target_modules(lm)
    return PeftLoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=targets, bias=settings.bias, task_type="CAUSAL_LM",
                          base_model_name_or_path=base_name)


def apply_lora(lm: nn.Module, settings: LoraConfig, base_name: str | None = None) -> PeftModel:
    """Wrap ``lm`` with trainable adapters; its own weights are frozen (biases too unless ``bias`` says so)."""
    config = peft_config(settings, lm)
    wrapped = get_peft_model(lm, config)
    config.base_model_name_or_path = base_name  # peft takes the LM's own name_or_path; ours names the base by source
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%g dropout=%g bias=%s on %s: %d trainable LM parameters",
                settings.r, settings.alpha, settings.dropout, settings.bias, sorted(config.target_modules), trainable)
    return wrapped


def quantize_lm(lm: nn.Module, device: torch.device | str) -> nn.Module:
    """The same LM with its linear layers in 4-bit NF4 (double quantisation, bf16 compute), ready for k-bit
    training; goes through ``save_pretrained`` so that any LM object (the tiny preset's too) quantizes alike."""
    # deferred: transformers and peft's k-bit helpers are only needed for QLoRA
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    device = torch.device(device)
    target = device.index if device.type == "cuda" and device.index is not None else device.type
    with tempfile.TemporaryDirectory(prefix="vitune-qlora-") as tmp:
        # not lm.save_pretrained: under torch.distributed it writes on rank 0 only, and every rank quantizes
        lm.config.save_pretrained(tmp)
        save_model(lm, str(Path(tmp) / "model.safetensors"))
        q = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map={"": target})
    # fp32 norms and head, input grads on (the frozen embedding would otherwise cut the graph)
    q = prepare_model_for_kbit_training(q, use_gradient_checkpointing=False)
    logger.info("QLoRA: LM quantized to 4-bit NF4 on %s", device)
    return q


def is_lora(lm: nn.Module) -> bool:
    return isinstance(lm, PeftModel)


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """``trainable_params``, ``total_params`` and ``trainable_share`` of ``model`` (what MLflow records)."""
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1)}


def _numel(p: torch.Tensor) -> int:
    # ZeRO-3 leaves partitioned parameters empty; their full size is kept in ds_numel
    return int(getattr(p, "ds_numel", p.numel()))


def canonical_name(name: str) -> str:
    """A parameter name of a peft-wrapped LM as the plain LM names it."""
    return name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")


def base_parameters(lm: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The LM's own (non-adapter) parameters under their plain names, in a fixed order."""
    for name, p in lm.named_parameters():
        if "lora_" not in name:
            yield canonical_name(name), p


def base_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor, sorted by name: equal iff bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_adapter(lm: PeftModel, lm_state: dict[str, torch.Tensor], folder: str | Path) -> None:
    """Write the adapter of ``lm`` in peft's format; ``lm_state`` holds its (gathered) trainable tensors,
    named as ``lm.state_dict()`` names them, so ZeRO-3 shards need not live in ``lm`` itself."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # embedding layers stay out (never adapted here); "auto" would look the base up on the Hugging Face Hub
    state = get_peft_model_state_dict(lm, state_dict=lm_state, save_embedding_layers=False)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS))
    lm.peft_config["default"].save_pretrained(str(folder))


def load_adapter(lm: nn.Module, folder: str | Path, name: str = "default") -> PeftModel:
    """``lm`` (the plain base) with the adapter saved in ``folder``, for inference (nothing trains)."""
    return PeftModel.from_pretrained(lm, str(folder), adapter_name=name, is_trainable=False)


def merge_lora(model: Any) -> Any:
    """Fold the LM's adapter into its weights (W + scale·B·A) and drop peft; a model without one is returned as is."""
    if is_lora(model.lm):
        model.lm = model.lm.merge_and_unload()
    return model
