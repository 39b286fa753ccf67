"""The feature job's driver: the distinct images of some records → a fingerprinted feature store.

``extract_features(cfg)``:

    plan (driver)       sorted distinct image keys → shards of ``features.shard_size`` keys (shard i is
                        always the same keys); only shards whose file is missing are computed
    compute (Ray Data)  ``vitune.features.encode.run_shards``: decode + preprocess on CPU tasks, the tower
                        in an actor pool; each shard's Parquet file is written in one atomic write
    manifest (driver)   written last (``vitune.features.store.write_manifest``), from the shard footers:
                        counts, shard list, schema, timings

A shard is done iff its file exists and its footer checks out against the plan (rows, keys, tower; its
size against the manifest), so a re-run after a kill computes only the missing or damaged shards (no
duplicates, finished shards untouched) and a run over a complete store computes and writes nothing. One
run at a time writes a store: it holds the store's lease (``vitune.features.lease``) from the plan to the
manifest; a concurrent run waits, then finds the store complete. The
store's URI is ``vitune.layout.features_output``: ``<storage.root>/features/<fingerprint id>`` by default.

With ``features.form=pixels`` the same run writes the pixel store (``vitune.features.pixels``): the same plan,
lease, reuse and manifest; its fingerprint is the preprocessing's, its shards are written by CPU tasks alone
(``encode.run_pixel_shards``: decode, preprocess, write; no tower) under ``<storage.root>/pixels/<id>``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import PIL

from vitune import layout, storage
from vitune.config import FeaturesJobConfig
from vitune.data.records import read_records_with_errors
from vitune.features.encode import PreprocessSpec, run_pixel_shards, run_shards
from vitune.features.lease import StoreLease
from vitune.features.pixels import PIXELS_FORMAT_VERSION, pixel_schema
from vitune.features.store import (
    ERRORS_DIR,
    FORMAT_VERSION,
    MANIFEST,
    PLAN,
    shard_name,
    shard_problem,
    write_manifest,
)
from vitune.model.vision import load_vision_tower, pixel_fingerprint
from vitune.runtime import connect, init_ray
from vitune.vision_recipe import fingerprint_diffs, fingerprint_id

log = logging.getLogger(__name__)

FAIL_AFTER_ENV = "VITUNE_FAIL_AFTER_SHARDS"  # test hook: compute this many shards, then die before the manifest


class SimulatedInterruption(RuntimeError):
    """Raised by the ``fail_after_shards`` test hook after the requested shards were written."""


# ---------------------------------------------------------------------------------------------- planning


def collect_image_keys(record_uris: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Sorted distinct image keys referenced by valid records (every image of each), and record counts."""
    if not record_uris:
        raise ValueError("data.records: no record files given")
    keys: set[str] = set()
    stats = {"records": 0, "records_invalid": 0, "records_text_only": 0}
    for uri in record_uris:
        records, errors = read_records_with_errors(uri)
        stats["records"] += len(records)
        stats["records_invalid"] += len(errors)
        for record in records:
            if not record.images:
                stats["records_text_only"] += 1
            keys.update(record.images)  # every image of a multi-image record is encoded
    if not keys:
        raise ValueError(f"data.records: no record in {list(record_uris)} references an image")
    return sorted(keys), stats


def plan_shards(keys: Sequence[str], shard_size: int) -> list[list[str]]:
    """Shard i holds sorted keys ``[i * shard_size, (i + 1) * shard_size)``: the same on every run."""
    return [list(keys[i:i + shard_size]) for i in range(0, len(keys), shard_size)]


def key_set_hash(keys: Sequence[str]) -> str:
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode("utf-8") + b"\0")
    return h.hexdigest()


def _check_plan(out: str, plan: dict[str, Any], write: bool) -> bool:
    """Compare with the store's ``plan.json``: same tower, images and shard settings, or refuse. With
    ``write`` (under the lease), a missing plan is written; returns whether a plan was there."""
    uri = storage.join(out, PLAN)
    if not storage.exists(uri):
        if write:
            storage.write_json(uri, plan)
        return False
    have = storage.read_json(uri)
    diffs = fingerprint_diffs(plan["fingerprint"], have.get("fingerprint", {}))
    if diffs:
        detail = "; ".join(f"{f}: expected {w!r}, found {h!r}" for f, w, h in diffs)
        raise ValueError(f"{out} holds a store of another vision tower or form ({detail}); set features.output "
                         "elsewhere")
    for field in ("shard_size", "max_pixels", "num_images", "keys_sha256"):
        if have.get(field) != plan[field]:
            raise ValueError(
                f"{out} was started with other images or settings ({field}: this run has {plan[field]!r}, "
                f"the store has {have.get(field)!r}); set features.output elsewhere or delete the store"
            )
    return True


