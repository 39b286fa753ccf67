"""Driver side of a training stage: data plan, Ray Train ``TorchTrainer`` × DeepSpeed, MLflow, registry.

``run_training(cfg)`` is what ``jobs/train.py`` and the pipeline call. The driver tokenizes the records
once (``vitune.train.data``), puts the trainable rows in the object store for the join with the feature
shards, and reports what it skipped per reason. Rank 0 logs step metrics to the MLflow run the driver
opened; the driver logs the config, the DeepSpeed config, the data counts and the model folder, and after
finetune registers the model. A run whose tower runs in the step reads the pixel store instead
(``TrainJobConfig.store_form``; ``vitune.train.tower``): the same join, with each image's tiles for features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.data import Dataset, FileShuffleConfig
from ray.train import Checkpoint, CheckpointConsistencyMode, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from vitune import layout, storage
from vitune.config import RUNS_SCHEME, TrainJobConfig, dump_config
from vitune.data.tokenizer import load_tokenizer
from vitune.family import FAMILY_TAG, model_family
from vitune.features.pixels import PixelStore
from vitune.features.store import FeatureStore
from vitune.lineage import log_training_inputs
from vitune.model.export import export_llava_hf
from vitune.model.folder import TOKENIZER_DIR
from vitune.model.importers import ensure_model_folder
from vitune.model.llava_hf import NotRepresentable
from vitune.model.lora import quantization_unavailable
from vitune.progress import RemoteProgress
from vitune.references import resolve_model
from vitune.runtime import connect, init_ray
from vitune.tracking import LLAVA_HF_TAG, MODEL_FOLDER_TAG, Tracker, mlflow_http_env, resolve_tracking_uri
from vitune.train.data import (
    DataStats,
    TokenizedRow,
    by_image_key,
    check_features,
    interleave,
    join_with_features,
    side_rows,
    tokenize_records,
    with_image_sizes,
)
from vitune.train.plan import Plan, deepspeed_config, gradient_accumulation
from vitune.train.tower import check_pixel_recipe, join_with_pixels
from vitune.train.worker import Worker, run_loop
from vitune.vision_recipe import VisionRecipe, model_recipe

log = logging.getLogger(__name__)
ROW_COLUMNS = ("input_ids", "labels", "features", "has_image", "length", "image_sizes")  # a training row's columns
ADAPTER_TAG = "vitune.adapter"  # on a registered version: "lora" when it holds an adapter, not full weights
BASE_LM_TAG = "vitune.base_lm"  # ... and the base LM that adapter goes over


def expected_fingerprint(cfg: TrainJobConfig) -> dict[str, Any]:
    """The fingerprint fields a config determines without loading the tower (checked against the store)."""
    v = cfg.model.vision
    fp = {"tower": v.name, "pretrained": v.pretrained, "feature_layer": v.feature_layer, "select": v.select,
          "image_mode": v.image_mode}
    recipe = model_recipe(v)
    if recipe is not None:  # anyres: the grid made the tiles (pad and crop fingerprints are as they were)
        fp["grid_pinpoints"] = recipe.fingerprint()["grid_pinpoints"]
    return fp


def open_store(cfg: TrainJobConfig) -> FeatureStore:
    """The store the run reads (``cfg.store_form``): the feature store, or the pixel store when the tower runs in
    the step; either refused when it was not made for this config."""
    if cfg.store_form == "pixels":
        store = PixelStore.open(layout.features_input(cfg), expect_fingerprint=layout.pixel_fingerprint(cfg))
        check_pixel_recipe(VisionRecipe.of(cfg.model.vision), store)
        return store
    store = FeatureStore.open(layout.features_input(cfg), expect_fingerprint=expected_fingerprint(cfg))
    check_store_recipe(cfg, store)
    return store


def feature_dim(cfg: TrainJobConfig, store: FeatureStore) -> int:
    """The width of the tower's features the projector takes: the feature store's, or (pixels) the tower's."""
    return VisionRecipe.of(cfg.model.vision).hidden_size if isinstance(store, PixelStore) else store.feature_dim


def check_store_recipe(cfg: TrainJobConfig, store: FeatureStore) -> None:
    """Refuse a store whose tiles are not the ones the model's recipe packs (the config's tower, grid and tile
    size; the merge and anyres_max_N are the model's and no part of the store), or a tile store for a pad model."""
    recipe = model_recipe(cfg.model.vision)
    if recipe is None:
        if store.tiled:
            raise ValueError(f"feature store {store.uri} holds anyres tiles; model.vision.image_aspect_ratio="
                             f"{cfg.model.vision.image_aspect_ratio!r} takes one tile per image")
        return
    have = store.manifest["fingerprint_id"]
    if not store.tiled or recipe.fingerprint_id() != have:
        raise ValueError(f"feature store {store.uri} ({have}, fingerprint {store.fingerprint}) was not made by "
                         f"model.vision's anyres recipe ({recipe.fingerprint_id()}, {recipe.fingerprint()}): re-run "
                         "the features job with this model.vision")


