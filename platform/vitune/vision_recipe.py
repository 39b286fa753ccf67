"""The vision recipe: how an image becomes visual tokens, described once and without torch.

A ``VisionRecipe`` names the tower (open_clip name + pretrained tag), its input geometry (image size, patch
size, hidden size), the aspect mode (``pad`` | ``crop`` | ``anyres``), the feature layer and the CLS. It is read
from a ``VisionConfig`` without loading weights (open_clip's model-config JSON is read from disk; open_clip
itself, which imports torch, is not imported), from a loaded tower, or from the fingerprint that a feature
store or a model folder records. From it come:

- the fingerprint: the fields that make two feature stores interchangeable (``fingerprint``), its short id
  (``fingerprint_id``) and the checks that refuse a store or checkpoint made by another recipe
  (``check_fingerprint`` / ``FingerprintMismatch``);
- ``visual_tokens(recipe, width, height)``: how many visual tokens an image of that size becomes in the
  language model's sequence. The feature store, training data, evaluation, the serving engine and export
  read the count here; nothing else computes it. ``pad`` and ``crop`` make one tile, so the count is the
  tile's patch count (+1 with the CLS token). ``anyres`` (LLaVA-NeXT) is a geometry whose count depends on
  the size: a base view plus a grid of tiles chosen for the aspect ratio (``select_best_resolution``),
  with the padding removed from the tiled features and a newline per row (``spatial_unpad``), or the tiles
  laid flat, and OneVision's ``anyres_max_N`` cap (``max_tiles``). The count equals transformers'
  LlavaNext / LlavaOnevision processors' for the same configuration (tests/unit/test_visual_tokens.py).
  A ``VisionConfig`` names it as LLaVA-NeXT does (``image_aspect_ratio`` anyres | anyres_max_N,
  ``image_grid_pinpoints``, ``mm_patch_merge_type``; ``aspect_fields``); the feature store holds its tiles
  (``vitune.features.store``) and training packs them (``vitune.train.data`` carries each image's size). Export
  and import read and write it as transformers' LlavaNext / LlavaOnevision (``vitune.model.llava_next_hf``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# pad to a square | resize + centre crop | LLaVA-NeXT's base view + grid of tiles (image_aspect_ratio=anyres)
ASPECT_MODES = ("pad", "crop", "anyres")
PATCH_MERGES = ("flat", "spatial_unpad")  # LLaVA-NeXT's mm_patch_merge_type for anyres tiles
SELECTS = ("patch", "cls_patch")  # LLaVA's mm_vision_select_feature: patch tokens only | CLS first, then patches
# What makes two feature stores interchangeable (the fingerprint id hashes these).
FINGERPRINT_ID_KEYS = ("tower", "pretrained", "feature_layer", "select", "image_size", "image_mode")
# What makes two pixel stores interchangeable (``pixel_fingerprint``): the preprocessing only, never the tower's
# weights, layer or selection (a pixel store serves every tower of that preprocessing); the mode's extras
# (``grid_pinpoints`` for anyres, ``pad_fill`` for pad, ``mean``/``std`` for normalised bf16) join when present.
PIXEL_FINGERPRINT_ID_KEYS = ("form", "pixel_dtype", "image_size", "image_mode")
PIXEL_FINGERPRINT_EXTRA_KEYS = ("grid_pinpoints", "pad_fill", "mean", "std")
STORE_FORMS = ("features", "pixels")  # what a store on storage holds: tower features | preprocessed tiles
PIXEL_DTYPES = ("uint8", "bf16")  # a pixel store's tiles: 0-255 before normalisation | normalised bfloat16
# Fields of a fingerprint that are recorded but never make two stores incompatible.
VERSION_FIELDS = ("open_clip_version", "torch_version", "pillow_version")
VITUNE_TOWER_CONFIGS = Path(__file__).parent / "assets" / "open_clip"  # the tiny towers' open_clip configs


@dataclass(frozen=True)
class TimmTower:
    """A timm trunk that open_clip builds from ``vision_cfg.timm_model_name`` (SigLIP towers), as vitune knows it.

    open_clip's JSON for a timm tower names the trunk and the image size only; the patch size and width live in
    timm's model function. They are written here so that a recipe stays torch-free (timm is not imported), and
    so is the preprocessing that open_clip only attaches to a pretrained tag (SigLIP's ``webli``: mean = std =
    0.5, bicubic, squash resize), which a random-init tower needs too. tests/unit/model/test_siglip.py checks
    each entry against the trunk timm builds."""

    patch_size: int
    width: int
    depth: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


TIMM_TOWERS: dict[str, TimmTower] = {
    # google/siglip-so400m-patch14-384, LLaVA-OneVision's tower (open_clip's ViT-SO400M-14-SigLIP-384)
    "vit_so400m_patch14_siglip_384": TimmTower(patch_size=14, width=1152, depth=27),
    # vitune's tiny SigLIP-shaped trunk for tests (registered with timm by vitune.model.vision)
    "vitune_tiny_siglip": TimmTower(patch_size=8, width=64, depth=3),
}


def timm_tower(vision_cfg: Mapping[str, Any], name: str) -> TimmTower | None:
    """The ``TimmTower`` of an open_clip ``vision_cfg`` (None for a native open_clip ViT); an error listing the
    supported trunks for any other timm trunk."""
    trunk = vision_cfg.get("timm_model_name")
    if trunk is None:
        return None
    if trunk not in TIMM_TOWERS:
        raise ValueError(f"vision tower {name!r} is timm's {trunk!r}; vitune supports the timm trunks "
                         f"{', '.join(sorted(TIMM_TOWERS))} (SigLIP) and open_clip's native ViTs")
    return TIMM_TOWERS[trunk]


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
    """Short stable hash of the fields of a fingerprint that determine the features (a pixel store's: the
    pixels, ``pixel_fingerprint``)."""
    if fp.get("form") == "pixels":
        return _pixel_fingerprint_id(fp)
    missing = [key for key in FINGERPRINT_ID_KEYS if key not in fp]
    if missing:
        raise ValueError(f"fingerprint lacks {missing}; it needs {list(FINGERPRINT_ID_KEYS)}")
    fields = {key: fp[key] for key in FINGERPRINT_ID_KEYS}
    if fp.get("grid_pinpoints"):  # anyres: the grid is part of what made the tiles
        fields["grid_pinpoints"] = fp["grid_pinpoints"]
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def pad_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """The canvas colour LLaVA v1.5 pads with: the normalisation mean in 0–255, truncated."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def _pixel_fingerprint_id(fp: Mapping[str, Any]) -> str:
    missing = [key for key in PIXEL_FINGERPRINT_ID_KEYS if key not in fp]
    if missing:
        raise ValueError(f"pixel fingerprint lacks {missing}; it needs {list(PIXEL_FINGERPRINT_ID_KEYS)}")
    fields = {key: fp[key] for key in (*PIXEL_FINGERPRINT_ID_KEYS, *PIXEL_FINGERPRINT_EXTRA_KEYS) if key in fp}
    # a distinct prefix: no pixel store id can equal a feature store id, so the two never share a folder
    payload = "pixels:" + json.dumps(fields, sort_keys=True)
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
    patch_size: int | None  # None where neither open_clip's config nor TIMM_TOWERS says
    hidden_size: int | None
    # anyres only: the grid resolutions as (height, width) pixels, the merge, and anyres_max_N's N (None: no cap)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    patch_merge: str = "spatial_unpad"
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        if self.image_mode not in ASPECT_MODES:
            raise ValueError(f"unknown image mode {self.image_mode!r}; valid: {', '.join(ASPECT_MODES)}")
        if self.select not in SELECTS:
            raise ValueError(f"unknown feature selection {self.select!r}; valid: {', '.join(SELECTS)}")
        if self.patch_merge not in PATCH_MERGES:
            raise ValueError(f"unknown mm_patch_merge_type {self.patch_merge!r}; valid: {', '.join(PATCH_MERGES)}")
        if self.image_mode == "anyres" and not self.grid_pinpoints:
            raise ValueError("image_aspect_ratio=anyres needs image_grid_pinpoints")
        if self.image_mode == "anyres" and self.select != "patch":
            raise ValueError("image_aspect_ratio=anyres keeps patch tokens only (mm_vision_select_feature=patch)")

    @classmethod
    def of(cls, vision: Any) -> VisionRecipe:
        """The recipe a ``VisionConfig`` names, geometry from open_clip's model config (no weights loaded)."""
        vision_cfg = tower_config(vision.name).get("vision_cfg", {})
        size = _side(vision_cfg.get("image_size"))
        if size is None:
            raise ValueError(f"vision tower {vision.name!r} has no square image_size in its open_clip config")
        timm = timm_tower(vision_cfg, vision.name)
        if timm is not None:  # SigLIP: the geometry of the named timm trunk; it has no CLS token
            if vision.select == "cls_patch":
                raise ValueError(f"vision.select='cls_patch' but tower {vision.name!r} (SigLIP) has no CLS token; "
                                 "use select='patch' (all patch tokens, as LLaVA-OneVision)")
            return cls(tower=vision.name, pretrained=vision.pretrained, feature_layer=vision.feature_layer,
                       select=vision.select, image_size=size, patch_size=timm.patch_size, hidden_size=timm.width,
                       **aspect_fields(vision, size))
        return cls(tower=vision.name, pretrained=vision.pretrained, feature_layer=vision.feature_layer,
                   select=vision.select, image_size=size, patch_size=_side(vision_cfg.get("patch_size")),
                   hidden_size=int(vision_cfg["width"]) if isinstance(vision_cfg.get("width"), int) else None,
                   **aspect_fields(vision, size))

    @classmethod
    def from_fingerprint(cls, fp: Mapping[str, Any]) -> VisionRecipe:
        """The recipe a store's or model folder's fingerprint records (the patch size from its token count)."""
        cls_token = 1 if fp["select"] == "cls_patch" else 0
        grid = math.isqrt(int(fp["num_patches"]) - cls_token)
        return cls(tower=fp["tower"], pretrained=fp["pretrained"], feature_layer=int(fp["feature_layer"]),
                   select=fp["select"], image_mode=fp["image_mode"], image_size=int(fp["image_size"]),
                   patch_size=int(fp["image_size"]) // grid if grid else None,
                   hidden_size=int(fp["hidden_size"]) if fp.get("hidden_size") is not None else None,
                   grid_pinpoints=tuple(tuple(p) for p in fp.get("grid_pinpoints") or ()))

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens of one tile: the patch grid, plus the CLS token when it is kept."""
        if not self.patch_size:
            raise ValueError(f"the patch size of vision tower {self.tower!r} is unknown; cannot count its tokens")
        return self.grid * self.grid + (1 if self.select == "cls_patch" else 0)

    @property
    def grid(self) -> int:
        """Patches per side of one tile."""
        if not self.patch_size:
            raise ValueError(f"the patch size of vision tower {self.tower!r} is unknown; cannot count its tokens")
        return self.image_size // self.patch_size

    def fingerprint(self) -> dict[str, Any]:
        """The fields a store made with this recipe records (a tower adds its library versions).

        What the id covers is what changes the stored features: tower, tag, layer, selection, the tile size
        (``image_size``) and the aspect mode, and for anyres the grid pinpoints in their order (the order
        breaks ties in ``select_best_resolution``, so it can change an image's grid). Not covered, for anyres:
        ``patch_merge`` (flat | spatial_unpad) and ``max_tiles`` (anyres_max_N): both are applied by the
        model when it packs the same stored tiles (``vitune.model.anyres``), so one store serves every merge
        and cap, and ``from_fingerprint`` gives them their defaults. A pad or crop fingerprint has no grid
        field: its id is the one it always had (tests/unit/features/test_tile_store.py pins one).
        """
        fp = {"tower": self.tower, "pretrained": self.pretrained, "feature_layer": self.feature_layer,
              "select": self.select, "image_size": self.image_size, "image_mode": self.image_mode,
              "num_patches": self.tokens_per_tile, "hidden_size": self.hidden_size}
        if self.image_mode == "anyres":  # only then: a pad/crop store's fingerprint (and id) is as it always was
            # the tiles depend on the grid; the merge and the max_N cap are applied by the model to the same tiles
            fp["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        return fp

    def fingerprint_id(self) -> str:
        return fingerprint_id(self.fingerprint())

    def pixel_fingerprint(self, mean: Sequence[float], std: Sequence[float], dtype: str = "uint8") -> dict[str, Any]:
        """The fingerprint of a pixel store of this recipe's preprocessing (``vitune.features.pixels``).

        It covers what the stored tiles depend on and nothing else: the tile size and aspect mode, the grid for
        anyres, the pad canvas colour for pad (the mean in 0-255, ``image.pad_fill``), and for ``bf16`` (tiles
        stored normalised) the mean and std. The tower's name, weights, layer and selection are not in it: one
        uint8 anyres store serves a CLIP and a SigLIP tower of the same tile size alike.
        """
        if dtype not in PIXEL_DTYPES:
            raise ValueError(f"unknown pixel dtype {dtype!r}; valid: {', '.join(PIXEL_DTYPES)}")
        fp: dict[str, Any] = {"form": "pixels", "pixel_dtype": dtype, "image_size": self.image_size,
                              "image_mode": self.image_mode}
        if self.image_mode == "anyres":
            fp["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        if self.image_mode == "pad":  # the canvas is filled with the mean colour before the resize
            fp["pad_fill"] = list(pad_fill(mean))
        if dtype == "bf16":  # normalised before storing: the affine is baked into the values
            fp["mean"], fp["std"] = [float(m) for m in mean], [float(s) for s in std]
        return fp


def aspect_fields(vision: Any, tile_size: int) -> dict[str, Any]:
    """A ``VisionConfig``'s aspect mode as recipe fields: the mode, and for anyres the grid in pixels, the
    merge and anyres_max_N's cap."""
    if vision.image_mode != "anyres":
        return {"image_mode": vision.image_mode}
    return {"image_mode": "anyres", "grid_pinpoints": parse_grid_pinpoints(vision.image_grid_pinpoints, tile_size),
            "patch_merge": vision.mm_patch_merge_type, "max_tiles": vision.max_tiles}


# ----------------------------------------------------------------------------------- AnyRes geometry


def parse_grid_pinpoints(spec: str | list, tile_size: int) -> tuple[tuple[int, int], ...]:
    """``image_grid_pinpoints`` as LLaVA-NeXT takes it: a list of pixel pairs, or the range form
    ``"(1x1),...,(6x6)"`` (every grid from the first to the last, times the tile size)."""
    if isinstance(spec, str):
        found = re.findall(r"\((\d+)x(\d+)\)", spec)
        if not found:
            raise ValueError(f"image_grid_pinpoints {spec!r}: expected a list of [h, w] or '(1x1),...,(NxM)'")
        (r0, c0), (r1, c1) = map(int, found[0]), map(int, found[-1])
        return tuple((r * tile_size, c * tile_size) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1))
    pairs = tuple((int(p[0]), int(p[1])) for p in spec)
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in spec):
        raise ValueError(f"image_grid_pinpoints {spec!r}: expected pairs of positive pixel sizes")
    return pairs


