"""The feature job's Ray Data stages: image bytes → preprocessed pixels (CPU tasks) → tower features (actors).

``run_shards`` streams one dataset row per shard through

    load_shard (tasks)  read bytes → ``image.decode_image`` → the tower's preprocessing, on CPUs in parallel
                        with the actors; a bad image becomes an error row with its reason, never an exception.
                        An anyres recipe cuts each image into its tiles (``image.preprocess_tiles``: the base
                        view, then the grid's), so a shard's pixels are ``[sum T_i, 3, S, S]`` with each
                        image's tile count; pad and crop make one tile per image
    EncodeShard (actor pool, one per GPU or sized to CPUs; ``pool_size``)
                        the tower loaded once, micro-batches of tiles under inference mode → fp16 → writes
                        the shard's errors file, then its Parquet file in one atomic write (the commit): one
                        ``[N, D]`` per image (``store.shard_table``), or anyres each image's ``[T, N, D]``
                        and its size (``store.tile_shard_table``)

and returns one result row per shard (counts, bytes, timings) for the manifest. ``vitune.features.extract``
plans the shards and writes the manifest. Both stages are plain callables (``load_shard``, ``EncodeShard``)
that the unit tests drive without Ray; only ``run_shards`` needs a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image

from vitune import storage
from vitune.config import FeaturesJobConfig, VisionConfig
from vitune.features.store import errors_name, shard_name, shard_table, tile_shard_table, write_shard
from vitune.model import image as image_lib
from vitune.model.vision import load_vision_tower
from vitune.progress import Progress
from vitune.vision_recipe import VisionRecipe, fingerprint_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessSpec:
    """The tower's preprocessing without its weights, for CPU tasks: ``VisionTower.preprocess`` exactly."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_mode: str
    recipe: VisionRecipe | None = None  # the tower's; anyres needs it (the grid), pad and crop do not
    # the pixel store's uint8 form: the tiles' 0-255 values before normalisation (``image.tiles_uint8``)
    uint8: bool = False

    @classmethod
    def from_tower(cls, tower: Any, uint8: bool = False) -> PreprocessSpec:
        return cls(tower.image_size, tuple(tower.mean), tuple(tower.std), tower.image_mode, tower.recipe, uint8)

    @property
    def dtype(self) -> np.dtype:
        """What ``load_shard`` hands on: normalised float32, or uint8 before normalisation."""
        return np.dtype(np.uint8 if self.uint8 else np.float32)

    def views(self, img: Image.Image) -> np.ndarray:
        """The image's tiles ``[T, 3, S, S]`` as ``load_shard`` stores them (``dtype``)."""
        if self.uint8:
            if self.recipe is None:
                raise ValueError("a uint8 preprocessing spec needs the tower's recipe (PreprocessSpec.from_tower)")
            return image_lib.tiles_uint8(img, self.recipe, self.mean)
        return self.tiles(img).numpy() if self.tiled else self(img).numpy()[None]

    @property
    def tiled(self) -> bool:
        return self.image_mode == "anyres"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return image_lib.preprocess(img, self.image_size, self.mean, self.std, self.image_mode)  # [3, S, S]

    def tiles(self, img: Image.Image) -> torch.Tensor:
        """The image's tiles ``[T, 3, S, S]`` by the recipe (``VisionTower.preprocess_tiles`` exactly)."""
        if self.recipe is None:
            raise ValueError("an anyres preprocessing spec needs the tower's recipe (PreprocessSpec.from_tower)")
        return image_lib.preprocess_tiles(img, self.recipe, self.mean, self.std)