def training_rows(cfg: TrainJobConfig, store: FeatureStore) -> list[TokenizedRow]:
    """One row per input record, tokenized with the model's tokenizer; a row that cannot train says why."""
    with tempfile.TemporaryDirectory(prefix="vitune-tok-") as tmp:
        tokenizer = load_tokenizer(cfg.model.tokenizer or _tokenizer_source(cfg, tmp))
    # max_length counts each image's visual tokens, as LLaVA truncates after expanding <image>; an anyres image
    # counts what the model's recipe (its merge and anyres_max_N cap) packs its tiles into
    recipe = model_recipe(cfg.model.vision)
    if isinstance(store, PixelStore):  # a pixel store names no tower: the model's recipe counts its tokens
        recipe = recipe or VisionRecipe.of(cfg.model.vision)
    counts = store.visual_tokens(recipe) if recipe is not None else store.visual_tokens()
    rows = tokenize_records(cfg.data.records, cfg.model.template, tokenizer, cfg.model.max_length,
                            image_positions=counts, max_visual_tokens=cfg.train.max_visual_tokens)
    rows = check_features(rows, set(store.keys()))
    return with_image_sizes(rows, store.image_sizes()) if store.tiled else rows


def _tokenizer_source(cfg: TrainJobConfig, tmp: str) -> str:
    """The tokenizer of the initial model folder when starting from one (downloaded into ``tmp``), else the LM's."""
    if cfg.train.init_from:
        folder = cfg.train.init_from
        local = storage.local_path(folder)
        if local:
            return str(Path(local) / TOKENIZER_DIR)
        return str(storage.download_dir(storage.join(folder, TOKENIZER_DIR), tmp))
    return cfg.model.lm


def build_dataset(cfg: TrainJobConfig, store: FeatureStore, rows: list[TokenizedRow], samples: int) -> Dataset:
    """The feature shards streamed and joined to the trainable single-image ``rows`` (which cross Ray once, here);
    ``samples`` counts those rows (text-only and multi-image rows reach the workers apart, see ``_ray_train_loop``)."""
    # a new file order every epoch (reseeded per execution); rows then shuffle in a local buffer
    ds = store.to_ray_dataset(shuffle=FileShuffleConfig(seed=cfg.train.seed))
    if isinstance(store, PixelStore):
        return _pixel_dataset(cfg, store, ds, rows, samples)
    # light tasks (half a CPU): they must fit beside the training workers, whose CPUs Ray Data excludes
    tile_shape = (store.num_patches, store.hidden_size) if store.tiled else None  # a tile store's rows are bytes
    ds = ds.map_batches(join_with_features, batch_size=64, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"by_key_ref": [ray.put(by_image_key(rows))], "tile_shape": tile_shape})
    tiles = store.num_tiles()
    per_image = sum(tiles.values()) / len(tiles) if store.tiled and tiles else 1  # tiles of an image, on average
    joined_mb = samples * per_image * store.num_patches * store.hidden_size * 2 / 2**20
    if joined_mb <= cfg.train.materialize_below_mb:
        # small enough to keep in the object store: epochs then skip re-reading and re-joining, and the
        # per-epoch shuffle happens in each worker's local buffer
        log.info("materialising the joined training data (%.1f MiB of features)", joined_mb)
        ds = ds.materialize()
    return ds


def _pixel_dataset(cfg: TrainJobConfig, store: PixelStore, ds: Dataset, rows: list[TokenizedRow],
                   samples: int) -> Dataset:
    """``build_dataset`` for the pixel store: each row joined to its image's stored tiles (``join_with_pixels``)."""
    ds = ds.map_batches(join_with_pixels, batch_size=64, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"by_key_ref": [ray.put(by_image_key(rows))], "tile_size": store.tile_size,
                                   "dtype": store.pixel_dtype})
    tiles = store.num_tiles()
    per_image = sum(tiles.values()) / len(tiles) if tiles else 1
    itemsize = 1 if store.pixel_dtype == "uint8" else 2
    joined_mb = samples * per_image * 3 * store.tile_size**2 * itemsize / 2**20
    if joined_mb <= cfg.train.materialize_below_mb:
        log.info("materialising the joined training data (%.1f MiB of pixels)", joined_mb)
        ds = ds.materialize()
    return ds


