"""Inputs of instruction generation: images with captions and boxes, read from COCO JSON or JSONL at any URI.

Two formats, turned into the same ``ImageContext`` (boxes normalised to [0, 1] as ``[x1, y1, x2, y2]``):

- ``coco``: one or more COCO annotation files (``captions_*.json`` and/or ``instances_*.json``, each with
  ``images``, ``annotations`` and, for instances, ``categories``). Images are merged by ``id`` across files;
  ``bbox`` is COCO's ``[x, y, w, h]`` in pixels, normalised by the image's ``width``/``height``. The record
  image path is ``image_prefix + file_name``. Degenerate boxes (zero width or height) are dropped.
- ``jsonl``: one image per line, ``{"image": "rel/path.jpg", "id"?: str, "captions": [str, ...],
  "boxes"?: [{"category": str, "bbox": [x1, y1, x2, y2]}], "width"?: int, "height"?: int}``. When both
  ``width`` and ``height`` are given, boxes are in pixels; otherwise they must already be normalised to
  [0, 1]. A bad line is reported with its reason, never guessed at.

The symbolic context shown to the LLM is the captions, one per line, and, for the kinds that use boxes, a
blank line and one ``category: [x1, y1, x2, y2]`` line per object, rounded as in the paper.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vitune import storage

log = logging.getLogger(__name__)

_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class InputError(ValueError):
    """An input image that cannot be used; ``reason`` is short and machine-readable, for counting."""

    def __init__(self, reason: str, detail: str, *, source: str | None = None, raw: Any = None):
        super().__init__(f"{reason}: {detail}" + (f" ({source})" if source else ""))
        self.reason = reason
        self.detail = detail
        self.source = source
        self.raw = raw

    def to_json(self) -> dict[str, Any]:
        return {"stage": "input", "reason": self.reason, "detail": self.detail, "source": self.source,
                "raw": self.raw}


@dataclass
class Box:
    category: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in [0, 1]

    @property
    def area(self) -> float:
        return (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])


@dataclass
class ImageContext:
    """One image's symbolic description: ``key`` names it in record ids, ``image`` is relative to the image root."""

    key: str
    image: str
    captions: list[str]
    boxes: list[Box] = field(default_factory=list)

    def context(self, with_boxes: bool, decimals: int = 3, max_boxes: int | None = None) -> str:
        """The text the LLM sees: captions, then (optionally) ``category: [x1, y1, x2, y2]`` lines."""
        text = "\n".join(c.strip() for c in self.captions)
        boxes = self.boxes
        if max_boxes is not None and len(boxes) > max_boxes:
            keep = set(sorted(range(len(boxes)), key=lambda i: -boxes[i].area)[:max_boxes])
            boxes = [b for i, b in enumerate(boxes) if i in keep]  # largest ones, in input order
        if with_boxes and boxes:
            text += "\n\n" + "\n".join(
                f"{b.category}: [{', '.join(_fmt(v, decimals) for v in b.bbox)}]" for b in boxes)
        return text


def _fmt(value: float, decimals: int) -> str:
    return repr(round(float(value), decimals))  # 0.5 -> "0.5", 0.12345 -> "0.123" (as in the paper's examples)


def _clamp01(v: float) -> float:
    return min(1.0, max(0.0, v))


def _check_image_path(image: Any) -> str:
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"'image' must be a non-empty relative path, got {image!r}")
    if image.startswith(("/", "\\")) or _URI_SCHEME.match(image) or ".." in image.replace("\\", "/").split("/"):
        raise ValueError(f"'image' {image!r} must be relative to the image root")
    return image


def _as_uris(uris: str | Iterable[str]) -> list[str]:
    return [uris] if isinstance(uris, str) else list(uris)


def read_coco(uris: str | Iterable[str], image_prefix: str = "") -> tuple[list[ImageContext], list[InputError]]:
    """Merge COCO caption/instance files into ``ImageContext``s (ordered by image id)."""
    images: dict[Any, dict] = {}
    captions: dict[Any, list[str]] = {}
    boxes: dict[Any, list[tuple[Any, list[float]]]] = {}
    categories: dict[Any, str] = {}
    errors: list[InputError] = []
    for uri in _as_uris(uris):
        data = storage.read_json(uri)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{uri}: not a COCO annotation file (no 'images' list)")
        for img in data["images"]:
            images.setdefault(img["id"], img)
        for cat in data.get("categories") or []:
            categories[cat["id"]] = cat["name"]
        for ann in data.get("annotations") or []:
            if isinstance(ann.get("caption"), str):
                captions.setdefault(ann["image_id"], []).append(ann["caption"])
            if ann.get("bbox") is not None and "category_id" in ann:
                boxes.setdefault(ann["image_id"], []).append((ann["category_id"], ann["bbox"]))
    out: list[ImageContext] = []
    dropped = 0
    for image_id in sorted(images, key=lambda i: (str(type(i)), i)):
        img = images[image_id]
        source = f"coco image {image_id}"
        caps = [c.strip() for c in captions.get(image_id, []) if c.strip()]
        if not caps:
            errors.append(InputError("no_captions", "image has no captions", source=source, raw=img))
            continue
        w, h = img.get("width"), img.get("height")
        norm: list[Box] = []
        if boxes.get(image_id):
            if not (isinstance(w, int | float) and isinstance(h, int | float) and w > 0 and h > 0):
                errors.append(InputError("bad_size", f"width/height {w!r}x{h!r} cannot normalise boxes",
                                         source=source, raw=img))
                continue
            for cat_id, (x, y, bw, bh) in boxes[image_id]:
                if bw <= 0 or bh <= 0:
                    dropped += 1
                    continue
                name = categories.get(cat_id, str(cat_id))
                norm.append(Box(name, (_clamp01(x / w), _clamp01(y / h), _clamp01((x + bw) / w),
                                       _clamp01((y + bh) / h))))
        key = f"{image_id:012d}" if isinstance(image_id, int) else str(image_id)
        out.append(ImageContext(key=key, image=image_prefix + img["file_name"], captions=caps, boxes=norm))
    if dropped:
        log.info("COCO: dropped %d degenerate boxes (zero width or height)", dropped)
    return out, errors