def select_best_resolution(height: int, width: int, pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The grid resolution ``(h, w)`` that keeps most of the image's pixels when it is fitted inside, and of
    those the one that wastes least (LLaVA-NeXT's mm_utils rule; transformers reads pairs as (h, w))."""
    best, best_kept, best_waste = pinpoints[0], -1, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (h, w), kept, waste
    return best


def anyres_grid(recipe: VisionRecipe, width: int, height: int) -> tuple[int, int]:
    """``(rows, cols)`` of tiles the best resolution for this image is cut into."""
    h, w = select_best_resolution(height, width, recipe.grid_pinpoints)
    return h // recipe.image_size, w // recipe.image_size


def unpadded_shape(recipe: VisionRecipe, width: int, height: int) -> tuple[int, int]:
    """``(rows, cols)`` of patch features left of the tiled grid once the padding is removed (spatial_unpad),
    after anyres_max_N's downsampling when the grid holds more than about N tiles' worth."""
    rows, cols = anyres_grid(recipe, width, height)
    g = recipe.grid
    cur_h, cur_w = g * rows, g * cols
    if width / height > cur_w / cur_h:  # wider than the grid: padding above and below
        cur_h -= 2 * ((cur_h - int(round(height * (cur_w / width), 7))) // 2)
    else:  # taller (or the same): padding left and right
        cur_w -= 2 * ((cur_w - int(round(width * (cur_h / height), 7))) // 2)
    if recipe.max_tiles is not None:
        times = math.sqrt(cur_h * cur_w / (recipe.max_tiles * g * g))
        if times > 1.1:
            cur_h, cur_w = int(cur_h // times), int(cur_w // times)
    return cur_h, cur_w


def tiles_for(recipe: VisionRecipe, width: int, height: int) -> int:
    """How many tower tiles an image of ``width`` x ``height`` pixels is cut into (pad and crop: one;
    anyres: the base view and the grid's tiles)."""
    if width < 1 or height < 1:
        raise ValueError(f"an image must be at least 1x1 pixels, got {width}x{height}")
    if recipe.image_mode != "anyres":
        return 1
    rows, cols = anyres_grid(recipe, width, height)
    return 1 + rows * cols


def visual_tokens(recipe: VisionRecipe, width: int, height: int, base_only: bool = False) -> int:
    """How many visual tokens an image of ``width`` x ``height`` pixels yields: the one count of the house.

    ``base_only``: the image's base view alone (OpenAI's ``detail: low``): one tile's tokens, whatever its size
    (for pad and crop that is every image's count anyway).
    """
    tiles = tiles_for(recipe, width, height)
    if base_only:
        return recipe.tokens_per_tile
    if recipe.image_mode != "anyres":
        return tiles * recipe.tokens_per_tile
    base = recipe.grid * recipe.grid  # the base view (anyres keeps patch tokens only)
    if recipe.patch_merge == "flat":
        return base + (tiles - 1) * base
    cur_h, cur_w = unpadded_shape(recipe, width, height)
    return base + cur_h * cur_w + cur_h  # the unpadded grid, one image newline per row


def preprocess_stats(vision: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` a tower built for a ``VisionConfig`` normalises with, without building it: open_clip's
    defaults, then its pretrained tag's, SigLIP's forced as ``vitune.model.vision.load_vision_tower`` forces
    them. A pixel store's fingerprint needs them where no tower is loaded (``vitune.layout``); a test checks them
    against built towers. Imports open_clip (and torch) when called, never at import."""
    timm = timm_tower(tower_config(vision.name).get("vision_cfg", {}), vision.name)
    if timm is not None:
        return tuple(timm.mean), tuple(timm.std)
    import open_clip  # deferred: pulls in torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    tag_cfg = open_clip.get_pretrained_cfg(vision.name, vision.pretrained) if vision.pretrained else {}
    mean, std = tag_cfg.get("mean", OPENAI_DATASET_MEAN), tag_cfg.get("std", OPENAI_DATASET_STD)
    return tuple(float(m) for m in mean), tuple(float(x) for x in std)


def model_recipe(vision: Any) -> VisionRecipe | None:
    """The recipe a model built for a ``VisionConfig`` packs its tiles by: ``VisionRecipe.of`` for anyres (the
    config's grid, ``mm_patch_merge_type`` and ``anyres_max_N`` cap), None for pad and crop (one tile, as is)."""
    return VisionRecipe.of(vision) if vision.image_mode == "anyres" else None