def complete_manifest(out: str, shards: Sequence[Sequence[str]]) -> dict[str, Any] | None:
    """The store's manifest when the store is complete for this plan: every planned shard listed and its
    file on storage with the manifest's size (one listing, no shard read); else None."""
    manifest_uri = storage.join(out, MANIFEST)
    if not storage.exists(manifest_uri):
        return None
    manifest = storage.read_json(manifest_uri)
    sizes = {posixpath.basename(u): n for u, n in storage.file_sizes(out, ".parquet", recursive=False).items()}
    entries = manifest.get("shards", [])
    if [e.get("file") for e in entries] != [shard_name(i) for i in range(len(shards))]:
        return None
    bad = [e["file"] for e in entries if sizes.get(e["file"]) != e.get("bytes")]
    if bad:
        log.warning("feature store %s: %d shard file(s) differ from the manifest (missing or another size, "
                    "e.g. %s): recomputing them", out, len(bad), bad[0])
        return None
    return manifest


def reusable_shards(out: str, shards: Sequence[Sequence[str]], fp_id: str) -> dict[int, dict[str, Any]]:
    """``{shard: footer info}`` of the shard files a run can keep; each other file is logged and recomputed."""
    manifest_uri = storage.join(out, MANIFEST)
    recorded = {}
    if storage.exists(manifest_uri):
        recorded = {e["file"]: e["bytes"] for e in storage.read_json(manifest_uri).get("shards", [])}
    existing = {posixpath.basename(u) for u in storage.list_files(out, suffix=".parquet", recursive=False)}
    keep: dict[int, dict[str, Any]] = {}
    for i, keys in enumerate(shards):
        name = shard_name(i)
        if name not in existing:
            continue
        problem, info = shard_problem(storage.join(out, name), keys, fp_id, recorded.get(name))
        if problem:
            log.warning("feature store %s: %s is not a finished shard (%s): recomputing it", out, name, problem)
        else:
            keep[i] = {**info, "shard": i}
    return keep


def _check_written(out: str, shards: Sequence[Sequence[str]], infos: Sequence[dict[str, Any]]) -> None:
    """Every planned shard is on storage with the size its writer reported, before the manifest names it
    (a store that lost objects, e.g. to a server restart, fails here, and a re-run recomputes them)."""
    sizes = {posixpath.basename(u): n for u, n in storage.file_sizes(out, ".parquet", recursive=False).items()}
    by_shard = {r["shard"]: r["bytes"] for r in infos}
    bad = [shard_name(i) for i in range(len(shards)) if sizes.get(shard_name(i)) != by_shard.get(i)]
    if bad:
        raise RuntimeError(f"feature store {out}: {len(bad)} shard file(s) missing or of another size after "
                           f"writing (e.g. {bad[0]}); no manifest written. Re-run to recompute them")


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
                if storage.local.TEMP_MARK in name:
                    os.remove(os.path.join(folder, name))


