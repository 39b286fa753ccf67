"""Several LoRA adapters over one base LM on one replica, chosen by the request's `model` name.

`ServeConfig.model` names the first model folder (a LoRA folder, served as `served_model_name`) and
`ServeConfig.adapters` maps more served names to LoRA folders trained over the same base (same `lm.source` and
base-weight digest, same vision features). The base is loaded once; each adapter is a named peft adapter on it
plus its own projector, template and stop tokens. Every served name gets its own `ServingEngine` (its own
continuous batch) whose LM is an `AdapterView`: a view of the shared peft LM that activates its adapter for
each forward call under one lock, so the engines' worker threads never run a step with another's adapter.
Requests for different adapters thus take turns step by step on the replica; one adapter's rows batch together.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from vitune import storage
from vitune.config import ServeConfig
from vitune.model import lora
from vitune.model.folder import PROJECTOR_FILE, load_for_inference, read_meta
from vitune.model.projector import build_projector
from vitune.model.vlm import VisionLanguageModel
from vitune.references import model_folder, resolve_model
from vitune.serve.engine import ServingEngine

logger = logging.getLogger(__name__)


class AdapterView(nn.Module):
    """The shared peft LM seen with one adapter active: what a `VisionLanguageModel` calls its `lm`."""

    def __init__(self, peft_lm: nn.Module, adapter: str, lock: threading.Lock) -> None:
        super().__init__()
        self.peft_lm = peft_lm
        self.adapter = adapter
        self.lock = lock
        self.config = peft_lm.config
        self.generation_config = getattr(peft_lm, "generation_config", None)

    def get_input_embeddings(self) -> nn.Module:
        return self.peft_lm.get_input_embeddings()  # not adapted: shared by every adapter

    def forward(self, **kwargs: Any) -> Any:
        with self.lock:
            if self.peft_lm.active_adapter != self.adapter:
                self.peft_lm.set_adapter(self.adapter)
            return self.peft_lm(**kwargs)


def _same_base(name: str, meta: dict[str, Any], base_meta: dict[str, Any]) -> None:
    """Refuse an adapter trained over another base or on other vision features than the first model's."""
    lm, base = meta["lm"], base_meta["lm"]
    if not lm.get("adapter"):
        raise ValueError(f"adapters.{name}: not a LoRA model folder (no adapter/); only adapters share a base")
    if lm["source"] != base["source"] or lm.get("base_digest") != base.get("base_digest"):
        raise ValueError(f"adapters.{name}: trained over base {lm['source']!r} (digest "
                         f"{str(lm.get('base_digest'))[:12]}), not the served base {base['source']!r} "
                         f"(digest {str(base.get('base_digest'))[:12]})")
    if meta.get("vision_tower"):  # two trained towers share a fingerprint, not their weights
        raise ValueError(f"adapters.{name}: its run trained its own vision tower; adapters on one replica share "
                         "the served model's tower, so serve this folder as a model of its own")
    if meta.get("fingerprint") != base_meta.get("fingerprint"):
        raise ValueError(f"adapters.{name}: trained on other vision features than the served model")


def _adapter_model(name: str, uri: str, index: int, primary: Any, cfg: ServeConfig,
                   lock: threading.Lock) -> tuple[VisionLanguageModel, dict[str, Any]]:
    """Load the adapter of the LoRA folder ``uri`` onto the shared base; its projector beside it."""
    base = primary.model.lm.peft_lm
    with tempfile.TemporaryDirectory(prefix="vitune-adapter-") as tmp:
        folder = resolve_model(uri, tracking_uri=cfg.tracking_uri, download_dir=str(Path(tmp) / "registry"))
        meta = read_meta(folder)
        _same_base(name, meta, primary.meta)
        local = storage.local_path(folder) or storage.download_dir(folder, str(Path(tmp) / "folder"))
        adapter = f"adapter{index}"  # peft adapter names become module keys: ours, not the served name
        base.load_adapter(str(Path(local) / meta["lm"]["adapter"]), adapter_name=adapter, is_trainable=False)
        proj = meta["projector"]
        projector = build_projector(proj["name"], proj["in_dim"], proj["out_dim"])
        projector.load_state_dict(load_file(str(Path(local) / PROJECTOR_FILE)))
    weight = base.get_input_embeddings().weight
    projector.to(device=weight.device, dtype=weight.dtype).eval()
    model = VisionLanguageModel(projector, AdapterView(base, adapter, lock), meta["image_token_id"],
                                pad_token_id=meta["pad_token_id"], eos_token_id=meta["stop_token_ids"])
    return model, meta


def load_engines(cfg: ServeConfig) -> dict[str, ServingEngine]:
    """One engine per served name: `cfg.model` alone, or it and `cfg.adapters` over its base (first = default)."""
    if not cfg.adapters:
        return {cfg.model_name(): ServingEngine.from_config(cfg)}
    with model_folder(cfg.model, tracking_uri=cfg.tracking_uri) as folder:
        primary = load_for_inference(folder, device=cfg.device, dtype=cfg.dtype)
    if not lora.is_lora(primary.model.lm):
        raise ValueError(f"adapters need model={cfg.model!r} to be a LoRA model folder: its base is what they share")
    lock = threading.Lock()
    primary.model.lm = AdapterView(primary.model.lm, "default", lock)
    models = {cfg.model_name(): (primary.model, primary.meta)}
    for index, (name, uri) in enumerate(cfg.adapters.items(), start=1):
        if name in models:
            raise ValueError(f"adapters.{name}: the name is served already")
        models[name] = _adapter_model(name, uri, index, primary, cfg, lock)
    engines = {}
    for name, (model, meta) in models.items():
        engine = ServingEngine(model, primary.tokenizer, primary.tower, meta,
                               cfg.model_copy(update={"served_model_name": name}))
        if cfg.warmup:
            engine.warmup()
        engines[name] = engine
    logger.info("serving %d adapters over %s on one replica: %s", len(engines), primary.meta["lm"]["source"],
                list(engines))
    return engines


def engine_for(engines: dict[str, ServingEngine], model: str | None) -> ServingEngine:
    """The engine of the request's `model` name (the API replica checked it); None = the first, the default."""
    return engines[model] if model in engines else next(iter(engines.values()))