def parse_jsonl_image(raw: Any) -> ImageContext:
    """One JSONL input line (already parsed) → ``ImageContext``; raises ``ValueError`` naming the problem."""
    if not isinstance(raw, dict):
        raise ValueError(f"line is not a JSON object (got {type(raw).__name__})")
    image = _check_image_path(raw.get("image"))
    caps = raw.get("captions")
    if isinstance(caps, str):
        caps = [caps]
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ValueError("'captions' must be a list of strings")
    caps = [c.strip() for c in caps if c.strip()]
    if not caps:
        raise ValueError("no captions")
    w, h = raw.get("width"), raw.get("height")
    pixels = w is not None and h is not None
    if pixels and not (isinstance(w, int | float) and isinstance(h, int | float) and w > 0 and h > 0):
        raise ValueError(f"width/height must be positive numbers, got {w!r}x{h!r}")
    out: list[Box] = []
    for i, box in enumerate(raw.get("boxes") or []):
        if not isinstance(box, dict) or not isinstance(box.get("category"), str) or not box["category"].strip():
            raise ValueError(f"box {i} needs a 'category' string and a 'bbox'")
        bb = box.get("bbox")
        if not (isinstance(bb, list) and len(bb) == 4 and all(isinstance(v, int | float) for v in bb)):
            raise ValueError(f"box {i} 'bbox' must be [x1, y1, x2, y2], got {bb!r}")
        x1, y1, x2, y2 = (float(v) for v in bb)
        if pixels:
            x1, x2, y1, y2 = x1 / w, x2 / w, y1 / h, y2 / h
        elif not all(-1e-6 <= v <= 1 + 1e-6 for v in (x1, y1, x2, y2)):
            raise ValueError(f"box {i} {bb!r} is not normalised to [0, 1] (give width and height for pixel boxes)")
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"box {i} {bb!r} is empty or inverted (need x2 > x1 and y2 > y1)")
        out.append(Box(box["category"].strip(), (_clamp01(x1), _clamp01(y1), _clamp01(x2), _clamp01(y2))))
    key = raw.get("id")
    key = str(key) if key is not None and str(key).strip() else image
    return ImageContext(key=key, image=image, captions=caps, boxes=out)


def read_jsonl(uris: str | Iterable[str]) -> tuple[list[ImageContext], list[InputError]]:
    """Read JSONL input files; every bad line becomes an ``InputError`` with its reason."""
    out: list[ImageContext] = []
    errors: list[InputError] = []
    for uri in _as_uris(uris):
        for lineno, line in enumerate(storage.read_text(uri).splitlines(), start=1):
            if not line.strip():
                continue
            source = f"{uri}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(InputError("invalid_json", str(exc), source=source, raw=line))
                continue
            try:
                out.append(parse_jsonl_image(raw))
            except ValueError as exc:
                errors.append(InputError("bad_input", str(exc), source=source, raw=raw))
    return out, errors


def read_inputs(uris: str | Iterable[str], fmt: str, image_prefix: str = "",
                max_images: int | None = None) -> tuple[list[ImageContext], list[InputError]]:
    """Read ``fmt`` (``coco`` | ``jsonl``) inputs; an image listed twice is kept once, the rest reported."""
    uris = _as_uris(uris)
    if not uris:
        raise ValueError("generate.input is empty: name COCO annotation files or JSONL files")
    readers = {"coco": lambda: read_coco(uris, image_prefix), "jsonl": lambda: read_jsonl(uris)}
    if fmt not in readers:
        raise ValueError(f"unknown input format {fmt!r}; valid formats: {', '.join(sorted(readers))}")
    images, errors = readers[fmt]()
    seen_images: set[str] = set()
    seen_keys: set[str] = set()
    unique: list[ImageContext] = []
    for img in images:
        if img.image in seen_images or img.key in seen_keys:
            errors.append(InputError("duplicate_image", f"{img.image} (id {img.key}) listed more than once",
                                     source=img.key))
            continue
        seen_images.add(img.image)
        seen_keys.add(img.key)
        unique.append(img)
    if max_images is not None:
        unique = unique[:max_images]
    return unique, errors