def _ray_train_loop(config: dict) -> None:
    """Ray Train's per-worker entry: this rank's shard of the joined rows through ``run_loop``."""
    cfg = TrainJobConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    shard = ray.train.get_dataset_shard("train")

    def epoch_rows(epoch: int) -> Iterator[dict]:
        for batch in shard.iter_batches(batch_size=64, batch_format="numpy", local_shuffle_buffer_size=256,
                                        local_shuffle_seed=cfg.train.seed + 97 * epoch + rank):
            n = len(batch["length"])
            names = [k for k in ROW_COLUMNS if k in batch]  # image_sizes: rows of an anyres store only
            for i in range(n):
                yield {k: batch[k][i] for k in names}

    # text-only rows have no features to join, multi-image rows come joined by the driver: each rank takes an
    # equal share of them and mixes it into its stream
    text = ray.get(config["text_rows"][0]) if config.get("text_rows") else []
    my_text = text[rank::world][: len(text) // world]

    def mixed_rows(epoch: int) -> Iterator[dict]:
        return interleave(epoch_rows(epoch), my_text, config.get("image_rows_per_rank", 0),
                          seed=cfg.train.seed + 97 * epoch + rank)

    tracker = None
    if rank == 0 and config.get("run_id"):
        tracker = Tracker(cfg.tracking, cfg.storage.root, run_id=config["run_id"])

    digest = config_digest(config["cfg"])

    def report(metrics: dict, ckpt_dir: Path | None) -> None:
        if ckpt_dir:
            (ckpt_dir / CONFIG_DIGEST_FILE).write_text(digest)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)
        if ckpt_dir:
            wait_until_committed()

    board = config.get("progress")  # the driver's progress display (vitune.progress.RemoteProgress)

    def on_metrics(metrics: dict) -> None:
        if tracker:
            tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("step",)}, step=int(metrics["step"]))
        if board is not None:
            board.post.remote(int(metrics["step"]), {k: metrics.get(k) for k in ("loss", "samples_per_s")})
        log.info("step %d: %s", metrics["step"], {k: round(v, 4) for k, v in metrics.items()})

    restore = _restored_checkpoint(digest)
    worker = Worker(cfg, Plan(**config["plan"]), rank, world, config["feature_dim"])
    if tracker:  # what trains: count and share (LoRA: adapters + projector); the same values on a restart
        tracker.log_params(worker.trainable)
    run_loop(worker, mixed_rows, report, restore, config["fingerprint"], on_metrics)
    if tracker:  # metrics held while MLflow was not answering go out before this worker ends
        tracker.flush()


def wait_until_committed() -> None:
    """Block until the controller has registered the checkpoint this worker just reported.

    ``ray.train.report`` returns once this rank's upload is done; Ray Train 2.60 registers the checkpoint (what
    ``get_checkpoint()`` hands a restarted worker group) only when its controller has polled the report of
    every rank, and a failure it sees first discards the partial round, so a worker dying right after its
    report restarted the run from the previous checkpoint, or from zero. Past this call, a failure at any
    moment resumes from this checkpoint or a later one.
    """
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)


CONFIG_DIGEST_FILE = "config_digest.txt"
# train fields that may differ between a run and its resume: how it is run, not what it computes
RESUME_FREE_TRAIN_FIELDS = ("max_failures", "fail_at_step", "log_every", "checkpoint_every", "materialize_below_mb")


def config_digest(cfg_json: dict[str, Any]) -> str:
    """A digest of what a run computes (stage, model, data, training recipe), written into every checkpoint."""
    train = {k: v for k, v in cfg_json.get("train", {}).items() if k not in RESUME_FREE_TRAIN_FIELDS}
    what = {"stage": cfg_json.get("stage"), "model": cfg_json.get("model"), "data": cfg_json.get("data"),
            "train": train}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_checkpoint_config(folder: Path, digest: str) -> None:
    """Refuse to resume from a checkpoint written by a run of another config (its ``config_digest.txt``)."""
    path = folder / CONFIG_DIGEST_FILE
    if not path.is_file():
        log.warning("checkpoint %s records no config digest (written by an older vitune): resuming unchecked", folder)
        return
    have = path.read_text().strip()
    if have != digest:
        raise ValueError(f"refusing to resume from a checkpoint written by another config (digest {have}, this "
                         f"config {digest}): the stage's output already holds another run's checkpoints; set "
                         "train.output elsewhere or delete its ray/ folder")


