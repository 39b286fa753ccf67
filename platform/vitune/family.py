"""A model's family in one line, from its config alone (torch-free): "siglip + qwen2, anyres_max_9".

Three parts: the vision tower's family (``clip`` or ``siglip``, from the open_clip name), the language model's
(``llama``, ``llama-3``, ``qwen2``, ``mistral``, or the LM config's own ``model_type`` when it is none of
these) and the aspect mode (``image_aspect_ratio``). Model folders record it in their meta, training runs and
registered versions carry it as the ``vitune.family`` tag, and ``vitune models`` shows it per version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FAMILY_TAG = "vitune.family"

# the tiny random LMs (vitune.model.lm.TINY_LMS) by the architecture each one builds
_TINY_LM_FAMILIES = {"tiny": "llama", "tiny-qwen2": "qwen2"}
# LM name fragments, most specific first (Qwen2.5 and Qwen2 share the qwen2 architecture; Llama 3 differs from
# Llama 2 / Vicuna in tokenizer and template, not in model_type, so only its name tells them apart)
_LM_NAME_FAMILIES = (("qwen2", "qwen2"), ("llama-3", "llama-3"), ("llama3", "llama-3"), ("mistral", "mistral"),
                     ("mixtral", "mistral"), ("vicuna", "llama"), ("llama", "llama"))


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def tower_family(vision_name: str) -> str:
    """``siglip`` for a SigLIP tower (open_clip names say so, as does vitune-tiny-siglip), else ``clip``."""
    return "siglip" if "siglip" in vision_name.lower() else "clip"


def lm_family(lm: str, model_type: str | None = None) -> str:
    """The LM's family from its name (a tiny LM, a Hub id or a path), else its config's ``model_type``."""
    if lm in _TINY_LM_FAMILIES:
        return _TINY_LM_FAMILIES[lm]
    name = lm.lower().replace("_", "-")
    for fragment, family in _LM_NAME_FAMILIES:
        if fragment in name:
            return family
    return model_type or "unknown"


def model_family(model_cfg: Any, lm_model_type: str | None = None) -> str:
    """``"<tower> + <lm>, <aspect>"`` for a ``ModelConfig`` or its dumped dict (a model folder's meta["model"]);
    ``lm_model_type`` (the LM's config.json ``model_type``) names an LM whose name says nothing."""
    vision = _get(model_cfg, "vision") or {}
    tower = tower_family(str(_get(vision, "name", "")))
    aspect = str(_get(vision, "image_aspect_ratio", "pad"))
    return f"{tower} + {lm_family(str(_get(model_cfg, 'lm', '')), lm_model_type)}, {aspect}"
