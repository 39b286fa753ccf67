"""Driver side of a training stage: data plan, Ray Train ``TorchTrainer`` × DeepSpeed, MLflow, registry.

``run_training(cfg)`` is what ``jobs/train.py`` and the pipeline call. The driver tokenizes the records
once (``vitune.train.data``), puts the trainable rows in the object store for the join with the feature
shards, and reports what it skipped per reason. Rank 0 logs step metrics to the MLflow run the driver
opened; the driver logs the config, the DeepSpeed config, the data counts and the model folder, and after
finetune registers the model.
"""

from __future__ import annotations

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
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from vitune import layout, storage
from vitune.config import TrainJobConfig, connect, dump_config, init_ray
from vitune.data.tokenizer import load_tokenizer
from vitune.features.store import FeatureStore
from vitune.model.checkpoints import ensure_model_folder
from vitune.model.export import export_llava_hf
from vitune.model.folder import TOKENIZER_DIR
from vitune.model.llava_hf import NotRepresentable
from vitune.tracking import (
    LLAVA_HF_TAG,
    MODEL_FOLDER_TAG,
    RUNS_SCHEME,
    Tracker,
    resolve_tracking_uri,
    run_model_folder,
)
from vitune.train.data import (
    DataStats,
    TokenizedRow,
    by_image_key,
    check_features,
    join_with_features,
    tokenize_records,
)
from vitune.train.worker import (
    Plan,
    Worker,
    deepspeed_config,
    gradient_accumulation,
    run_loop,
)

log = logging.getLogger(__name__)


def expected_fingerprint(cfg: TrainJobConfig) -> dict[str, Any]:
    """The fingerprint fields a config determines without loading the tower (checked against the store)."""
    v = cfg.model.vision
    return {"tower": v.name, "pretrained": v.pretrained, "feature_layer": v.feature_layer, "select": v.select,
            "image_mode": v.image_mode}


def training_rows(cfg: TrainJobConfig, store: FeatureStore) -> list[TokenizedRow]:
    """One row per input record, tokenized with the model's tokenizer; a row that cannot train says why."""
    with tempfile.TemporaryDirectory(prefix="vitune-tok-") as tmp:
        tokenizer = load_tokenizer(cfg.model.tokenizer or _tokenizer_source(cfg, tmp))
    rows = tokenize_records(cfg.data.records, cfg.model.template, tokenizer, cfg.model.max_length)
    return check_features(rows, set(store.keys()))


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
    """The feature shards streamed and joined to the trainable ``rows`` (which cross Ray once, here)."""
    # a new file order every epoch (reseeded per execution); rows then shuffle in a local buffer
    ds = store.to_ray_dataset(shuffle=FileShuffleConfig(seed=cfg.train.seed))
    # light tasks (half a CPU): they must fit beside the training workers, whose CPUs Ray Data excludes
    ds = ds.map_batches(join_with_features, batch_size=64, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"by_key_ref": [ray.put(by_image_key(rows))]})
    joined_mb = samples * store.num_patches * store.hidden_size * 2 / 2**20
    if joined_mb <= cfg.train.materialize_below_mb:
        # small enough to keep in the object store: epochs then skip re-reading and re-joining, and the
        # per-epoch shuffle happens in each worker's local buffer
        log.info("materialising the joined training data (%.1f MiB of features)", joined_mb)
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
            for i in range(n):
                yield {k: batch[k][i] for k in ("input_ids", "labels", "features", "has_image", "length")}

    tracker = None
    if rank == 0 and config.get("run_id"):
        tracker = Tracker(cfg.tracking, cfg.storage.root, run_id=config["run_id"])

    def report(metrics: dict, ckpt_dir: Path | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)

    def on_metrics(metrics: dict) -> None:
        if tracker:
            tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("step",)}, step=int(metrics["step"]))
        log.info("step %d: %s", metrics["step"], {k: round(v, 4) for k, v in metrics.items()})

    restore = _restored_checkpoint()
    worker = Worker(cfg, Plan(**config["plan"]), rank, world, config["feature_dim"])
    run_loop(worker, epoch_rows, report, restore, config["fingerprint"], on_metrics)


