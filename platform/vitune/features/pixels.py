"""The pixel store: each image's preprocessed tiles before the tower, for a run whose vision tower trains.

The feature job's sibling (``features.form=pixels``, same command: ``vitune features`` /
``jobs/extract_features.py``): the same plan, lease, exactly-once shard commit, quarantine and manifest as the
feature store (``vitune.features.store``, ``vitune.features.extract``), but a shard's payload is the tiles that
``image.preprocess_tiles`` would hand the tower, so training runs the tower in its step. Layout at ``<uri>``
(default ``<storage.root>/pixels/<pixel fingerprint id>``, ``vitune.layout.store_output``): the feature store's
files, with shard rows

    image_key (string)   pixels (large_binary)   num_tiles (int32)   size ([width, height] int32)

``pixels`` is one image's tiles ``[T, 3, S, S]``, C order, ``T = num_tiles`` (``vision_recipe.tiles_for``: one
for pad and crop, the base view + the grid for anyres), in the manifest's ``schema.dtype``:

- ``uint8`` (the default): the 0-255 values of the RGB views PIL's bicubic resize produced, before
  normalisation. Exact: vitune's preprocessing (``vitune.model.image``) resizes, pads and crops uint8 PIL
  images and only then normalises, ``(x / 255 - mean) / std`` per channel, so the stored bytes lose nothing
  and ``pixel_values`` (the affine, as a 256-entry table per channel computed by ``image.normalize`` itself)
  gives the float32 tiles ``preprocess_tiles`` gives, bit for bit, on any device. Half the bytes of bf16 and
  independent of the tower's mean/std beyond pad's canvas colour.
- ``bf16``: the normalised float32 tiles rounded to bfloat16 (little-endian bit patterns). Lossy against the
  float32 tiles (8-bit mantissa), but exactly what a tower running in bf16 sees (its first op casts the
  pixels); twice the bytes of uint8. For a reader that wants normalised values without the table.

The fingerprint (``VisionRecipe.pixel_fingerprint``: form, dtype, tile size, aspect mode, anyres grid, pad's
fill colour, bf16's mean/std) says what the pixels depend on and not the tower's weights or layer: a pixel
store serves any tower of that preprocessing, its id never equals a feature store's (they never share a
folder), and a changed grid makes a new store. The format version is 4, which a feature-store reader refuses;
``FeatureStore.open`` refuses a pixel store with the reason, and ``PixelStore.open`` a feature store.

``features_from_pixels`` turns stored tiles into exactly the features the feature job would have written for
the same tower (same layer, same selection: the tower's own forward), with gradients when the tower trains.
This module never imports Ray, and imports torch only in the helpers that build tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from vitune.features.store import (
    KEY_COLUMN,
    SHARD_METADATA_KEY,
    SIZE_COLUMN,
    TILES_COLUMN,
    FeatureStore,
)
from vitune.vision_recipe import (
    PIXEL_DTYPES,
    VisionRecipe,
    check_fingerprint,
    fingerprint_diffs,
    tiles_for,
    visual_tokens,
)

PIXELS_COLUMN = "pixels"
PIXELS_FORMAT_VERSION = 4  # 4: a pixel store (a feature-store reader knows 1-3 and refuses it)
PIXELS_LAYOUT = "pixels"  # the manifest schema's ``layout``
# how each pixel dtype is held: numpy's dtype of the stored values (bf16 as its little-endian bit patterns)
STORED_NUMPY = {"uint8": np.dtype("u1"), "bf16": np.dtype("<u2")}
SCHEMA_DTYPE = {"uint8": "uint8", "bf16": "bfloat16"}


def pixel_schema(dtype: str, tile_size: int) -> dict[str, Any]:
    """The manifest's ``schema`` of a pixel store of ``dtype`` with tiles of ``tile_size`` pixels."""
    if dtype not in PIXEL_DTYPES:
        raise ValueError(f"unknown pixel dtype {dtype!r}; valid: {', '.join(PIXEL_DTYPES)}")
    what = ("0-255 before normalisation" if dtype == "uint8"
            else "normalised, bfloat16 bit patterns little-endian")
    return {"columns": [KEY_COLUMN, PIXELS_COLUMN, TILES_COLUMN, SIZE_COLUMN], "layout": PIXELS_LAYOUT,
            "dtype": SCHEMA_DTYPE[dtype], "pixel_dtype": dtype, "shape": [3, tile_size, tile_size],
            "encoding": f"{SCHEMA_DTYPE[dtype]} bytes of [num_tiles, 3, S, S], C order ({what})"}


