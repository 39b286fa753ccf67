"""The vision recipe: how an image becomes visual tokens, described once and without torch.

A ``VisionRecipe`` names the tower (open_clip name + pretrained tag), its input geometry (image size, patch
size, hidden size), the aspect mode (``pad`` | ``crop``), the feature layer and the CLS handling. It is read
from a ``VisionConfig`` without loading weights (open_clip's model-config JSON is read from disk; open_clip
itself, which imports torch, is not imported), from a loaded tower, or from the fingerprint that a feature
store or a model folder records. From it come:

- the fingerprint: the fields that make two feature stores interchangeable (``fingerprint``), its short id
  (``fingerprint_id``) and the checks that refuse a store or checkpoint made by another recipe
  (``check_fingerprint`` / ``FingerprintMismatch``);
- ``visual_tokens(recipe, width, height)``: how many visual tokens an image of that size becomes in the
  language model's sequence. The feature store, training data, evaluation, the serving engine and export
  read the count here; nothing else computes it. Today every aspect mode makes one tile, so the count is
  the tile's patch count (+1 with the CLS token); a geometry whose count depends on the size (AnyRes) is a
  new branch of ``tiles_for`` and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASPECT_MODES = ("pad", "crop")  # LLaVA's image_aspect_ratio: pad to a square | resize + centre crop
SELECTS = ("patch", "cls_patch")  # LLaVA's mm_vision_select_feature: patch tokens only | CLS first, then patches
# What makes two feature stores interchangeable (the fingerprint id hashes these).
FINGERPRINT_ID_KEYS = ("tower", "pretrained", "feature_layer", "select", "image_size", "image_mode")
# Fields of a fingerprint that are recorded but never make two stores incompatible.
VERSION_FIELDS = ("open_clip_version", "torch_version")
VITUNE_TOWER_CONFIGS = Path(__file__).parent / "assets" / "open_clip"  # the tiny tower's open_clip config


class FingerprintMismatch(ValueError):
    """A store or checkpoint made by another tower/layer/selection/resolution than the caller expects."""

    def __init__(self, uri: str, diffs: list[tuple[str, Any, Any]]):
        self.uri = uri
        self.diffs = diffs
        detail = "; ".join(f"{field}: expected {want!r}, found {have!r}" for field, want, have in diffs)
        fields = ", ".join(d[0] for d in diffs)
        super().__init__(
            f"feature store {uri} has a different fingerprint ({fields} differ): {detail}. "
            f"Re-run jobs/extract_features.py for this vision config or point at the matching store"
        )


def fingerprint_diffs(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(field, expected, found)]`` for every expected field that differs; version fields are ignored."""
    return [
        (field, want, found.get(field))
        for field, want in expected.items()
        if field not in VERSION_FIELDS and found.get(field) != want
    ]


def check_fingerprint(expected: Mapping[str, Any] | None, found: Mapping[str, Any], uri: str) -> None:
    """Raise ``FingerprintMismatch`` naming each differing field (expected vs found)."""
    if expected is None:
        return
    diffs = fingerprint_diffs(expected, found)
    if diffs:
        raise FingerprintMismatch(uri, diffs)


