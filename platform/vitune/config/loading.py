"""Loading a job config: a preset name or YAML (local or URI) + stage block + ``key.sub=value`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from vitune import storage
from vitune.config.tree import ConfigError, resolve_tree, validation_message

# top-level sections that belong to some job; a job ignores the others' sections in a shared preset
KNOWN_SECTIONS = {
    "storage", "tracking", "ray", "model", "data", "features", "train", "stage", "stages", "synthetic",
    "eval", "generate", "serve", "pipeline", "judge",
}

C = TypeVar("C", bound=BaseModel)


def build_config(cls: type[C], raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Validate ``raw`` (+ overrides, stage block merged) as ``cls``; errors name the field and value."""
    stage_field = cls.model_fields.get("stage")
    raw = resolve_tree(raw, overrides, stage_field.default if stage_field else None)
    for key in list(raw):
        if key not in cls.model_fields and key in KNOWN_SECTIONS:
            raw.pop(key)  # another job's section in a shared preset
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(validation_message(err)) from None


PRESETS_DIR = Path(__file__).parent.parent / "presets"


def preset_names() -> list[str]:
    """The presets shipped in the package (``tiny``, ``llava-v1.5-7b``, ...)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_preset(path: str | Path) -> str:
    """A preset name → its packaged YAML; anything else (a local path or URI) is returned as it is.

    Names are looked up in the package, so the CLI and jobs find presets from any working directory.
    """
    text = str(path)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        candidate = PRESETS_DIR / f"{text}.yaml"
        if not candidate.exists():
            raise ConfigError(f"unknown preset {text!r}; valid presets: {', '.join(preset_names())} "
                              "(or give a YAML path or URI)")
        return str(candidate)
    return text


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Load a job config from a preset name or a YAML file (local path or URI) with ``key.sub=value`` overrides."""
    raw: dict = {}
    if path is not None:
        path = resolve_preset(path)
        text = storage.read_text(path)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return build_config(cls, raw, overrides)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