def pixel_shard_table(keys: Sequence[str], pixels: np.ndarray, tiles: Sequence[int], sizes: Sequence[Sequence[int]],
                      metadata: Mapping[str, Any] | None = None) -> pa.Table:
    """A pixel shard's Arrow table from one shard's tiles ``pixels [sum T, 3, S, S]`` (uint8, or bf16 bit
    patterns as uint16) and each image's tile count: each row's bytes are a slice of the one buffer (no copy)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.dtype not in STORED_NUMPY.values():
        raise ValueError(f"expected tiles [sum T, 3, S, S] of uint8 or uint16, got {pixels.dtype} {pixels.shape}")
    if len(tiles) != len(keys) or len(sizes) != len(keys) or sum(tiles) != pixels.shape[0]:
        raise ValueError(f"{len(keys)} keys, {len(tiles)} tile counts (sum {sum(tiles)}), {len(sizes)} sizes "
                         f"for {pixels.shape[0]} tiles")
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype.byteorder == ">":
        pixels = pixels.astype(pixels.dtype.newbyteorder("<"))
    tile_bytes = pixels[0].nbytes if len(pixels) else 0
    offsets = pa.py_buffer(np.cumsum([0, *tiles], dtype=np.int64) * tile_bytes)
    flat_sizes = pa.array(np.asarray(sizes, dtype=np.int32).reshape(-1), type=pa.int32())
    table = pa.table({
        KEY_COLUMN: pa.array(list(keys), type=pa.string()),
        PIXELS_COLUMN: pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(keys),
                                                        [None, offsets, pa.py_buffer(pixels)]),
        TILES_COLUMN: pa.array(list(tiles), type=pa.int32()),
        SIZE_COLUMN: pa.FixedSizeListArray.from_arrays(flat_sizes, 2),
    })
    if metadata is not None:
        table = table.replace_schema_metadata({SHARD_METADATA_KEY: json.dumps(dict(metadata)).encode()})
    return table


def pixel_arrays(column: pa.ChunkedArray | pa.Array, num_tiles: pa.ChunkedArray | pa.Array, tile_size: int,
                 dtype: str) -> list[np.ndarray]:
    """A pixel shard's ``pixels`` + ``num_tiles`` columns → each image's ``[T_i, 3, S, S]`` (uint8, or bf16 bit
    patterns as uint16; read-only views of one buffer). Raises when a row's bytes are not its tiles."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    counts = (num_tiles.combine_chunks() if isinstance(num_tiles, pa.ChunkedArray) else num_tiles).to_numpy(
        zero_copy_only=False).astype(np.int64)
    if len(counts) != len(array):
        raise ValueError(f"{len(array)} pixel rows but {len(counts)} num_tiles")
    if not len(array):
        return []
    if array.type == pa.binary():
        array = array.cast(pa.large_binary())
    stored = STORED_NUMPY[dtype]
    _, offset_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offset_buf, dtype=np.int64)[array.offset:array.offset + len(array) + 1]
    tile_bytes = 3 * tile_size * tile_size * stored.itemsize
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != counts * tile_bytes)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"pixels row {i} holds {lengths[i]} bytes; its num_tiles={counts[i]} tiles of "
                         f"[3, {tile_size}, {tile_size}] {dtype} take {counts[i] * tile_bytes}")
    nbytes = int(offsets[-1] - offsets[0])
    data = np.frombuffer(data_buf, dtype=stored, count=nbytes // stored.itemsize, offset=int(offsets[0]))
    flat = data.reshape(-1, 3, tile_size, tile_size)  # [sum T, 3, S, S]
    return np.split(flat, np.cumsum(counts)[:-1])


def stored_pixel_bytes_per_image(recipe: VisionRecipe, width: int, height: int, dtype: str = "uint8") -> int:
    """The bytes one image of ``width`` x ``height`` takes in a pixel store (before Parquet's framing and
    compression): its tiles x ``[3, S, S]`` x 1 (uint8) or 2 (bf16), plus ``size``, ``num_tiles`` and the
    64-bit offset; the key not counted (``store.stored_bytes_per_image`` is the feature store's)."""
    per_tile = 3 * recipe.image_size**2 * STORED_NUMPY[dtype].itemsize
    return tiles_for(recipe, width, height) * per_tile + 2 * 4 + 4 + 8


def geometry(fp: Mapping[str, Any]) -> VisionRecipe:
    """The tile geometry a pixel fingerprint records, as a recipe for ``tiles_for`` (no tower named: a pixel
    store has none; only the tile size, aspect mode and grid are meaningful)."""
    return VisionRecipe(tower="", pretrained=None, feature_layer=0, select="patch", image_mode=fp["image_mode"],
                        image_size=int(fp["image_size"]), patch_size=None, hidden_size=None,
                        grid_pinpoints=tuple(tuple(p) for p in fp.get("grid_pinpoints") or ()))


class PixelStore(FeatureStore):
    """Read side of a finished pixel store: ``get`` gives each image's stored tiles ``[T, 3, S, S]``; keys,
    sizes, tile counts, errors, the record join and Ray Data as a feature store's."""

    def __init__(self, uri: str, manifest: dict[str, Any]):
        self.uri = uri
        self.manifest = manifest
        self.fingerprint: dict[str, Any] = manifest["fingerprint"]
        schema = manifest["schema"]
        self.pixel_dtype: str = schema["pixel_dtype"]
        self.tile_size: int = int(schema["shape"][-1])
        self.recipe = geometry(self.fingerprint)
        self.tiled = True  # every row holds num_tiles tiles (pad and crop: 1)
        self._shards = manifest["shards"]
        self._first_keys = [s["key_range"][0] for s in self._shards]

    @classmethod
    def open(cls, uri: str, expect_fingerprint: Mapping[str, Any] | None = None) -> PixelStore:
        """Open the pixel store at ``uri``; refuse a feature store, or one whose fingerprint differs from
        ``expect_fingerprint`` (``vision.pixel_fingerprint`` of the training tower)."""
        manifest = cls.read_manifest(uri)
        if manifest.get("fingerprint", {}).get("form") != "pixels":
            raise ValueError(f"{uri} is a feature store (a frozen tower's features), not a pixel store: a tower "
                             "that trains needs the preprocessed tiles; run the feature job with "
                             "features.form=pixels")
        if manifest.get("format_version") != PIXELS_FORMAT_VERSION:
            raise ValueError(f"pixel store {uri} has format_version {manifest.get('format_version')!r}; this "
                             f"reader knows {PIXELS_FORMAT_VERSION}")
        check_fingerprint(expect_fingerprint, manifest["fingerprint"], uri)
        return cls(uri, manifest)

    def _features(self, table: pa.Table) -> list[np.ndarray]:
        """A shard table's tiles, each image's ``[T_i, 3, S, S]``, checked against its size (``tiles_for``)."""
        tiles = pixel_arrays(table.column(PIXELS_COLUMN), table.column(TILES_COLUMN), self.tile_size,
                             self.pixel_dtype)
        sizes = table.column(SIZE_COLUMN).combine_chunks().flatten().to_numpy().reshape(-1, 2)
        for key, t, (w, h) in zip(table.column(KEY_COLUMN).to_pylist(), tiles, sizes.tolist(), strict=True):
            if t.shape[0] != (want := tiles_for(self.recipe, w, h)):
                raise ValueError(f"pixel store {self.uri}: image {key!r} ({w}x{h}) holds {t.shape[0]} tiles; "
                                 f"its recipe cuts it into {want}")
        return tiles

    def iter_shards(self) -> Iterator[pa.Table]:
        """Each shard's table as stored (``pixel_arrays`` gives its tiles)."""
        for uri in self.shard_uris():
            yield self._read(uri)

    def visual_tokens(self, recipe: VisionRecipe | None = None) -> dict[str, int]:
        """Visual tokens each stored image becomes for the model's ``recipe`` (needed: the store has no tower),
        which must cut images the way the store did."""
        if recipe is None:
            raise ValueError("a pixel store names no tower: pass the model's recipe to count its visual tokens")
        diffs = fingerprint_diffs(geometry_fields(recipe), geometry_fields(self.recipe))
        if diffs:
            raise ValueError(f"the recipe cuts images otherwise than pixel store {self.uri}: {diffs}")
        sizes = self.image_sizes()
        return {key: visual_tokens(recipe, *sizes[key]) for key in self.keys()}

    def to_pixel_values(self, tiles: Any, mean: Sequence[float], std: Sequence[float], device: Any = None) -> Any:
        """One image's (or a batch's) stored tiles → float32 pixel values for the tower (``pixel_values``)."""
        return pixel_values(tiles, self.pixel_dtype, mean, std, device)


def geometry_fields(recipe: VisionRecipe) -> dict[str, Any]:
    """What decides how a recipe cuts an image into tiles."""
    return {"image_size": recipe.image_size, "image_mode": recipe.image_mode,
            "grid_pinpoints": [list(p) for p in recipe.grid_pinpoints]}


def pixel_values(tiles: Any, dtype: str, mean: Sequence[float], std: Sequence[float], device: Any = None) -> Any:
    """Stored tiles ``[..., 3, S, S]`` (numpy or torch; uint8, or bf16 bit patterns as uint16) → the float32
    tiles ``image.preprocess_tiles`` gives, on ``device``: uint8 through ``image.normalize_uint8`` (exact),
    bf16 widened (exact from the stored bf16). The step applies this on the device, after the transfer of
    the smaller stored tiles."""
    import torch  # deferred: the store's reader needs no torch

    from vitune.model.image import normalize_uint8

    if dtype not in PIXEL_DTYPES:
        raise ValueError(f"unknown pixel dtype {dtype!r}; valid: {', '.join(PIXEL_DTYPES)}")
    if isinstance(tiles, np.ndarray):
        # a copy (the store's views are read-only, which torch will not wrap); bf16 bits as int16 for torch
        tiles = torch.from_numpy(np.array(tiles, dtype=STORED_NUMPY[dtype]).view("u1" if dtype == "uint8" else "i2"))
    if device is not None:
        tiles = tiles.to(device, non_blocking=True)
    if dtype == "uint8":
        return normalize_uint8(tiles, mean, std)
    return tiles.view(torch.bfloat16).float()  # bf16 → float32 is exact


def check_tower(tower: Any, fp: Mapping[str, Any], uri: str = "pixel store") -> None:
    """Refuse a tower whose preprocessing would make other pixels than the store ``fp`` holds."""
    from vitune.model.vision import pixel_fingerprint

    check_fingerprint(pixel_fingerprint(tower, fp["pixel_dtype"]), fp, uri)


def features_from_pixels(tower: Any, tiles: Sequence[Any], fp: Mapping[str, Any]) -> list[Any]:
    """Each image's stored tiles ``[T_i, 3, S, S]`` → its features ``[T_i, N, D]`` through ``tower``: exactly
    what the feature job computes for that tower (its own forward: same layer, same selection), in one call,
    with autograd when the tower trains (the caller picks ``torch.no_grad`` or not). ``fp`` is the store's
    fingerprint; a tower of another preprocessing is refused."""
    import torch

    check_tower(tower, fp)
    if not tiles:
        return []
    pixels = torch.cat([pixel_values(t, fp["pixel_dtype"], tower.mean, tower.std, tower.device) for t in tiles])
    return list(tower(pixels).split([len(t) for t in tiles]))  # each [T_i, N, D]