def tiles_per_image_at_most(recipe: VisionRecipe) -> int:
    """The most tiles one image can make: 1 for pad and crop; anyres the base view + the largest grid."""
    if recipe.image_mode != "anyres":
        return 1
    size = recipe.image_size
    return 1 + max((h // size) * (w // size) for h, w in recipe.grid_pinpoints)


READ_TRIES = 3


def shard_pixel_bytes(spec: PreprocessSpec, shard_size: int) -> int:
    """The most pixel bytes (float32, or uint8 for the pixel store) one shard's preprocessing holds:
    ``[n, 3, S, S]``, anyres up to ``[n * T_max, 3, S, S]`` (every image cut into the largest grid)."""
    tiles = tiles_per_image_at_most(spec.recipe) if spec.tiled and spec.recipe is not None else 1
    return shard_size * tiles * 3 * spec.image_size**2 * spec.dtype.itemsize


def _read(fs: Any, path: str) -> bytes:
    """Read a file; a missing one raises ``FileNotFoundError`` at once, other I/O errors are retried."""
    for attempt in range(READ_TRIES):
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == READ_TRIES - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _binary_column(buffers: list[pa.Buffer]) -> pa.LargeBinaryArray:
    """Buffers → a ``large_binary`` column; a single buffer (one shard per batch, the usual case) is not copied."""
    offsets = pa.py_buffer(np.cumsum([0, *(b.size for b in buffers)], dtype=np.int64))
    data = buffers[0] if len(buffers) == 1 else pa.py_buffer(b"".join(buffers))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(buffers), [None, offsets, data])


def load_shard(batch: pa.Table, image_root: str, spec: PreprocessSpec, max_pixels: int,
               s3_endpoint_url: str | None = None) -> pa.Table:
    """CPU task: one row per shard → its preprocessed pixels ``[sum T, 3, S, S]`` (``spec.dtype``) + quarantined
    images."""
    # for this call only: the pooled worker process runs other jobs' tasks afterwards
    with storage.s3.s3_endpoint(s3_endpoint_url):
        return _load_shard(batch, image_root, spec, max_pixels)


def _load_shard(batch: pa.Table, image_root: str, spec: PreprocessSpec, max_pixels: int) -> pa.Table:
    fs, base = storage.resolve(image_root)
    out: dict[str, list] = {k: [] for k in ("shard", "keys", "sizes", "tiles", "pixels", "errors", "bytes_read",
                                            "load_s", "pid")}
    # anyres: room for the most tiles an image can make (untouched pages of np.empty cost no memory), so the
    # tiles land in place and go to Arrow without a copy, as one image per row does for pad and crop
    tiles_at_most = tiles_per_image_at_most(spec.recipe) if spec.tiled and spec.recipe else 1
    for shard, keys in zip(batch.column("shard").to_pylist(), batch.column("keys").to_pylist(), strict=True):
        t0 = time.perf_counter()
        pixels = np.empty((len(keys) * tiles_at_most, 3, spec.image_size, spec.image_size),
                          dtype=spec.dtype)  # [n * T_max, 3, S, S]
        tiles: list[int] = []  # tiles of each good image
        filled = 0  # pixel rows written: sum(tiles)
        ok_keys: list[str] = []
        sizes: list[list[int]] = []  # each image's original [width, height]
        errors: list[dict[str, str]] = []
        nbytes = 0
        for key in keys:
            try:
                data = _read(fs, posixpath.join(base, key))
                nbytes += len(data)
                image = image_lib.decode_image(data, max_pixels=max_pixels)
                views = spec.views(image)  # [T, 3, S, S]
                pixels[filled:filled + len(views)] = views
            except FileNotFoundError:
                reason = "missing file"
            except OSError as exc:
                reason = f"cannot read file after {READ_TRIES} tries: {exc}"
            except image_lib.ImageError as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - one bad image must never stop the job
                reason = f"preprocessing failed: {type(exc).__name__}: {exc}"
            else:
                ok_keys.append(key)
                sizes.append(list(image.size))
                tiles.append(len(views))
                filled += len(views)
                continue
            errors.append({"image_key": key, "uri": storage.join(image_root, key), "reason": reason})
        out["shard"].append(shard)
        out["keys"].append(ok_keys)
        out["sizes"].append(sizes)
        out["tiles"].append(tiles)
        out["pixels"].append(pa.py_buffer(pixels[:filled]))  # [sum T, 3, S, S], zero-copy into Arrow
        out["errors"].append(json.dumps(errors))
        out["bytes_read"].append(nbytes)
        out["load_s"].append(time.perf_counter() - t0)
        out["pid"].append(os.getpid())
    return pa.table({
        "shard": pa.array(out["shard"], pa.int64()),
        "keys": pa.array(out["keys"], pa.list_(pa.string())),
        "sizes": pa.array(out["sizes"], pa.list_(pa.list_(pa.int32()))),
        "tiles": pa.array(out["tiles"], pa.list_(pa.int32())),  # tiles of each good image (pad/crop: 1s)
        "pixels": _binary_column(out["pixels"]),
        "errors": pa.array(out["errors"], pa.string()),
        "bytes_read": pa.array(out["bytes_read"], pa.int64()),
        "load_s": pa.array(out["load_s"], pa.float64()),
        "pid": pa.array(out["pid"], pa.int64()),
    })


class EncodeShard:
    """Actor: loads the tower once; per shard, encodes its pixels in micro-batches and writes its files."""

    def __init__(self, vision: VisionConfig, output: str, fp_id: str, batch_size: int, threads: int | None,
                 s3_endpoint_url: str | None = None):
        if s3_endpoint_url:
            storage.s3.configure_s3(s3_endpoint_url)
        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tower = load_vision_tower(vision, device=device)
        if fingerprint_id(self.tower.fingerprint()) != fp_id:
            raise RuntimeError(f"tower on this worker has fingerprint {self.tower.fingerprint()}, not {fp_id}")
        self.output, self.fp_id, self.batch_size = output, fp_id, batch_size
        self._last_done: float | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        wait_s = 0.0 if self._last_done is None else started - self._last_done
        size, n_p, dim = self.tower.image_size, self.tower.num_patches, self.tower.hidden_size
        tiled = self.tower.recipe.image_mode == "anyres"
        results: list[dict[str, Any]] = []
        for i, row in enumerate(batch.drop_columns(["pixels"]).to_pylist()):
            shard, keys, errors = row["shard"], row["keys"], json.loads(row["errors"])
            # a shard from a loader of before the tile store has no tile counts: one tile per image
            tiles = row.get("tiles") or [1] * len(keys)
            if len(tiles) != len(keys) or (not tiled and any(t != 1 for t in tiles)):
                raise RuntimeError(f"shard {shard}: tile counts {tiles} do not fit {len(keys)} images of a "
                                   f"{self.tower.recipe.image_mode} tower")
            total = sum(tiles)  # tiles of the shard, micro-batched together whatever image they belong to
            pixels = np.frombuffer(batch.column("pixels")[i].as_buffer(), dtype=np.float32)
            pixels = pixels.reshape(total, 3, size, size)
            t0 = time.perf_counter()
            feats = np.empty((total, n_p, dim), dtype=np.float16)  # [sum T, N, D]
            for s in range(0, total, self.batch_size):
                chunk = torch.from_numpy(pixels[s:s + self.batch_size].copy())  # [b, 3, S, S]
                feats[s:s + self.batch_size] = self.tower.encode(chunk).to(torch.float16).cpu().numpy()
            t1 = time.perf_counter()
            errors_file = None
            if errors:
                # errors first, the shard last: the shard file is the commit of both
                errors_file = errors_name(shard)
                storage.write_jsonl(storage.join(self.output, errors_file), [{**e, "shard": shard} for e in errors])
            meta = {"shard": shard, "fingerprint_id": self.fp_id, "quarantined": len(errors), "errors": errors_file}
            if tiled:
                per_image = np.split(feats, np.cumsum(tiles)[:-1]) if keys else []  # each [T_i, N, D]
                table = tile_shard_table(keys, per_image, row["sizes"], meta, shape=(n_p, dim))
            else:
                table = shard_table(keys, feats, meta, sizes=row["sizes"])
            nbytes = write_shard(storage.join(self.output, shard_name(shard)), table)
            results.append({
                "shard": shard, "rows": len(keys), "quarantined": len(errors), "bytes": nbytes,
                "bytes_read": row["bytes_read"], "load_s": row["load_s"], "encode_s": t1 - t0,
                "write_s": time.perf_counter() - t1, "wait_s": wait_s if i == 0 else 0.0,
                "fused": row["pid"] == os.getpid(),  # preprocessing ran in this actor: Ray Data fused the stages
                "done_at": time.time(),
            })
        self._last_done = time.perf_counter()
        return pa.Table.from_pylist(results)


def write_pixel_shards(batch: pa.Table, output: str, fp_id: str, pixel_dtype: str, tile_size: int) -> pa.Table:
    """The pixel store's second stage (the sibling of ``EncodeShard``, with no tower): ``load_shard``'s rows
    → each shard's errors file, then its pixel shard (``pixels.pixel_shard_table``) in one atomic write; one
    result row per shard, as ``EncodeShard`` returns. ``pixel_dtype`` uint8 stores the loaded tiles as they
    are (``load_shard`` ran a uint8 spec); bf16 rounds the loaded normalised float32 tiles."""
    from vitune.features.pixels import pixel_shard_table  # the reader's module; no Ray, no torch

    results: list[dict[str, Any]] = []
    for i, row in enumerate(batch.drop_columns(["pixels"]).to_pylist()):
        shard, keys, errors, tiles = row["shard"], row["keys"], json.loads(row["errors"]), row["tiles"]
        t0 = time.perf_counter()
        raw = batch.column("pixels")[i].as_buffer()
        if pixel_dtype == "uint8":
            pixels = np.frombuffer(raw, dtype=np.uint8)
        else:  # bf16: round float32 to nearest even, kept as its bit patterns (numpy has no bfloat16)
            values = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())
            pixels = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        pixels = pixels.reshape(sum(tiles), 3, tile_size, tile_size)
        t1 = time.perf_counter()
        errors_file = None
        if errors:  # errors first, the shard last: the shard file is the commit of both
            errors_file = errors_name(shard)
            storage.write_jsonl(storage.join(output, errors_file), [{**e, "shard": shard} for e in errors])
        meta = {"shard": shard, "fingerprint_id": fp_id, "quarantined": len(errors), "errors": errors_file}
        nbytes = write_shard(storage.join(output, shard_name(shard)),
                             pixel_shard_table(keys, pixels, tiles, row["sizes"], meta))
        results.append({
            "shard": shard, "rows": len(keys), "quarantined": len(errors), "bytes": nbytes,
            "bytes_read": row["bytes_read"], "load_s": row["load_s"], "encode_s": t1 - t0,  # encode: the cast
            "write_s": time.perf_counter() - t1, "wait_s": 0.0, "fused": False,  # no tower actor to fuse into
            "done_at": time.time(),
        })
    return pa.Table.from_pylist(results)


