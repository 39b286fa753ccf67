"""The feature store on storage: fp16 Parquet shards ``{image_key, features, size}`` + ``manifest.json``.

Layout of a store at ``<uri>`` (local folder or ``s3://``)::

    plan.json                  what the store is for: fingerprint, shard size, key-set hash (written first)
    shard-00000.parquet ...    rows ``image_key`` (string), ``features`` (fixed-shape tensor [N, D] float16) and
                               ``size`` (the decoded image's [width, height], int32; absent in stores of format 1)
                               anyres stores (format 3) hold a variable number of tiles per image instead:
                               ``features`` is the image's tile features ``[T, N, D]`` as raw float16 bytes
                               (little-endian, C order; ``large_binary``), ``num_tiles`` (int32) is its T
                               (``vision_recipe.tiles_for``) and ``size`` is required
    errors/shard-00000.jsonl   quarantined images of that shard: ``{image_key, uri, reason, shard}``
    manifest.json              written last: fingerprint, config, counts, shard list, schema, timings
    lease.json / .lease.lock   while a run writes the store: its lease (S3) or file lock (local), see ``lease``

A shard file exists only complete (local temp + fsync + rename, or one MD5-checked S3 PUT / an aborted
multipart upload), and a run reuses a shard file only after ``shard_problem`` finds its footer, row count,
key range, tower and (against a manifest) size right; anything else is recomputed.
``features`` is Arrow's canonical ``arrow.fixed_shape_tensor`` extension type, which plain
pyarrow and Ray Data both read back as ``[rows, N, D]``; a store whose tensor column arrives flat (a flat
or fixed-size list, or Ray's own tensor extension when Ray is not imported) is reshaped from the
manifest's schema. Tiles are raw bytes rather than a nested float16 list because they read back about
ten times faster: one buffer, no Parquet repetition levels per value (8-13x against ``large_list<float16>``
for a 29 MiB shard, ``benchmarks/feature_bytes.py --read-images 32``; ``list<fixed_size_list>`` reads no
faster than that). A shard's column becomes ``[sum T, N, D]`` without a copy, split into each image's
``[T_i, N, D]`` view (``tile_arrays``).
This module is the reader used by training and tests, plus the shard and manifest writers the feature
job calls; it never imports Ray unless ``to_ray_dataset`` is called.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vitune import storage
from vitune.layout import FEATURE_MANIFEST
from vitune.vision_recipe import VisionRecipe, check_fingerprint, fingerprint_id, tiles_for, visual_tokens

log = logging.getLogger(__name__)

MANIFEST = FEATURE_MANIFEST
PLAN = "plan.json"
ERRORS_DIR = "errors"
KEY_COLUMN = "image_key"
FEATURES_COLUMN = "features"
SIZE_COLUMN = "size"
TILES_COLUMN = "num_tiles"
FEATURE_DTYPE = "float16"
FORMAT_VERSION = 2  # 2: each row records its image's original size (pad and crop stores are still written so)
TILES_FORMAT_VERSION = 3  # 3: anyres, each row a variable number of tiles (an older reader refuses it)
READABLE_VERSIONS = (1, 2, 3)  # a store of format 1 still trains (its images count as one tile each)
TILES_LAYOUT = "tiles"  # the manifest schema's ``layout`` of a tile store (absent: one [N, D] per image)
TILE_BYTE_ORDER = "<f2"  # the stored tile bytes: float16, little-endian
SHARD_METADATA_KEY = b"vitune.shard"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


def errors_name(shard: int) -> str:
    return f"{ERRORS_DIR}/shard-{shard:05d}.jsonl"


def shard_table(keys: Sequence[str], features: np.ndarray, metadata: Mapping[str, Any] | None = None,
                sizes: Sequence[Sequence[int]] | None = None) -> pa.Table:
    """A shard's Arrow table: ``image_key`` + ``features`` as a fixed-shape float16 tensor column (+ ``size``,
    each image's ``[width, height]``, when ``sizes`` is given)."""
    features = np.ascontiguousarray(features, dtype=np.float16)  # [n, N, D]
    if features.ndim != 3 or features.shape[0] != len(keys):
        raise ValueError(f"features of shape {features.shape} do not match {len(keys)} keys as [n, N, D]")
    _, num_patches, hidden_size = features.shape
    # built from storage (not from_numpy_ndarray) so that a shard with zero rows keeps its [N, D] type
    flat = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), num_patches * hidden_size)
    tensor = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float16(), [num_patches, hidden_size]), flat)
    columns = {KEY_COLUMN: pa.array(list(keys), type=pa.string()), FEATURES_COLUMN: tensor}
    if sizes is not None:
        if len(sizes) != len(keys):
            raise ValueError(f"{len(sizes)} image sizes for {len(keys)} keys")
        flat_sizes = pa.array(np.asarray(sizes, dtype=np.int32).reshape(-1), type=pa.int32())
        columns[SIZE_COLUMN] = pa.FixedSizeListArray.from_arrays(flat_sizes, 2)
    table = pa.table(columns)
    if metadata is not None:
        table = table.replace_schema_metadata({SHARD_METADATA_KEY: json.dumps(dict(metadata)).encode()})
    return table


