"""Image decoding and tower preprocessing: bytes → RGB PIL image → normalised tiles `[T, 3, S, S]`.

This is the single definition of how an image becomes pixels for the vision tower; the feature job,
evaluation and serving all reach it through `vitune.model.vision` (`encode_images`, `encode_image_tiles`),
so they cannot skew.

Decisions:
- Alpha is composited onto white (what a viewer shows on a white page), instead of PIL's plain
  `convert("RGB")` that exposes whatever colour transparent pixels happen to store (often black).
- EXIF orientation is applied, so a phone photo is encoded the way a person sees it.
- Animated images use their first frame.
- `pad` is LLaVA v1.5's expand-to-square: the image is centred on a square canvas filled with the
  tower's mean colour (`int(m * 255)` per channel), then resized to `size` with bicubic resampling.
  `crop` is CLIP's eval transform: resize the shortest side to `size` (bicubic), then centre crop.
- `anyres` (LLaVA-NeXT) is a base view (the whole image resized to `size` x `size`, aspect not kept) followed by
  the tiles of a grid: the image is resized, aspect kept, to fit the grid resolution
  `vitune.vision_recipe.select_best_resolution` picks (its sides rounded up, as transformers does), centred on
  a black canvas of that resolution (zeros before normalisation, as LLaVA-NeXT and transformers pad) and cut
  into `size` x `size` tiles row by row. The geometry (grid, tile count) is the recipe's; the pixels equal
  transformers' `LlavaNextImageProcessor` / `LlavaOnevisionImageProcessor` with the PIL backend.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vitune.vision_recipe import VisionRecipe, pad_fill, select_best_resolution, tiles_for

logger = logging.getLogger(__name__)

ImageMode = Literal["pad", "crop"]
IMAGE_MODES: tuple[str, ...] = ("pad", "crop")

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_ASPECT = 100.0
_WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An image that cannot be used: undecodable, empty, or of absurd dimensions."""


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, GIF, ...) into a fully loaded RGB image.

    Dimensions are checked from the header before the pixel data is decoded, so an oversized image
    is refused without allocating it. Raises `ImageError` naming the reason.
    """
    if not data:
        raise ImageError("empty image bytes")
    with warnings.catch_warnings():
        # We enforce our own pixel limit below; PIL's bomb warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageError(f"not a recognised image format ({len(data)} bytes)") from exc
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image too large to decode safely: {exc}") from exc
        except Exception as exc:  # PIL raises many types on malformed headers
            raise ImageError(f"cannot decode image header: {exc}") from exc
        width, height = image.size
        check_dimensions(width, height, max_pixels=max_pixels, max_aspect=max_aspect)
        try:
            image.load()
        except Exception as exc:  # truncated or corrupt pixel data
            raise ImageError(f"cannot decode image data ({width}x{height} {image.format}): {exc}") from exc
    return to_rgb(image)


def check_dimensions(
    width: int,
    height: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> None:
    """Raise `ImageError` for a zero-size image, more than `max_pixels`, or aspect over `max_aspect`."""
    if width <= 0 or height <= 0:
        raise ImageError(f"zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"image has {width * height} pixels ({width}x{height}), over the limit of {max_pixels}")
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        raise ImageError(f"image aspect ratio {aspect:.1f} ({width}x{height}) is over the limit of {max_aspect:g}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Return `image` as mode RGB, EXIF orientation applied and alpha composited onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        # Palette images may carry transparency as an index; expand it to a real alpha channel.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _high_depth_to_l(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float grayscale image to 8 bits by its nominal range."""
    array = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        array = array / 65535.0
    elif image.mode == "I":
        array = array / max(float(array.max()), 1.0) if array.max() > 255 else array / 255.0
    # "F" is taken to be in [0, 1] already.
    array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="L")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `image` on a square canvas of its longer side filled with `fill` (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shortest_and_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIP's eval geometry: bicubic resize of the shortest side to `size`, then a centre crop."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # floor, as CLIPImageProcessor's centre crop (official LLaVA, and the llava-hf export's processor) rounds
    left = (new_w - size) // 2
    top = (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def fit_to_square(image: Image.Image, size: int, mean: Sequence[float], mode: ImageMode) -> Image.Image:
    """The RGB `size`×`size` PIL image the tower sees, before conversion to a tensor."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"unknown image mode {mode!r}; valid modes: {', '.join(IMAGE_MODES)}")
    image = to_rgb(image)
    if mode == "pad":
        image = expand_to_square(image, pad_fill(mean))
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return image
    return resize_shortest_and_crop(image, size)


def normalize(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image → float32 tensor `[3, H, W]`, scaled to [0, 1] then `(x - mean) / std`."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def preprocess(
    image: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    mode: ImageMode = "pad",
) -> torch.Tensor:
    """Image → normalised float32 tensor `[3, size, size]` for a tower of resolution `size`."""
    return normalize(fit_to_square(image, size, mean, mode), mean, std)


def fit_inside(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """`(w, h)` of an image resized, aspect kept, to fit `target_w` x `target_h`: one side fills its target,
    the other is rounded up (transformers' `get_patch_output_size`) and never exceeds its target."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, min(math.ceil(height * scale_w), target_h)
    return min(math.ceil(width * scale_h), target_w), target_h


def base_view(image: Image.Image, size: int) -> Image.Image:
    """AnyRes's base view: the whole RGB image resized to `size` x `size` (bicubic, aspect not kept); unchanged
    when already that size. Alone it is what OpenAI's `detail: low` sends an anyres model."""
    image = to_rgb(image)
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


def anyres_views(image: Image.Image, recipe: VisionRecipe) -> list[Image.Image]:
    """An image's AnyRes views as RGB PIL images of `recipe.image_size` square: the base view, then the grid's
    tiles row by row (LLaVA-NeXT's order); as many as `vitune.vision_recipe.tiles_for` counts."""
    if recipe.image_mode != "anyres":
        raise ValueError(f"anyres_views needs an anyres recipe, got image mode {recipe.image_mode!r}")
    image = to_rgb(image)
    width, height = image.size
    size = recipe.image_size
    grid_h, grid_w = select_best_resolution(height, width, recipe.grid_pinpoints)
    if grid_h % size or grid_w % size:
        raise ValueError(f"grid resolution {grid_h}x{grid_w} (h x w) is not a multiple of the tile size {size}; "
                         "image_grid_pinpoints must be multiples of the tower's image size")
    new_w, new_h = fit_inside(width, height, grid_w, grid_h)
    canvas = Image.new("RGB", (grid_w, grid_h), (0, 0, 0))
    resized = image if (new_w, new_h) == (width, height) else image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas.paste(resized, ((grid_w - new_w) // 2, (grid_h - new_h) // 2))
    tiles = [canvas.crop((left, top, left + size, top + size))
             for top in range(0, grid_h, size) for left in range(0, grid_w, size)]
    views = [base_view(image, size), *tiles]
    if len(views) != tiles_for(recipe, width, height):  # the recipe's count is the one the rest of the house uses
        raise RuntimeError(f"{len(views)} views of a {width}x{height} image; the recipe counts "
                           f"{tiles_for(recipe, width, height)}")
    return views


def tile_views(image: Image.Image, recipe: VisionRecipe, mean: Sequence[float]) -> list[Image.Image]:
    """The RGB `S` x `S` PIL views the tower sees for an image, before normalisation: one for pad and crop
    (`fit_to_square`), the base view and the grid's tiles for anyres (`anyres_views`)."""
    if recipe.image_mode == "anyres":
        return anyres_views(image, recipe)
    return [fit_to_square(image, recipe.image_size, mean, recipe.image_mode)]  # type: ignore[arg-type]


def tiles_uint8(image: Image.Image, recipe: VisionRecipe, mean: Sequence[float]) -> np.ndarray:
    """The image's tiles as the 0-255 values PIL's resize produced, `[T, 3, S, S]` uint8: `preprocess_tiles`
    before its normalisation (`normalize_uint8` of this is `preprocess_tiles`, bit for bit)."""
    return np.stack([np.asarray(view, dtype=np.uint8).transpose(2, 0, 1) for view in tile_views(image, recipe, mean)])


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`[3, 256]` float32: channel c's normalised value of each 0-255 level, computed as `normalize` does."""
    levels = np.arange(256, dtype=np.float32)[:, None].repeat(3, axis=1)[None]  # [1, 256, 3]: an image row
    return normalize(Image.fromarray(levels.astype(np.uint8), mode="RGB"), mean, std)[:, 0, :]  # [3, 256]


def normalize_uint8(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    table: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 tiles `[..., 3, S, S]` → the float32 `normalize` gives for them, on the tiles' device.

    A lookup in `normalize_table` rather than `(x / 255 - mean) / std` on the device: a GPU divides by a scalar
    as a multiply by its reciprocal, which can round the last bit differently; the table is computed once on
    the CPU by `normalize` itself, so the result equals the CPU preprocessing exactly on any device. `table`
    (e.g. kept on the device by the caller) saves recomputing it.
    """
    if pixels.dtype != torch.uint8 or pixels.shape[-3] != 3:
        raise ValueError(f"expected uint8 tiles [..., 3, S, S], got {pixels.dtype} {tuple(pixels.shape)}")
    lut = (normalize_table(mean, std) if table is None else table).to(pixels.device)  # [3, 256]
    channels = torch.arange(3, device=pixels.device).view(3, 1, 1)  # [3, 1, 1]
    return lut[channels, pixels.long()]  # [..., 3, S, S] float32


def preprocess_tiles(image: Image.Image, recipe: VisionRecipe, mean: Sequence[float],
                     std: Sequence[float], base_only: bool = False) -> torch.Tensor:
    """Image → normalised float32 tiles `[T, 3, S, S]` by the recipe: one tile for pad and crop (the same pixels
    as `preprocess`), the base view and the grid's tiles for anyres (`base_only`: the base view alone, T = 1,
    OpenAI's `detail: low`; `vision_recipe.visual_tokens(..., base_only=True)` counts it)."""
    if recipe.image_mode == "anyres" and base_only:
        return normalize(base_view(image, recipe.image_size), mean, std)[None]
    if recipe.image_mode != "anyres":
        return preprocess(image, recipe.image_size, mean, std, recipe.image_mode)[None]  # type: ignore[arg-type]
    return torch.stack([normalize(view, mean, std) for view in anyres_views(image, recipe)])