def extract_features(cfg: FeaturesJobConfig, fail_after_shards: int | None = None,
                     lease_wait_s: float | None = None) -> dict[str, Any]:
    """Build (or finish) the feature store for ``cfg``; returns the run summary. See the module docstring.

    One run at a time writes a store (``vitune.features.lease``): another waits up to ``lease_wait_s``
    (default: env ``VITUNE_STORE_LEASE_WAIT_S``, else 15 min), then finds the store complete or finishes it.
    ``fail_after_shards`` (or env ``VITUNE_FAIL_AFTER_SHARDS``) is a test hook: compute only that many of
    the missing shards, then raise ``SimulatedInterruption`` before the manifest is written.
    """
    t_start = time.perf_counter()
    if fail_after_shards is None:
        fail_after_shards = _fail_after_from_env()
    connect(cfg)  # Ray only once there are shards to compute: a complete store needs none
    # The driver loads the tower on CPU once for what defines the store: fingerprint, [N, D], preprocessing.
    tower = load_vision_tower(cfg.model.vision)
    pixels = cfg.store_form == "pixels"  # the pixel store: the same job, the tiles before the tower stored
    if pixels:
        dtype = cfg.features.pixel_dtype
        fp = {**pixel_fingerprint(tower, dtype), "pillow_version": PIL.__version__}  # PIL's resize makes them
        spec = PreprocessSpec.from_tower(tower, uint8=dtype == "uint8")
        shape, store_schema = (3, tower.image_size), pixel_schema(dtype, tower.image_size)
        compute, format_version = run_pixel_shards, PIXELS_FORMAT_VERSION
    else:
        fp, spec = tower.fingerprint(), PreprocessSpec.from_tower(tower)
        shape, store_schema, compute, format_version = (tower.num_patches, tower.hidden_size), None, run_shards, None
    fp_id = fingerprint_id(fp)
    del tower
    out = layout.features_output(cfg, fp_id)
    keys, record_stats = collect_image_keys(cfg.data.records)
    image_root = layout.image_root(cfg.data)
    if not cfg.data.image_root:
        log.info("data.image_root not set: images are read relative to %s", image_root)
    shards = plan_shards(keys, cfg.features.shard_size)
    plan = {"format_version": FORMAT_VERSION, "fingerprint": fp, "fingerprint_id": fp_id,
            "shard_size": cfg.features.shard_size, "max_pixels": cfg.features.max_pixels,
            "num_images": len(keys), "num_shards": len(shards), "keys_sha256": key_set_hash(keys)}
    # a complete store is answered without the lease or any write
    if _check_plan(out, plan, write=False) and (manifest := complete_manifest(out, shards)):
        log.info("feature store %s is complete (%d shards): nothing to do", out, len(shards))
        return _summary(manifest, out, computed=0, wall_s=time.perf_counter() - t_start)
    with StoreLease(out, wait_s=lease_wait_s) as lease:
        _check_plan(out, plan, write=True)  # again: the run we may have waited for wrote it
        manifest = complete_manifest(out, shards)
        if manifest:
            log.info("feature store %s was completed by another run while this one waited", out)
            return _summary(manifest, out, computed=0, wall_s=time.perf_counter() - t_start)
        _cleanup_temp_files(out)  # under the lease: no other writer's temp files can be here
        reused = reusable_shards(out, shards, fp_id)
        todo = [(i, s) for i, s in enumerate(shards) if i not in reused]
        log.info("feature store %s: %d images in %d shards of %d; %d done, %d to compute (fingerprint %s)",
                 out, len(keys), len(shards), cfg.features.shard_size, len(reused), len(todo), fp_id)
        interrupted = fail_after_shards is not None and fail_after_shards < len(todo)
        if interrupted:
            todo = todo[:fail_after_shards]
        computed: list[dict[str, Any]] = []
        pool = None
        t_pipe, t_pipe_wall = time.perf_counter(), time.time()
        if todo:
            init_ray(cfg.ray)
            computed, pool = compute(cfg, todo, out, fp_id, spec, image_root)
        if interrupted:
            raise SimulatedInterruption(f"{FAIL_AFTER_ENV}: stopped after {len(computed)} shards, before the manifest")
        last_run = {
            "computed_shards": len(computed),
            "reused_shards": len(shards) - len(computed),
            "pool": asdict(pool) if pool else None,
            "preprocessed_in_actor": sum(bool(r["fused"]) for r in computed),
            "timings": _timings(computed, time.perf_counter() - t_pipe, t_pipe_wall),
            "lease_waited_s": lease.waited_s,
        }
        infos = [*computed, *reused.values()]
        _check_written(out, shards, infos)
        lease.check()  # the manifest is the commit: only the lease's holder may write it
        manifest = write_manifest(out, shards, fp, shape, infos, {
            "shard_size": cfg.features.shard_size, "config": cfg.model_dump(mode="json"), "image_root": image_root,
            "record_counts": record_stats, "last_run": last_run}, schema=store_schema, format_version=format_version)
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


def _summary(manifest: dict[str, Any], out: str, computed: int, wall_s: float,
             timings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's summary (returned; ``vitune.features.run`` logs it to MLflow) and its one-line log."""
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
