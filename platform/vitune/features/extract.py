"""The feature job's pipeline: the distinct images of some records → a fingerprinted feature store.

``extract_features(cfg)`` runs on Ray Data, streaming, one dataset row per *shard*:

    plan (driver)       sorted distinct image keys → shards of ``features.shard_size`` keys (shard i is
                        always the same keys); only shards whose file is missing are computed
    load_shard (tasks)  read bytes → ``image.decode_image`` → the tower's preprocessing, on CPUs in parallel
                        with the actors; a bad image becomes an error row with its reason, never an exception
    EncodeShard (actor pool, one per GPU or sized to CPUs)
                        the tower loaded once, micro-batches under inference mode → fp16 → writes the
                        shard's errors file, then its Parquet file in one atomic write (the commit)
    manifest (driver)   written last, from the shard footers: counts, shard list, schema, timings

A shard is done iff its file exists, so a re-run after a kill computes only the missing shards (no
duplicates, finished shards untouched) and a run over a complete store computes and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from vitune import storage
from vitune.config import DataConfig, FeaturesJobConfig, VisionConfig, init_ray
from vitune.features.store import (
    ERRORS_DIR,
    FEATURE_DTYPE,
    FEATURES_COLUMN,
    FORMAT_VERSION,
    KEY_COLUMN,
    MANIFEST,
    PLAN,
    errors_name,
    fingerprint_diffs,
    read_shard_footer,
    shard_name,
    shard_table,
    write_shard,
)
from vitune.model import image as image_lib

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

FAIL_AFTER_ENV = "VITUNE_FAIL_AFTER_SHARDS"  # test hook: compute this many shards, then die before the manifest


class SimulatedInterruption(RuntimeError):
    """Raised by the ``fail_after_shards`` test hook after the requested shards were written."""


@dataclass(frozen=True)
class PreprocessSpec:
    """The tower's preprocessing without its weights, for CPU tasks: ``VisionTower.preprocess`` exactly."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_mode: str

    @classmethod
    def from_tower(cls, tower: Any) -> PreprocessSpec:
        return cls(tower.image_size, tuple(tower.mean), tuple(tower.std), tower.image_mode)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return image_lib.preprocess(img, self.image_size, self.mean, self.std, self.image_mode)  # [3, S, S]


# ---------------------------------------------------------------------------------------------- planning