def fingerprint_id(fp: Mapping[str, Any]) -> str:
    """Short stable hash of the fields of a fingerprint that determine the features."""
    missing = [key for key in FINGERPRINT_ID_KEYS if key not in fp]
    if missing:
        raise ValueError(f"fingerprint lacks {missing}; it needs {list(FINGERPRINT_ID_KEYS)}")
    payload = json.dumps({key: fp[key] for key in FINGERPRINT_ID_KEYS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _side(value: Any) -> int | None:
    """open_clip writes sizes as ``224`` or ``[224, 224]``; a non-square size has no single side."""
    if isinstance(value, list | tuple):
        return int(value[0]) if len(set(value)) == 1 else None
    return int(value) if value is not None else None


def tower_config(name: str) -> dict[str, Any]:
    """open_clip's model config for ``name`` (vitune's shipped configs first), read from its JSON file."""
    folders = [VITUNE_TOWER_CONFIGS]
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (and torch)
    if spec is not None and spec.submodule_search_locations:
        folders.append(Path(next(iter(spec.submodule_search_locations))) / "model_configs")
    for folder in folders:
        path = folder / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    known = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.json")})
    raise ValueError(f"unknown vision tower {name!r}; valid open_clip names: {', '.join(known)}")


@dataclass(frozen=True)
class VisionRecipe:
    """What turns an image into visual tokens (see the module docstring)."""

    tower: str
    pretrained: str | None
    feature_layer: int
    select: str
    image_mode: str
    image_size: int
    patch_size: int | None  # None where open_clip's config does not say (timm towers)
    hidden_size: int | None

    def __post_init__(self) -> None:
        if self.image_mode not in ASPECT_MODES:
            raise ValueError(f"unknown image mode {self.image_mode!r}; valid: {', '.join(ASPECT_MODES)}")
        if self.select not in SELECTS:
            raise ValueError(f"unknown feature selection {self.select!r}; valid: {', '.join(SELECTS)}")

    @classmethod
    def of(cls, vision: Any) -> VisionRecipe:
        """The recipe a ``VisionConfig`` names, geometry from open_clip's model config (no weights loaded)."""
        vision_cfg = tower_config(vision.name).get("vision_cfg", {})
        size = _side(vision_cfg.get("image_size"))
        if size is None:
            raise ValueError(f"vision tower {vision.name!r} has no square image_size in its open_clip config")
        return cls(tower=vision.name, pretrained=vision.pretrained, feature_layer=vision.feature_layer,
                   select=vision.select, image_mode=vision.image_mode, image_size=size,
                   patch_size=_side(vision_cfg.get("patch_size")),
                   hidden_size=int(vision_cfg["width"]) if isinstance(vision_cfg.get("width"), int) else None)

    @classmethod
    def from_fingerprint(cls, fp: Mapping[str, Any]) -> VisionRecipe:
        """The recipe a store's or model folder's fingerprint records (the patch size from its token count)."""
        cls_token = 1 if fp["select"] == "cls_patch" else 0
        grid = math.isqrt(int(fp["num_patches"]) - cls_token)
        return cls(tower=fp["tower"], pretrained=fp["pretrained"], feature_layer=int(fp["feature_layer"]),
                   select=fp["select"], image_mode=fp["image_mode"], image_size=int(fp["image_size"]),
                   patch_size=int(fp["image_size"]) // grid if grid else None,
                   hidden_size=int(fp["hidden_size"]) if fp.get("hidden_size") is not None else None)

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens of one tile: the patch grid, plus the CLS token when it is kept."""
        if not self.patch_size:
            raise ValueError(f"the patch size of vision tower {self.tower!r} is unknown; cannot count its tokens")
        grid = self.image_size // self.patch_size
        return grid * grid + (1 if self.select == "cls_patch" else 0)

    def fingerprint(self) -> dict[str, Any]:
        """The fields a store made with this recipe records (a tower adds its library versions)."""
        return {"tower": self.tower, "pretrained": self.pretrained, "feature_layer": self.feature_layer,
                "select": self.select, "image_size": self.image_size, "image_mode": self.image_mode,
                "num_patches": self.tokens_per_tile, "hidden_size": self.hidden_size}

    def fingerprint_id(self) -> str:
        return fingerprint_id(self.fingerprint())


def tiles_for(recipe: VisionRecipe, width: int, height: int) -> int:
    """How many tower tiles an image of ``width`` x ``height`` pixels is cut into (pad and crop: one)."""
    if width < 1 or height < 1:
        raise ValueError(f"an image must be at least 1x1 pixels, got {width}x{height}")
    return 1


def visual_tokens(recipe: VisionRecipe, width: int, height: int) -> int:
    """How many visual tokens an image of ``width`` x ``height`` pixels yields: the one count of the house."""
    return tiles_for(recipe, width, height) * recipe.tokens_per_tile