def store_pixel_shard(batch: pa.Table, image_root: str, spec: PreprocessSpec, max_pixels: int, output: str,
                      fp_id: str, pixel_dtype: str, s3_endpoint_url: str | None = None) -> pa.Table:
    """CPU task of the pixel store: read, decode and preprocess one shard's images, then write its shard
    (``load_shard`` then ``write_pixel_shards``: one task, so the tiles never cross the object store)."""
    with storage.s3.s3_endpoint(s3_endpoint_url):
        return write_pixel_shards(_load_shard(batch, image_root, spec, max_pixels), output, fp_id, pixel_dtype,
                                  spec.image_size)


def run_pixel_shards(cfg: FeaturesJobConfig, todo: list[tuple[int, list[str]]], out: str, fp_id: str,
                     spec: PreprocessSpec, image_root: str) -> tuple[list[dict[str, Any]], None]:
    """``run_shards`` for the pixel store: no tower, so one stage of CPU tasks (``store_pixel_shard``), as many
    at once as the cluster's CPUs over ``features.preprocess_cpus``; one result row per shard."""
    log.info("storing the pixels of %d shards (%s), tasks of %s CPU", len(todo), cfg.features.pixel_dtype,
             cfg.features.preprocess_cpus)
    ds = ray.data.from_items([{"shard": i, "keys": keys} for i, keys in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        store_pixel_shard, batch_size=1, batch_format="pyarrow", num_cpus=cfg.features.preprocess_cpus,
        # the tiles, their cast and the Parquet buffer, over a worker's own ~400 MiB (torch, PIL, pyarrow loaded)
        memory=shard_pixel_bytes(spec, cfg.features.shard_size) * 3 + 512 * 2**20,
        fn_kwargs={"image_root": image_root, "spec": spec, "max_pixels": cfg.features.max_pixels, "output": out,
                   "fp_id": fp_id, "pixel_dtype": cfg.features.pixel_dtype,
                   "s3_endpoint_url": cfg.storage.s3_endpoint_url},
    )
    results = []
    with Progress("pixels", sum(len(keys) for _, keys in todo), "images") as progress:
        for row in ds.iter_rows():
            results.append(row)
            progress.update(row["rows"] + row["quarantined"])
    return results, None


@dataclass(frozen=True)
class PoolSize:
    num_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    threads: int | None  # torch threads per actor on CPU


def pool_size(cfg: FeaturesJobConfig, cluster: dict[str, float], num_shards: int,
              free: dict[str, float] | None = None) -> PoolSize:
    """How many tower actors, and what each reserves; never more actors than shards to compute.

    With GPUs: one actor per GPU. CPU only: the CPUs left after one preprocessing task, ``actor_cpus``
    each; the actors' torch threads then share out all the CPUs (decoding is light next to the tower, and
    a core left to it alone would idle most of the time). ``free`` (what the cluster has unreserved now)
    bounds the default pool: actors sized to CPUs that Serve replicas or another job hold would take every
    free CPU and leave none for preprocessing, so the job would wait forever.
    """
    feats = cfg.features
    gpus = int(cluster.get("GPU", 0))
    if gpus > 0:
        n = max(1, min(feats.num_actors or gpus, num_shards))
        return PoolSize(n, 1.0, feats.actor_cpus, None)
    cpus = cluster.get("CPU", 1)
    usable = min(cpus, free.get("CPU", cpus)) if free is not None else cpus
    n = feats.num_actors or max(1, int((usable - feats.preprocess_cpus) // feats.actor_cpus))
    n = max(1, min(n, num_shards))
    if n * feats.actor_cpus + feats.preprocess_cpus > cpus:
        raise ValueError(
            f"{n} tower actor(s) x features.actor_cpus={feats.actor_cpus} + features.preprocess_cpus="
            f"{feats.preprocess_cpus} need more than the cluster's {cpus:g} CPUs: preprocessing could never run. "
            "Lower features.num_actors / actor_cpus / preprocess_cpus"
        )
    return PoolSize(n, 0.0, feats.actor_cpus, max(1, int(cpus // n)))


def run_shards(cfg: FeaturesJobConfig, todo: list[tuple[int, list[str]]], out: str, fp_id: str,
               spec: PreprocessSpec, image_root: str) -> tuple[list[dict[str, Any]], PoolSize]:
    """Compute the ``todo`` shards ``[(index, keys)]`` into the store at ``out``; one result row per shard."""
    pool = pool_size(cfg, ray.cluster_resources(), len(todo), free=ray.available_resources())
    log.info("computing %d shards: %d tower actor(s) (%s GPU, %s CPU each), preprocessing tasks of %s CPU",
             len(todo), pool.num_actors, pool.gpus_per_actor, pool.cpus_per_actor, cfg.features.preprocess_cpus)
    endpoint = cfg.storage.s3_endpoint_url
    # A preprocessing task holds one shard's float32 pixels (handed to Arrow without a copy). Reserving
    # that memory is also what keeps Ray Data from fusing this stage into the tower actors, which would
    # serialise decoding behind the tower; each result row reports whether that happened.
    pixel_bytes = shard_pixel_bytes(spec, cfg.features.shard_size)
    ds = ray.data.from_items([{"shard": i, "keys": keys} for i, keys in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        load_shard, batch_size=1, batch_format="pyarrow", num_cpus=cfg.features.preprocess_cpus,
        memory=pixel_bytes + 512 * 2**20,
        fn_kwargs={"image_root": image_root, "spec": spec, "max_pixels": cfg.features.max_pixels,
                   "s3_endpoint_url": endpoint},
    )
    ds = ds.map_batches(
        EncodeShard, batch_size=1, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.num_actors, max_tasks_in_flight_per_actor=2),
        num_gpus=pool.gpus_per_actor or None, num_cpus=pool.cpus_per_actor,
        fn_constructor_kwargs={"vision": cfg.model.vision, "output": out, "fp_id": fp_id,
                               "batch_size": cfg.features.batch_size, "threads": pool.threads,
                               "s3_endpoint_url": endpoint},
    )
    results = []
    with Progress("features", sum(len(keys) for _, keys in todo), "images") as progress:
        for row in ds.iter_rows():
            log.debug("shard %05d: %d features, %d quarantined", row["shard"], row["rows"], row["quarantined"])
            results.append(row)
            progress.update(row["rows"] + row["quarantined"])
    if any(r["fused"] for r in results):
        log.warning("Ray Data ran preprocessing inside the tower actors (operators fused): CPU decoding did not "
                    "overlap the tower; check features.preprocess_cpus / actor_cpus")
    return results, pool