def _restored_checkpoint(digest: str) -> Path | None:
    """A local copy of the checkpoint Ray Train restarts this run from (None on a fresh start)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="vitune-restore-"))
    with ckpt.as_directory() as d:
        shutil.copytree(d, local, dirs_exist_ok=True)
    check_checkpoint_config(local, digest)
    return local


def _ray_storage(cfg: TrainJobConfig) -> tuple[str, Any]:
    base = layout.train_checkpoints(cfg)
    fs, path = storage.resolve(base)
    if storage.is_remote(base):
        return path, fs
    os.makedirs(path, exist_ok=True)
    return path, None


def _check_runnable(cfg: TrainJobConfig) -> None:
    """What only the machine the job runs on can tell: QLoRA's 4-bit base needs bitsandbytes here."""
    quantization = cfg.train.lora.quantization
    if cfg.train.lora.enabled and quantization != "none":
        reason = quantization_unavailable()
        if reason:
            raise ValueError(f"train.lora.quantization={quantization!r} (QLoRA) cannot run here: {reason}; set "
                             "train.lora.quantization=none for LoRA over the full-precision base")


def job_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The line ``jobs/train.py`` prints: the stage, its model folder, run and steps."""
    return {k: summary[k] for k in ("stage", "model_folder", "run_id", "total_steps")}


def run_training(cfg: TrainJobConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run one stage end to end; returns a summary (model folder URI, MLflow run id, metrics, data stats)."""
    connect(cfg)
    _check_runnable(cfg)
    requested = cfg  # as the job was given it: what a pipeline re-run compares its own config with
    if cfg.train.init_from:  # workers get a plain folder URI (stage names and runs:/ resolved once, here)
        folder = resolve_model(cfg.train.init_from, root=cfg.storage.root,
                               tracking_uri=resolve_tracking_uri(cfg.tracking, cfg.storage.root))
        # a llava-hf folder, an official LLaVA checkpoint or a stage-1 mm_projector.bin becomes a model folder
        folder = ensure_model_folder(folder, cfg.model, expected_fingerprint(cfg),
                                     layout.imported_models(cfg.storage.root))
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": folder})})
    init_ray(cfg.ray)
    world = cfg.train.num_workers
    store = open_store(cfg)
    rows = training_rows(cfg, store)
    stats = DataStats.of(rows)
    if not stats.samples:
        raise ValueError(f"no trainable records in data.records={cfg.data.records}: skipped {dict(stats.skipped)}")
    ds = build_dataset(cfg, store, rows, stats.single_image)
    # held here for the whole run: the workers fetch them by this reference. Multi-image rows get their
    # features here, looked up by key: no one shard block holds all of a row's images
    text_rows = [ray.put(side_rows(rows, store.get))] if stats.side else None
    del rows  # the trainable ones live in the object store now
    accum = gradient_accumulation(cfg, world)
    # every rank gets an equal share of the joined stream (Ray Data's equal split) and of the side rows' slices
    per_rank = stats.single_image // world + stats.side // world
    plan = Plan(per_rank * world, world, cfg.train.micro_batch_size, accum, cfg.train.epochs, cfg.train.max_steps)
    if plan.total_steps < 1:
        raise ValueError(
            f"{stats.samples} samples give no full optimizer step with global batch {cfg.train.global_batch_size}")
    log.info("stage %s: %d samples (%s), %d workers, accum %d, %d steps/epoch, %d steps",
             cfg.stage, stats.samples, stats.as_dict(), world, accum, plan.steps_per_epoch, plan.total_steps)

    tracker = _start_run(cfg, stats, plan, parent_run_id, requested)
    # the records, the feature store and the starting model as the run's MLflow inputs (vitune.lineage)
    lineage_tags = log_training_inputs(tracker, cfg.data.records, layout.features_input(cfg), cfg.train.init_from)
    try:
        with RemoteProgress(cfg.stage, plan.total_steps, "steps") as board:
            result = _trainer(cfg, ds, store, plan, tracker.run_id, board,
                              data={"text_rows": text_rows, "image_rows_per_rank": stats.single_image // world}).fit()
    except Exception:
        tracker.finish("FAILED")
        raise
    folder = layout.model_folder(cfg)
    metrics = dict(result.metrics or {})
    family = model_family(cfg.model)
    tracker.set_tags({MODEL_FOLDER_TAG: folder, FAMILY_TAG: family})
    if cfg.train.lora.enabled:  # the run's artifact "model" is the LoRA folder: adapter/ + projector, no LM
        tracker.set_tags({ADAPTER_TAG: f"{RUNS_SCHEME}{tracker.run_id}/model/adapter", BASE_LM_TAG: cfg.model.lm})
    _log_model_folder(tracker, folder)
    version = None
    if cfg.stage == "finetune" and cfg.tracking.enabled and cfg.tracking.registered_model and not tracker.active:
        log.warning("model %s not registered: MLflow at %s never opened this run (the model folder is %s)",
                    cfg.tracking.registered_model, tracker.uri, folder)
    if cfg.stage == "finetune" and tracker.active:
        llava_hf = _log_llava_hf_export(tracker, folder)
        if cfg.tracking.registered_model:
            tags = {**lineage_tags, "vitune.finetune_run": tracker.run_id, FAMILY_TAG: family}
            if llava_hf:
                tags[LLAVA_HF_TAG] = llava_hf
            if cfg.train.lora.enabled:  # the version is an adapter (+ projector) over a base it names
                tags.update({ADAPTER_TAG: "lora", BASE_LM_TAG: cfg.model.lm})
            version = tracker.register_model(cfg.tracking.registered_model, tags=tags or None)
    tracker.finish()
    summary = {"stage": cfg.stage, "model_folder": folder, "run_id": tracker.run_id, "metrics": metrics,
               "data": stats.as_dict(), "total_steps": plan.total_steps, "registered_version": version,
               "tracking_uri": tracker.uri}
    storage.write_json(layout.train_summary(cfg), summary)
    return summary


def _start_run(cfg: TrainJobConfig, stats: DataStats, plan: Plan, parent_run_id: str | None,
               requested: TrainJobConfig | None = None) -> Tracker:
    """The stage's MLflow run with the config, the plan and the data counts (``skipped_<reason>``) logged.

    MLflow keeps the resolved config (``init_from`` a folder); the stage's ``config.yaml`` keeps the config as
    requested (``init_from`` as written, e.g. a stage name), which is what a pipeline re-run compares."""
    tracker = Tracker(cfg.tracking, cfg.storage.root, run_name=f"{cfg.stage}", parent_run_id=parent_run_id,
                      tags={"vitune.stage": cfg.stage})
    tracker.log_params(cfg.model_dump(mode="json"))
    tracker.log_params({"plan": {"total_steps": plan.total_steps, "accum": plan.accum}})
    tracker.log_metrics(stats.metrics(), step=0)
    tracker.log_text(dump_config(cfg), "config/resolved.yaml")
    tracker.log_text(json.dumps(deepspeed_config(cfg, plan.world_size), indent=2), "config/deepspeed.json")
    storage.write_text(layout.train_config(cfg), dump_config(requested or cfg))
    return tracker


def _trainer(cfg: TrainJobConfig, ds: Dataset, store: FeatureStore, plan: Plan, run_id: str | None,
             board: Any = None, data: dict | None = None) -> TorchTrainer:
    path, fs = _ray_storage(cfg)
    return TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "plan": plan.__dict__,
            "run_id": run_id,
            "feature_dim": feature_dim(cfg, store),
            "fingerprint": store.fingerprint,
            "progress": board,
            **(data or {}),  # the text-only rows' reference and the image rows each rank streams
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=plan.world_size, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=f"vitune-{cfg.stage}", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             # rank 0 tracks with this process's MLflow HTTP settings (retries, timeout)
                             worker_runtime_env={"env_vars": mlflow_http_env()}),
        datasets={"train": ds},
    )


def _log_llava_hf_export(tracker: Tracker, folder: str) -> str | None:
    """The finetuned model in the llava-hf layout as the run's ``llava-hf`` artifact (transformers, vLLM, SGLang
    load it); returns its ``runs:/`` URI, or None (with the reason logged and tagged) when it cannot be exported."""
    with tempfile.TemporaryDirectory(prefix="vitune-hf-") as d:
        try:
            export_llava_hf(folder, d)
        except NotRepresentable as exc:
            log.warning("the model cannot be exported to llava-hf: %s", exc)
            tracker.set_tags({LLAVA_HF_TAG: f"not exportable: {exc}"})
            return None
        tracker.log_artifacts(d, "llava-hf")
    uri = f"{RUNS_SCHEME}{tracker.run_id}/llava-hf"
    tracker.set_tags({LLAVA_HF_TAG: uri})
    return uri


def _log_model_folder(tracker: Tracker, folder: str) -> None:
    if not tracker.active:
        return
    with tempfile.TemporaryDirectory(prefix="vitune-art-") as d:
        storage.download_dir(folder, d)
        tracker.log_artifacts(d, "model")
