"""Export a tiny random-weight vitune model to llava-hf, as `vitune export` writes it (for the vLLM path's tests)."""

from __future__ import annotations

from pathlib import Path

from vitune.config import ModelConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model.export import export_llava_hf
from vitune.model.folder import save_model_folder
from vitune.model.vision import load_vision_tower
from vitune.model.vlm import build_model


def export_tiny(tmp: Path, name: str, model_cfg: ModelConfig) -> Path:
    """A random-weight model of ``model_cfg`` saved as a vitune folder, then exported to llava-hf at tmp/name."""
    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(model_cfg.vision)
    model = build_model(model_cfg, tokenizer, tower.hidden_size, recipe=tower.recipe)  # anyres: tiles + newline
    save_model_folder(model, tokenizer, model_cfg, tower.fingerprint(), str(tmp / f"{name}-vitune"))
    return Path(export_llava_hf(str(tmp / f"{name}-vitune"), str(tmp / name)))