def _restored_checkpoint() -> Path | None:
    """A local copy of the checkpoint Ray Train restarts this run from (None on a fresh start)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="vitune-restore-"))
    with ckpt.as_directory() as d:
        shutil.copytree(d, local, dirs_exist_ok=True)
    return local


def _ray_storage(cfg: TrainJobConfig) -> tuple[str, Any]:
    base = layout.train_checkpoints(cfg)
    fs, path = storage.resolve(base)
    if storage.is_remote(base):
        return path, fs
    os.makedirs(path, exist_ok=True)
    return path, None


def run_training(cfg: TrainJobConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run one stage end to end; returns a summary (model folder URI, MLflow run id, metrics, data stats)."""
    connect(cfg)
    if cfg.train.init_from:  # workers get a plain folder URI (runs:/ resolved here, against our tracking)
        folder = run_model_folder(cfg.train.init_from, resolve_tracking_uri(cfg.tracking, cfg.storage.root))
        # a llava-hf folder, an official LLaVA checkpoint or a stage-1 mm_projector.bin becomes a model folder
        folder = ensure_model_folder(folder, cfg.model, expected_fingerprint(cfg),
                                     layout.imported_models(cfg.storage.root))
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": folder})})
    init_ray(cfg.ray)
    world = cfg.train.num_workers
    store = FeatureStore.open(layout.features_input(cfg), expect_fingerprint=expected_fingerprint(cfg))
    rows = training_rows(cfg, store)
    stats = DataStats.of(rows)
    if not stats.samples:
        raise ValueError(f"no trainable records in data.records={cfg.data.records}: skipped {dict(stats.skipped)}")
    ds = build_dataset(cfg, store, rows, stats.samples)
    del rows  # the trainable ones live in the object store now
    accum = gradient_accumulation(cfg, world)
    plan = Plan(stats.samples, world, cfg.train.micro_batch_size, accum, cfg.train.epochs, cfg.train.max_steps)
    if plan.total_steps < 1:
        raise ValueError(
            f"{stats.samples} samples give no full optimizer step with global batch {cfg.train.global_batch_size}")
    log.info("stage %s: %d samples (%s), %d workers, accum %d, %d steps/epoch, %d steps",
             cfg.stage, stats.samples, stats.as_dict(), world, accum, plan.steps_per_epoch, plan.total_steps)

    tracker = _start_run(cfg, stats, plan, parent_run_id)
    try:
        result = _trainer(cfg, ds, store, plan, tracker.run_id).fit()
    except Exception:
        tracker.finish("FAILED")
        raise
    folder = layout.model_folder(cfg)
    metrics = dict(result.metrics or {})
    tracker.set_tags({MODEL_FOLDER_TAG: folder})
    _log_model_folder(tracker, folder)
    version = None
    if cfg.stage == "finetune" and tracker.active:
        llava_hf = _log_llava_hf_export(tracker, folder)
        if cfg.tracking.registered_model:
            version = tracker.register_model(cfg.tracking.registered_model,
                                             tags={LLAVA_HF_TAG: llava_hf} if llava_hf else None)
    tracker.finish()
    summary = {"stage": cfg.stage, "model_folder": folder, "run_id": tracker.run_id, "metrics": metrics,
               "data": stats.as_dict(), "total_steps": plan.total_steps, "registered_version": version,
               "tracking_uri": tracker.uri}
    storage.write_json(layout.train_summary(cfg), summary)
    return summary


def _start_run(cfg: TrainJobConfig, stats: DataStats, plan: Plan, parent_run_id: str | None) -> Tracker:
    """The stage's MLflow run with the config, the plan and the data counts (``skipped_<reason>``) logged."""
    tracker = Tracker(cfg.tracking, cfg.storage.root, run_name=f"{cfg.stage}", parent_run_id=parent_run_id,
                      tags={"vitune.stage": cfg.stage})
    tracker.log_params(cfg.model_dump(mode="json"))
    tracker.log_params({"plan": {"total_steps": plan.total_steps, "accum": plan.accum}})
    tracker.log_metrics(stats.metrics(), step=0)
    tracker.log_text(dump_config(cfg), "config/resolved.yaml")
    tracker.log_text(json.dumps(deepspeed_config(cfg, plan.world_size), indent=2), "config/deepspeed.json")
    storage.write_text(layout.train_config(cfg), dump_config(cfg))
    return tracker


def _trainer(cfg: TrainJobConfig, ds: Dataset, store: FeatureStore, plan: Plan, run_id: str | None) -> TorchTrainer:
    path, fs = _ray_storage(cfg)
    return TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "plan": plan.__dict__,
            "run_id": run_id,
            "feature_dim": store.feature_dim,
            "fingerprint": store.fingerprint,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=plan.world_size, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=f"vitune-{cfg.stage}", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
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