def is_tiled(fp: Mapping[str, Any]) -> bool:
    """Whether a store made by this fingerprint holds several tiles per image (anyres) or one [N, D]."""
    return fp.get("image_mode") == "anyres"


def tile_shard_table(keys: Sequence[str], tiles: Sequence[np.ndarray], sizes: Sequence[Sequence[int]],
                     metadata: Mapping[str, Any] | None = None, shape: tuple[int, int] | None = None) -> pa.Table:
    """An anyres shard's Arrow table: ``image_key``, ``features`` (each image's ``[T_i, N, D]`` as float16
    bytes), ``num_tiles`` and ``size`` ``[width, height]``. ``shape`` ``(N, D)`` is checked when given (and
    needed for nothing else: an empty shard has no tiles to take it from)."""
    if len(tiles) != len(keys) or len(sizes) != len(keys):
        raise ValueError(f"{len(tiles)} tile arrays and {len(sizes)} sizes for {len(keys)} keys")
    for key, t in zip(keys, tiles, strict=True):
        if t.ndim != 3 or t.shape[0] < 1 or (shape is not None and tuple(t.shape[1:]) != tuple(shape)):
            raise ValueError(f"image {key!r}: tile features of shape {t.shape}; expected [T >= 1, N, D]"
                             + (f" with [N, D] = {list(shape)}" if shape else ""))
        if shape is None:
            shape = (int(t.shape[1]), int(t.shape[2]))
    blobs = [np.ascontiguousarray(t, dtype=TILE_BYTE_ORDER).tobytes() for t in tiles]
    offsets = pa.py_buffer(np.cumsum([0, *(len(b) for b in blobs)], dtype=np.int64))
    data = pa.py_buffer(b"".join(blobs))
    flat_sizes = pa.array(np.asarray(sizes, dtype=np.int32).reshape(-1), type=pa.int32())
    table = pa.table({
        KEY_COLUMN: pa.array(list(keys), type=pa.string()),
        FEATURES_COLUMN: pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(keys), [None, offsets, data]),
        TILES_COLUMN: pa.array([t.shape[0] for t in tiles], type=pa.int32()),
        SIZE_COLUMN: pa.FixedSizeListArray.from_arrays(flat_sizes, 2),
    })
    if metadata is not None:
        table = table.replace_schema_metadata({SHARD_METADATA_KEY: json.dumps(dict(metadata)).encode()})
    return table