def collect_image_keys(record_uris: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Sorted distinct image keys referenced by valid records, and record counts for the manifest."""
    from vitune.data.records import read_records_with_errors

    if not record_uris:
        raise ValueError("data.records: no record files given")
    keys: set[str] = set()
    stats = {"records": 0, "records_invalid": 0, "records_text_only": 0}
    for uri in record_uris:
        records, errors = read_records_with_errors(uri)
        stats["records"] += len(records)
        stats["records_invalid"] += len(errors)
        for record in records:
            if record.image is None:
                stats["records_text_only"] += 1
            else:
                keys.add(record.image)
    if not keys:
        raise ValueError(f"data.records: no record in {list(record_uris)} references an image")
    return sorted(keys), stats


def resolve_image_root(data: DataConfig) -> str:
    """``data.image_root``, else the folder of the first records file (LLaVA's usual layout)."""
    if data.image_root:
        return data.image_root
    first = data.records[0]
    root = posixpath.dirname(first.rstrip("/")) if "://" in first else os.path.dirname(os.path.abspath(first))
    log.info("data.image_root not set: images are read relative to %s", root)
    return root


def plan_shards(keys: Sequence[str], shard_size: int) -> list[list[str]]:
    """Shard i holds sorted keys ``[i * shard_size, (i + 1) * shard_size)``: the same on every run."""
    return [list(keys[i:i + shard_size]) for i in range(0, len(keys), shard_size)]


def key_set_hash(keys: Sequence[str]) -> str:
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode("utf-8") + b"\0")
    return h.hexdigest()


def output_uri(cfg: FeaturesJobConfig, fp_id: str) -> str:
    return cfg.features.output or storage.join(cfg.storage.root, "features", fp_id)


def _check_plan(out: str, plan: dict[str, Any]) -> None:
    """Write ``plan.json`` on the first run; later runs must have the same tower, images and shard settings."""
    uri = storage.join(out, PLAN)
    if not storage.exists(uri):
        storage.write_json(uri, plan)
        return
    have = storage.read_json(uri)
    diffs = fingerprint_diffs(plan["fingerprint"], have.get("fingerprint", {}))
    if diffs:
        detail = "; ".join(f"{f}: expected {w!r}, found {h!r}" for f, w, h in diffs)
        raise ValueError(f"{out} holds features of another vision tower ({detail}); set features.output elsewhere")
    for field in ("shard_size", "max_pixels", "num_images", "keys_sha256"):
        if have.get(field) != plan[field]:
            raise ValueError(
                f"{out} was started with other images or settings ({field}: this run has {plan[field]!r}, "
                f"the store has {have.get(field)!r}); set features.output elsewhere or delete the store"
            )


# ---------------------------------------------------------------------------------------------- Ray stages


READ_TRIES = 3


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
    """CPU task: one row per shard → its preprocessed pixels ``[n, 3, S, S]`` + quarantined images."""
    if s3_endpoint_url:
        storage.configure_s3(s3_endpoint_url)
    fs, base = storage.resolve(image_root)
    out: dict[str, list] = {k: [] for k in ("shard", "keys", "pixels", "errors", "bytes_read", "load_s", "pid")}
    for shard, keys in zip(batch.column("shard").to_pylist(), batch.column("keys").to_pylist(), strict=True):
        t0 = time.perf_counter()
        pixels = np.empty((len(keys), 3, spec.image_size, spec.image_size), dtype=np.float32)  # [n, 3, S, S]
        ok_keys: list[str] = []
        errors: list[dict[str, str]] = []
        nbytes = 0
        for key in keys:
            try:
                data = _read(fs, posixpath.join(base, key))
                nbytes += len(data)
                pixels[len(ok_keys)] = spec(image_lib.decode_image(data, max_pixels=max_pixels)).numpy()
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
                continue
            errors.append({"image_key": key, "uri": storage.join(image_root, key), "reason": reason})
        out["shard"].append(shard)
        out["keys"].append(ok_keys)
        out["pixels"].append(pa.py_buffer(pixels[:len(ok_keys)]))  # zero-copy into Arrow
        out["errors"].append(json.dumps(errors))
        out["bytes_read"].append(nbytes)
        out["load_s"].append(time.perf_counter() - t0)
        out["pid"].append(os.getpid())
    return pa.table({
        "shard": pa.array(out["shard"], pa.int64()),
        "keys": pa.array(out["keys"], pa.list_(pa.string())),
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
        import torch

        from vitune.model.vision import fingerprint_id, load_vision_tower

        if s3_endpoint_url:
            storage.configure_s3(s3_endpoint_url)
        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tower = load_vision_tower(vision, device=device)
        if fingerprint_id(self.tower.fingerprint()) != fp_id:
            raise RuntimeError(f"tower on this worker has fingerprint {self.tower.fingerprint()}, not {fp_id}")
        self.output, self.fp_id, self.batch_size = output, fp_id, batch_size
        self._last_done: float | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        started = time.perf_counter()
        wait_s = 0.0 if self._last_done is None else started - self._last_done
        size, n_p, dim = self.tower.image_size, self.tower.num_patches, self.tower.hidden_size
        results: list[dict[str, Any]] = []
        for i, row in enumerate(batch.drop_columns(["pixels"]).to_pylist()):
            shard, keys, errors = row["shard"], row["keys"], json.loads(row["errors"])
            pixels = np.frombuffer(batch.column("pixels")[i].as_buffer(), dtype=np.float32)
            pixels = pixels.reshape(len(keys), 3, size, size)
            t0 = time.perf_counter()
            feats = np.empty((len(keys), n_p, dim), dtype=np.float16)  # [n, N, D]
            for s in range(0, len(keys), self.batch_size):
                chunk = torch.from_numpy(pixels[s:s + self.batch_size].copy())  # [b, 3, S, S]
                feats[s:s + self.batch_size] = self.tower.encode(chunk).to(torch.float16).cpu().numpy()
            t1 = time.perf_counter()
            errors_file = None
            if errors:
                # errors first, the shard last: the shard file is the commit of both
                errors_file = errors_name(shard)
                text = "".join(json.dumps({**e, "shard": shard}) + "\n" for e in errors)
                storage.write_text(storage.join(self.output, errors_file), text)
            meta = {"shard": shard, "fingerprint_id": self.fp_id, "quarantined": len(errors), "errors": errors_file}
            nbytes = write_shard(storage.join(self.output, shard_name(shard)), shard_table(keys, feats, meta))
            results.append({
                "shard": shard, "rows": len(keys), "quarantined": len(errors), "bytes": nbytes,
                "bytes_read": row["bytes_read"], "load_s": row["load_s"], "encode_s": t1 - t0,
                "write_s": time.perf_counter() - t1, "wait_s": wait_s if i == 0 else 0.0,
                "fused": row["pid"] == os.getpid(),  # preprocessing ran in this actor: Ray Data fused the stages
                "done_at": time.time(),
            })
        self._last_done = time.perf_counter()
        return pa.Table.from_pylist(results)


@dataclass(frozen=True)
class PoolSize:
    num_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    threads: int | None  # torch threads per actor on CPU


def pool_size(cfg: FeaturesJobConfig, cluster: dict[str, float], num_shards: int) -> PoolSize:
    """How many tower actors, and what each reserves; never more actors than shards to compute.

    With GPUs: one actor per GPU. CPU only: the CPUs left after one preprocessing task, ``actor_cpus``
    each; the actors' torch threads then share out all the CPUs (decoding is light next to the tower, and
    a core left to it alone would idle most of the time).
    """
    feats = cfg.features
    gpus = int(cluster.get("GPU", 0))
    if gpus > 0:
        n = max(1, min(feats.num_actors or gpus, num_shards))
        return PoolSize(n, 1.0, feats.actor_cpus, None)
    cpus = cluster.get("CPU", 1)
    n = feats.num_actors or max(1, int((cpus - feats.preprocess_cpus) // feats.actor_cpus))
    n = max(1, min(n, num_shards))
    if n * feats.actor_cpus + feats.preprocess_cpus > cpus:
        raise ValueError(
            f"{n} tower actor(s) x features.actor_cpus={feats.actor_cpus} + features.preprocess_cpus="
            f"{feats.preprocess_cpus} need more than the cluster's {cpus:g} CPUs: preprocessing could never run. "
            "Lower features.num_actors / actor_cpus / preprocess_cpus"
        )
    return PoolSize(n, 0.0, feats.actor_cpus, max(1, int(cpus // n)))


def _run_shards(cfg: FeaturesJobConfig, todo: list[tuple[int, list[str]]], out: str, fp_id: str,
                spec: PreprocessSpec, image_root: str) -> tuple[list[dict[str, Any]], PoolSize]:
    import ray

    pool = pool_size(cfg, ray.cluster_resources(), len(todo))
    log.info("computing %d shards: %d tower actor(s) (%s GPU, %s CPU each), preprocessing tasks of %s CPU",
             len(todo), pool.num_actors, pool.gpus_per_actor, pool.cpus_per_actor, cfg.features.preprocess_cpus)
    endpoint = cfg.storage.s3_endpoint_url
    # A preprocessing task holds one shard's float32 pixels (handed to Arrow without a copy). Reserving
    # that memory is also what keeps Ray Data from fusing this stage into the tower actors, which would
    # serialise decoding behind the tower; each result row reports whether that happened.
    shard_pixel_bytes = cfg.features.shard_size * 3 * spec.image_size**2 * 4  # float32 [n, 3, S, S]
    ds = ray.data.from_items([{"shard": i, "keys": keys} for i, keys in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        load_shard, batch_size=1, batch_format="pyarrow", num_cpus=cfg.features.preprocess_cpus,
        memory=shard_pixel_bytes + 512 * 2**20,
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
    for row in ds.iter_rows():
        log.debug("shard %05d: %d features, %d quarantined", row["shard"], row["rows"], row["quarantined"])
        results.append(row)
    if any(r["fused"] for r in results):
        log.warning("Ray Data ran preprocessing inside the tower actors (operators fused): CPU decoding did not "
                    "overlap the tower; check features.preprocess_cpus / actor_cpus")
    return results, pool


# ---------------------------------------------------------------------------------------------- the job


def _fail_after_from_env() -> int | None:
    value = os.environ.get(FAIL_AFTER_ENV)
    return int(value) if value else None


def _cleanup_temp_files(out: str) -> None:
    """Remove temp files a killed local run left behind (S3 writes have none)."""
    local = storage.local_path(out)
    if not local or not os.path.isdir(local):
        return
    for folder in (local, os.path.join(local, ERRORS_DIR)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if ".tmp-" in name:
                    os.remove(os.path.join(folder, name))


def extract_features(cfg: FeaturesJobConfig, fail_after_shards: int | None = None) -> dict[str, Any]:
    """Build (or finish) the feature store for ``cfg``; returns the run summary. See the module docstring.

    ``fail_after_shards`` (or env ``VITUNE_FAIL_AFTER_SHARDS``) is a test hook: compute only that many of
    the missing shards, then raise ``SimulatedInterruption`` before the manifest is written.
    """

    from vitune.model.vision import fingerprint_id, load_vision_tower

    t_start = time.perf_counter()
    if fail_after_shards is None:
        fail_after_shards = _fail_after_from_env()
    if cfg.storage.s3_endpoint_url:
        storage.configure_s3(cfg.storage.s3_endpoint_url)
    # The driver loads the tower on CPU once for what defines the store: fingerprint, [N, D], preprocessing.
    tower = load_vision_tower(cfg.model.vision)
    fp = tower.fingerprint()
    fp_id = fingerprint_id(fp)
    spec = PreprocessSpec.from_tower(tower)
    n_patches, dim = tower.num_patches, tower.hidden_size
    del tower
    out = output_uri(cfg, fp_id)
    keys, record_stats = collect_image_keys(cfg.data.records)
    image_root = resolve_image_root(cfg.data)
    shards = plan_shards(keys, cfg.features.shard_size)
    _check_plan(out, {"format_version": FORMAT_VERSION, "fingerprint": fp, "fingerprint_id": fp_id,
                      "shard_size": cfg.features.shard_size, "max_pixels": cfg.features.max_pixels,
                      "num_images": len(keys), "num_shards": len(shards),
                      "keys_sha256": key_set_hash(keys)})
    existing = {posixpath.basename(u) for u in storage.list_files(out, suffix=".parquet", recursive=False)}
    todo = [(i, s) for i, s in enumerate(shards) if shard_name(i) not in existing]
    manifest_uri = storage.join(out, MANIFEST)
    if not todo and storage.exists(manifest_uri):
        manifest = storage.read_json(manifest_uri)
        log.info("feature store %s is complete (%d shards): nothing to do", out, len(shards))
        return _summary(manifest, out, computed=0, wall_s=time.perf_counter() - t_start)
    log.info("feature store %s: %d images in %d shards of %d; %d done, %d to compute (fingerprint %s)",
             out, len(keys), len(shards), cfg.features.shard_size, len(shards) - len(todo), len(todo), fp_id)

    interrupted = fail_after_shards is not None and fail_after_shards < len(todo)
    if interrupted:
        todo = todo[:fail_after_shards]
    computed: list[dict[str, Any]] = []
    pool = None
    t_pipe, t_pipe_wall = time.perf_counter(), time.time()
    if todo:
        init_ray(cfg.ray)
        computed, pool = _run_shards(cfg, todo, out, fp_id, spec, image_root)
    if interrupted:
        raise SimulatedInterruption(f"{FAIL_AFTER_ENV}: stopped after {len(computed)} shards, before the manifest")
    last_run = {
        "computed_shards": len(computed),
        "reused_shards": len(shards) - len(computed),
        "pool": asdict(pool) if pool else None,
        "preprocessed_in_actor": sum(bool(r["fused"]) for r in computed),
        "timings": _timings(computed, time.perf_counter() - t_pipe, t_pipe_wall),
    }
    manifest = write_manifest(out, shards, fp, (n_patches, dim), computed, {
        "shard_size": cfg.features.shard_size, "config": cfg.model_dump(mode="json"), "image_root": image_root,
        "record_counts": record_stats, "last_run": last_run})
    _cleanup_temp_files(out)
    return _summary(manifest, out, computed=len(computed), wall_s=time.perf_counter() - t_start,
                    timings=last_run["timings"])


def _timings(computed: Sequence[dict[str, Any]], pipeline_s: float, started_at: float) -> dict[str, Any]:
    """Throughput of this run: overall, to the first committed shard (start-up), and steady after it."""
    images = sum(r["rows"] + r["quarantined"] for r in computed)
    out: dict[str, Any] = {
        "pipeline_s": pipeline_s,
        "images_per_s": images / pipeline_s if images and pipeline_s > 0 else None,
        "startup_s": None,
        "steady_images_per_s": None,
        # summed over shards: where the work went, and how long the actors waited for input
        **{f"{k}_s": sum(r[f"{k}_s"] for r in computed) for k in ("load", "encode", "write", "wait")},
    }
    if computed:
        by_time = sorted(computed, key=lambda r: r["done_at"])
        out["startup_s"] = by_time[0]["done_at"] - started_at  # actor start, tower load, first decode + encode
        if len(by_time) > 1:
            first = by_time[0]
            rest = images - first["rows"] - first["quarantined"]
            out["steady_images_per_s"] = rest / max(by_time[-1]["done_at"] - first["done_at"], 1e-9)
    return out


def write_manifest(out: str, shards: Sequence[Sequence[str]], fp: dict[str, Any], shape: tuple[int, int],
                   computed: Sequence[dict[str, Any]] = (), extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every planned shard (this run's results, else its file's footer) and write ``manifest.json`` last.

    Raises if any shard is missing or if images in != features out + quarantined.
    """
    from vitune.model.vision import fingerprint_id

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
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fp,
        "fingerprint_id": fp_id,
        "counts": {"images_in": images_in, "features_out": features_out, "quarantined": quarantined,
                   "shards": len(entries), **extra.pop("record_counts", {})},
        "schema": {"columns": [KEY_COLUMN, FEATURES_COLUMN], "num_patches": shape[0], "hidden_size": shape[1],
                   "shape": list(shape), "dtype": FEATURE_DTYPE},
        "shards": entries,
        "errors_dir": ERRORS_DIR if quarantined else None,
        "total_bytes": total_bytes,
        "bytes_per_image": total_bytes / features_out if features_out else None,
        **extra,
    }
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return manifest


def _summary(manifest: dict[str, Any], out: str, computed: int, wall_s: float,
             timings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's summary (returned, logged to MLflow by the job) and its one-line log."""
    counts, timings = manifest["counts"], timings or {}
    summary = {
        "output": out,
        "fingerprint_id": manifest["fingerprint_id"],
        "images_in": counts["images_in"],
        "features_out": counts["features_out"],
        "quarantined": counts["quarantined"],
        "shards": counts["shards"],
        "computed_shards": computed,
        "reused_shards": counts["shards"] - computed,
        "wall_s": wall_s,
        "images_per_s": timings.get("images_per_s"),
        "steady_images_per_s": timings.get("steady_images_per_s"),
        "startup_s": timings.get("startup_s"),
        "actor_wait_s": timings.get("wait_s"),
        "bytes_per_image": manifest["bytes_per_image"],
        "total_bytes": manifest["total_bytes"],
    }
    rate = f"{summary['images_per_s']:.1f} images/s" if summary["images_per_s"] else "no compute"
    per_image = f"{manifest['bytes_per_image'] / 1024:.1f} KiB/image" if manifest["bytes_per_image"] else "-"
    log.info("features: %d images in = %d features + %d quarantined; %d shards (%d computed, %d reused) in %.1fs, "
             "%s, %s, %.1f MiB total → %s", counts["images_in"], counts["features_out"], counts["quarantined"],
             counts["shards"], computed, summary["reused_shards"], wall_s, rate, per_image,
             manifest["total_bytes"] / 2**20, out)
    return summary