def tile_arrays(features: pa.ChunkedArray | pa.Array, num_tiles: pa.ChunkedArray | pa.Array, num_patches: int,
                hidden_size: int) -> list[np.ndarray]:
    """A tile shard's ``features`` + ``num_tiles`` columns → each image's ``[T_i, N, D]`` float16 array (views
    of one buffer; read-only). Raises when a row's bytes are not its ``num_tiles`` tiles of ``[N, D]``."""
    array = features.combine_chunks() if isinstance(features, pa.ChunkedArray) else features
    counts = (num_tiles.combine_chunks() if isinstance(num_tiles, pa.ChunkedArray) else num_tiles).to_numpy(
        zero_copy_only=False).astype(np.int64)
    if len(counts) != len(array):
        raise ValueError(f"{len(array)} feature rows but {len(counts)} num_tiles")
    if not len(array):
        return []
    if array.type == pa.binary():  # a reader that narrowed the type: same bytes, 32-bit offsets
        array = array.cast(pa.large_binary())
    _, offset_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offset_buf, dtype=np.int64)[array.offset:array.offset + len(array) + 1]
    tile_bytes = num_patches * hidden_size * 2
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != counts * tile_bytes)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"features row {i} holds {lengths[i]} bytes; its num_tiles={counts[i]} tiles of "
                         f"[{num_patches}, {hidden_size}] float16 take {counts[i] * tile_bytes}")
    nbytes = int(offsets[-1] - offsets[0])
    data = np.frombuffer(data_buf, dtype=TILE_BYTE_ORDER, count=nbytes // 2, offset=int(offsets[0])) if nbytes \
        else np.empty(0, dtype=TILE_BYTE_ORDER)
    flat = data.astype(np.float16, copy=False).reshape(-1, num_patches, hidden_size)  # [sum T, N, D]
    return np.split(flat, np.cumsum(counts)[:-1])


def stored_bytes_per_image(recipe: VisionRecipe, width: int, height: int) -> int:
    """The feature bytes one image of ``width`` x ``height`` takes in a store of ``recipe`` (before Parquet's
    framing and compression, which change fp16 features little): its tiles x ``[N, D]`` x 2 bytes, plus the
    ``size`` (and, for anyres, ``num_tiles`` and the 64-bit offset) columns; the key's bytes not counted."""
    if not recipe.hidden_size:
        raise ValueError(f"the hidden size of vision tower {recipe.tower!r} is unknown; cannot size its features")
    per_tile = recipe.tokens_per_tile * recipe.hidden_size * 2
    if recipe.image_mode != "anyres":
        return per_tile + 2 * 4  # [N, D] float16 + size [w, h] int32
    return tiles_for(recipe, width, height) * per_tile + 2 * 4 + 4 + 8  # + num_tiles int32 + offset int64


def write_shard(uri: str, table: pa.Table) -> int:
    """Write one shard file in one atomic write; returns its size in bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    data = buf.getvalue()
    storage.write_bytes(uri, data)
    return len(data)


def read_shard_footer(uri: str) -> dict[str, Any]:
    """Rows, byte size, key range (from the column statistics) and the writer's metadata of a shard, from
    its Parquet footer only."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        size = f.size()
        pf = pq.ParquetFile(f)
        meta = (pf.schema_arrow.metadata or {}).get(SHARD_METADATA_KEY)
        key_col = pf.schema_arrow.get_field_index(KEY_COLUMN)
        lows, highs = [], []
        for g in range(pf.metadata.num_row_groups):
            stats = pf.metadata.row_group(g).column(key_col).statistics
            if stats is not None and stats.has_min_max:
                lows.append(stats.min)
                highs.append(stats.max)
        key_range = [min(lows), max(highs)] if lows else None
        return {"rows": pf.metadata.num_rows, "bytes": size, "key_stats": key_range,
                **(json.loads(meta) if meta else {})}


def shard_problem(uri: str, keys: Sequence[str], fp_id: str, size: int | None = None) -> tuple[str | None, dict]:
    """``(why the shard file at uri cannot be reused for its planned keys, or None; its footer info)``.

    Reused only when the footer parses (a truncated file has none), rows + quarantined equal the plan, its
    keys lie in the plan, it was written by this tower, and its size equals ``size`` (the manifest's) when
    given.
    """
    try:
        info = read_shard_footer(uri)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is simply not a finished shard
        return f"unreadable ({type(exc).__name__}: {exc})", {}
    if size is not None and info["bytes"] != size:
        return f"{info['bytes']} bytes, the manifest says {size}", info
    if info.get("fingerprint_id", fp_id) != fp_id:
        return f"written by tower {info['fingerprint_id']}, not {fp_id}", info
    if info["rows"] + info.get("quarantined", 0) != len(keys):
        return f"{info['rows']} rows + {info.get('quarantined', 0)} quarantined != {len(keys)} planned", info
    planned = set(keys)
    if info.get("key_stats") and not all(k in planned for k in info["key_stats"]):
        return f"keys {info['key_stats']} are not this shard's", info
    return None, info


def write_manifest(out: str, shards: Sequence[Sequence[str]], fp: dict[str, Any], shape: tuple[int, int],
                   computed: Sequence[dict[str, Any]] = (), extra: dict[str, Any] | None = None,
                   schema: dict[str, Any] | None = None, format_version: int | None = None) -> dict[str, Any]:
    """Check every planned shard (this run's results, else its file's footer) and write ``manifest.json`` last.

    Raises if any shard is missing or if images in != features out + quarantined. ``schema`` and
    ``format_version`` are given by a store of another payload (the pixel store, ``vitune.features.pixels``);
    by default they are the feature store's for ``shape`` ``(N, D)``.
    """
    fp_id = fingerprint_id(fp)
    by_shard = {r["shard"]: r for r in computed}
    entries = []
    for i, shard_keys in enumerate(shards):
        info = by_shard.get(i) or read_shard_footer(storage.join(out, shard_name(i)))
        if info.get("fingerprint_id", fp_id) != fp_id:
            raise RuntimeError(f"{out}/{shard_name(i)} was written by tower {info['fingerprint_id']}, not {fp_id}")
        if info["rows"] + info.get("quarantined", 0) != len(shard_keys):
            raise RuntimeError(f"{out}/{shard_name(i)}: {info['rows']} rows + {info.get('quarantined', 0)} "
                               f"quarantined != its {len(shard_keys)} planned images")
        entries.append({"file": shard_name(i), "rows": info["rows"], "quarantined": info.get("quarantined", 0),
                        "bytes": info["bytes"], "key_range": [shard_keys[0], shard_keys[-1]],
                        "errors": errors_name(i) if info.get("quarantined") else None})
    images_in = sum(len(k) for k in shards)
    features_out = sum(e["rows"] for e in entries)
    quarantined = sum(e["quarantined"] for e in entries)
    if images_in != features_out + quarantined:
        raise RuntimeError(f"images in ({images_in}) != features out ({features_out}) + quarantined ({quarantined})")
    total_bytes = sum(e["bytes"] for e in entries)
    extra = dict(extra or {})
    tiled = is_tiled(fp)
    if schema is None:
        schema = {"columns": [KEY_COLUMN, FEATURES_COLUMN], "num_patches": shape[0],
                  "hidden_size": shape[1], "shape": list(shape), "dtype": FEATURE_DTYPE}
        if tiled:  # shape is per tile; each row holds num_tiles of them
            schema.update(columns=[KEY_COLUMN, FEATURES_COLUMN, TILES_COLUMN, SIZE_COLUMN], layout=TILES_LAYOUT,
                          encoding=f"{FEATURE_DTYPE} bytes of [num_tiles, N, D], C order, little-endian")
    manifest = {
        "format_version": format_version or (TILES_FORMAT_VERSION if tiled else FORMAT_VERSION),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fp,
        "fingerprint_id": fp_id,
        "counts": {"images_in": images_in, "features_out": features_out, "quarantined": quarantined,
                   "shards": len(entries), **extra.pop("record_counts", {})},
        "schema": schema,
        "shards": entries,
        "errors_dir": ERRORS_DIR if quarantined else None,
        "total_bytes": total_bytes,
        "bytes_per_image": total_bytes / features_out if features_out else None,
        **extra,
    }
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return manifest


def features_to_numpy(column: pa.ChunkedArray | pa.Array, num_patches: int, hidden_size: int) -> np.ndarray:
    """A features column in any tensor encoding → ``np.ndarray [rows, N, D]`` (float16)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    rows = len(array)
    if isinstance(array.type, pa.FixedShapeTensorType):
        out = array.to_numpy_ndarray()
    else:
        storage_array = array.storage if isinstance(array, pa.ExtensionArray) else array
        values = storage_array
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or \
                pa.types.is_fixed_size_list(values.type):
            values = pc.list_flatten(values)
        flat = values.to_numpy(zero_copy_only=False)
        if flat.size != rows * num_patches * hidden_size:
            raise ValueError(
                f"features column holds {flat.size} values for {rows} rows; expected {rows}x{num_patches}x{hidden_size}"
            )
        out = flat.reshape(rows, num_patches, hidden_size)
    if out.shape[1:] != (num_patches, hidden_size):
        raise ValueError(f"features have shape {out.shape[1:]} per image; the store has [{num_patches}, {hidden_size}]")
    return out.astype(np.float16, copy=False)


class FeatureStore:
    """Read side of a finished feature store: keys, lookups, shard iteration, record join, Ray Data."""

    def __init__(self, uri: str, manifest: dict[str, Any]):
        self.uri = uri
        self.manifest = manifest
        self.fingerprint: dict[str, Any] = manifest["fingerprint"]
        schema = manifest["schema"]
        self.num_patches: int = int(schema["num_patches"])  # features per image as stored
        self.recipe = VisionRecipe.from_fingerprint(self.fingerprint)
        self.hidden_size: int = int(schema["hidden_size"])
        # anyres: each image's tiles [T, N, D] (num_patches and hidden_size are per tile)
        self.tiled: bool = schema.get("layout") == TILES_LAYOUT
        self._shards: list[dict[str, Any]] = manifest["shards"]
        self._first_keys = [s["key_range"][0] for s in self._shards]

    @staticmethod
    def read_manifest(uri: str) -> dict[str, Any]:
        """The manifest of the finished store at ``uri`` (either form); a missing one is explained."""
        manifest_uri = storage.join(uri, MANIFEST)
        if not storage.exists(manifest_uri):
            hint = (" (shards exist: the job was interrupted; re-run it to finish)" if storage.exists(
                storage.join(uri, PLAN)) else " (run jobs/extract_features.py with the same config first)")
            raise FileNotFoundError(f"no feature store at {uri}: {MANIFEST} is missing{hint}")
        return storage.read_json(manifest_uri)

    @classmethod
    def open(cls, uri: str, expect_fingerprint: Mapping[str, Any] | None = None) -> FeatureStore:
        """Open the store at ``uri``; refuse it if its fingerprint differs from ``expect_fingerprint``."""
        manifest = cls.read_manifest(uri)
        if manifest.get("fingerprint", {}).get("form") == "pixels":
            raise ValueError(f"{uri} is a pixel store (preprocessed tiles, features.form=pixels), not tower "
                             "features: a frozen tower trains from a feature store; a pixel store is read by "
                             "vitune.features.pixels.PixelStore when the tower trains")
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"feature store {uri} has format_version {manifest.get('format_version')!r}; "
                             f"this reader knows {', '.join(map(str, READABLE_VERSIONS))}")
        check_fingerprint(expect_fingerprint, manifest["fingerprint"], uri)
        return cls(uri, manifest)

    @property
    def feature_dim(self) -> int:
        return self.hidden_size

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.manifest["counts"])

    def __len__(self) -> int:
        return int(self.manifest["counts"]["features_out"])

    def shard_uris(self) -> list[str]:
        return [storage.join(self.uri, s["file"]) for s in self._shards]

    def keys(self) -> list[str]:
        """Every image key with features, in store order (sorted)."""
        out: list[str] = []
        for uri in self.shard_uris():
            out.extend(storage.read_parquet(uri, columns=[KEY_COLUMN]).column(KEY_COLUMN).to_pylist())
        return out

    def image_sizes(self) -> dict[str, tuple[int, int]]:
        """Each stored image's original ``(width, height)``; empty for a store of format 1 (no sizes kept)."""
        out: dict[str, tuple[int, int]] = {}
        for uri in self.shard_uris():
            try:
                table = storage.read_parquet(uri, columns=[KEY_COLUMN, SIZE_COLUMN])
            except (pa.ArrowInvalid, KeyError):  # a shard of format 1: no size column
                return {}
            sizes = table.column(SIZE_COLUMN).combine_chunks().flatten().to_numpy().reshape(-1, 2)
            out.update(zip(table.column(KEY_COLUMN).to_pylist(), map(tuple, sizes.tolist()), strict=True))
        return out

    def visual_tokens(self, recipe: VisionRecipe | None = None) -> dict[str, int]:
        """Visual tokens each stored image becomes in the LM's sequence (``vitune.vision_recipe.visual_tokens``).
        A format-1 store kept no sizes: its images count as the tile they were stored as (pad and crop make
        one tile whatever the size). ``recipe`` is the model's, for an anyres store: the merge and the
        anyres_max_N cap are the model's packing and not in the store's fingerprint (default: spatial_unpad,
        no cap); it must make the same tiles (same fingerprint id)."""
        if recipe is None:
            recipe = self.recipe
        elif recipe.fingerprint_id() != self.manifest["fingerprint_id"]:
            raise ValueError(f"recipe {recipe.fingerprint_id()} makes other tiles than feature store {self.uri} "
                             f"({self.manifest['fingerprint_id']})")
        sizes = self.image_sizes()
        side = recipe.image_size
        return {key: visual_tokens(recipe, *sizes.get(key, (side, side))) for key in self.keys()}

    def num_tiles(self) -> dict[str, int]:
        """Tiles each stored image holds (from the small ``num_tiles`` column; pad and crop: 1)."""
        if not self.tiled:
            return dict.fromkeys(self.keys(), 1)
        out: dict[str, int] = {}
        for uri in self.shard_uris():
            table = storage.read_parquet(uri, columns=[KEY_COLUMN, TILES_COLUMN])
            out.update(zip(table.column(KEY_COLUMN).to_pylist(), table.column(TILES_COLUMN).to_pylist(),
                           strict=True))
        return out

    def errors(self) -> list[dict[str, Any]]:
        """The quarantined images with their reasons."""
        out: list[dict[str, Any]] = []
        for s in self._shards:
            if s.get("errors"):
                out.extend(storage.read_jsonl(storage.join(self.uri, s["errors"])))
        return out

    def _read(self, uri: str) -> pa.Table:
        return storage.read_parquet(uri)

    def _features(self, table: pa.Table) -> np.ndarray | list[np.ndarray]:
        """A shard table's features: ``[n, N, D]``, or for a tile store each image's ``[T_i, N, D]`` (checked
        against its size: ``tiles_for`` of the store's recipe)."""
        if not self.tiled:
            return features_to_numpy(table.column(FEATURES_COLUMN), self.num_patches, self.hidden_size)
        tiles = tile_arrays(table.column(FEATURES_COLUMN), table.column(TILES_COLUMN), self.num_patches,
                            self.hidden_size)
        sizes = table.column(SIZE_COLUMN).combine_chunks().flatten().to_numpy().reshape(-1, 2)
        for key, t, (w, h) in zip(table.column(KEY_COLUMN).to_pylist(), tiles, sizes.tolist(), strict=True):
            if t.shape[0] != (want := tiles_for(self.recipe, w, h)):
                raise ValueError(f"feature store {self.uri}: image {key!r} ({w}x{h}) holds {t.shape[0]} tiles; "
                                 f"its recipe cuts it into {want}")
        return tiles

    def iter_shards(self) -> Iterator[pa.Table]:
        """Each shard as a table whose ``features`` column is a fixed-shape ``[N, D]`` tensor column (a tile
        store's as stored: use ``iter_arrays`` or ``tile_arrays`` for its ``[T, N, D]``)."""
        for uri in self.shard_uris():
            table = self._read(uri)
            if not self.tiled and not isinstance(table.schema.field(FEATURES_COLUMN).type, pa.FixedShapeTensorType):
                feats = features_to_numpy(table.column(FEATURES_COLUMN), self.num_patches, self.hidden_size)
                table = shard_table(table.column(KEY_COLUMN).to_pylist(), feats)
            yield table

    def iter_arrays(self) -> Iterator[tuple[list[str], np.ndarray | list[np.ndarray]]]:
        """Each shard as ``(keys, features [n, N, D] float16)``; a tile store's as ``(keys, [[T_i, N, D], ...])``."""
        for uri in self.shard_uris():
            table = self._read(uri)
            yield table.column(KEY_COLUMN).to_pylist(), self._features(table)

    def _shard_of(self, key: str) -> int | None:
        i = bisect.bisect_right(self._first_keys, key) - 1
        if i < 0 or key > self._shards[i]["key_range"][1]:
            return None
        return i

    def get(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """Features ``[N, D]`` (a tile store: ``[T, N, D]``) for each requested key that has them
        (quarantined/unknown keys are absent)."""
        by_shard: dict[int, set[str]] = defaultdict(set)
        for key in keys:
            i = self._shard_of(key)
            if i is not None:
                by_shard[i].add(key)
        out: dict[str, np.ndarray] = {}
        uris = self.shard_uris()
        for i, wanted in sorted(by_shard.items()):
            table = self._read(uris[i])
            shard_keys = table.column(KEY_COLUMN).to_pylist()
            feats = self._features(table)
            for row, key in enumerate(shard_keys):
                if key in wanted:
                    out[key] = feats[row]
        return out

    def join_records(self, records: Mapping[str, Sequence[Any]] | Iterable[Any]) -> Iterator[tuple[Any, np.ndarray]]:
        """Yield ``(record, features [N, D])`` shard by shard, in store order; features never shuffle.

        ``records`` is ``{image_key: [record, ...]}`` or an iterable of objects with ``.images`` keys
        (``vitune.data.records.Record``; one pair per image) or an ``.image`` key; text-only records are ignored.
        Records whose image has no features (quarantined or absent) are counted and logged at the end.
        """
        if isinstance(records, Mapping):
            by_key = {k: list(v) for k, v in records.items()}
        else:
            by_key = defaultdict(list)
            for record in records:  # a multi-image record is yielded once per image
                image = getattr(record, "image", None)
                for key in getattr(record, "images", () if image is None else (image,)):
                    by_key[key].append(record)
        seen: set[str] = set()
        for keys, feats in self.iter_arrays():
            for row, key in enumerate(keys):
                for record in by_key.get(key, ()):
                    yield record, feats[row]
                if key in by_key:
                    seen.add(key)
        missing = [k for k in by_key if k not in seen]
        if missing:
            log.warning("%d image keys (%d records) have no features in %s, e.g. %r", len(missing),
                        sum(len(by_key[k]) for k in missing), self.uri, missing[0])

    def to_ray_dataset(self, **read_parquet_kwargs: Any):
        """The shards as a Ray Dataset (``features`` batches arrive as ``[B, N, D]`` arrays; a tile store's as
        each row's float16 bytes, with ``num_tiles``: ``tile_arrays`` turns a batch's columns into ``[T, N, D]``)."""
        import ray  # deferred: readers without Ray (training workers, tests) never load it

        fs, _ = storage.resolve(self.uri)
        paths = [storage.resolve(u)[1] for u in self.shard_uris()]
        return ray.data.read_parquet(paths, filesystem=fs, **read_parquet_kwargs)
