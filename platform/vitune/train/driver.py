"""Driver side of a training stage: data plan, Ray Train ``TorchTrainer`` × DeepSpeed, MLflow, registry.

``run_training(cfg)`` is what ``jobs/train.py`` and the pipeline call. Rank 0 logs metrics to the MLflow
run the driver opened; the driver logs the config, the DeepSpeed config and the model folder, and after
finetune registers the model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from vitune import storage
from vitune.config import TrainJobConfig, dump_config, init_ray
from vitune.tracking import Tracker, resolve_tracking_uri
from vitune.train.data import DataStats, TokenizeBatch, load_records, training_row
from vitune.train.worker import (
    Plan,
    deepspeed_config,
    gradient_accumulation,
    model_folder_uri,
    output_uri,
    resolve_init_from,
    run_loop,
)

log = logging.getLogger(__name__)

def expected_fingerprint(cfg: TrainJobConfig) -> dict[str, Any]:
    """The fingerprint fields a config determines without loading the tower (checked against the store)."""
    v = cfg.model.vision
    return {"tower": v.name, "pretrained": v.pretrained, "feature_layer": v.feature_layer, "select": v.select,
            "image_mode": v.image_mode}


# per Ray worker process: the tokenized records of the current run, fetched from the object store once
_TOKENIZED: dict[str, dict[str, list[dict]]] = {}


def join_with_records(batch: dict[str, np.ndarray], tokenized: list) -> dict[str, list]:
    """Ray Data ``map_batches`` task: a block of feature rows → one training row per record using it.

    A task (not an actor) so each epoch's re-execution reuses warm workers; ``tokenized`` boxes the
    object-store reference so Ray hands it over unresolved and each process fetches it only once.
    """
    import ray

    ref = tokenized[0]
    by_key = _TOKENIZED.get(ref.hex())
    if by_key is None:
        _TOKENIZED.clear()
        by_key = _TOKENIZED[ref.hex()] = ray.get(ref)
    cols: dict[str, list] = defaultdict(list)
    for key, feats in zip(batch["image_key"], batch["features"], strict=True):
        for sample in by_key.get(str(key), ()):
            for name, value in training_row(sample, feats).items():
                cols[name].append(value)
    return dict(cols)


def tokenize_with_ray(cfg: TrainJobConfig, stats: DataStats) -> tuple[dict[str, list[dict]], list[dict]]:
    """Validate + tokenize every record inside Ray Data; returns samples by image key and text-only ones."""
    import ray

    records = load_records(cfg.data.records, stats)
    if not records:
        raise ValueError(f"no valid records in data.records={cfg.data.records}")
    ds = ray.data.from_items([{"record": json.dumps(r.to_json())} for r in records])
    ds = ds.map_batches(TokenizeBatch, batch_size=256, concurrency=1, fn_constructor_kwargs={
        "template": cfg.model.template, "tokenizer_name": cfg.model.tokenizer or _tokenizer_source(cfg),
        "max_length": cfg.model.max_length})
    by_key: dict[str, list[dict]] = defaultdict(list)
    text_only: list[dict] = []
    n_ok = 0
    for row in ds.iter_rows():
        n_ok += 1
        stats.truncated += bool(row["truncated"])
        sample = {"input_ids": np.asarray(row["input_ids"], dtype=np.int32),
                  "labels": np.asarray(row["labels"], dtype=np.int32)}
        (by_key[row["image_key"]] if row["image_key"] else text_only).append(sample)
    if len(records) > n_ok:
        stats.skipped["mask"] += len(records) - n_ok
    return dict(by_key), text_only


def _tokenizer_source(cfg: TrainJobConfig) -> str:
    """The tokenizer of the initial model folder when starting from one, else the config's."""
    if cfg.train.init_from:
        folder = cfg.train.init_from
        local = storage.local_path(folder)
        if local:
            return str(Path(local) / "tokenizer")
        tmp = tempfile.mkdtemp(prefix="vitune-tok-")
        return str(storage.download_dir(storage.join(folder, "tokenizer"), tmp))
    return cfg.model.lm


def build_dataset(cfg: TrainJobConfig, stats: DataStats):
    """The joined, streamed training dataset + the feature store it reads."""
    import ray
    from ray.data import FileShuffleConfig

    from vitune.features.store import FeatureStore

    if not cfg.data.features:
        raise ValueError("data.features: no feature store URI (run jobs/extract_features.py first)")
    store = FeatureStore.open(cfg.data.features, expect_fingerprint=expected_fingerprint(cfg))
    by_key, text_only = tokenize_with_ray(cfg, stats)
    keys = set(store.keys())
    missing = [k for k in by_key if k not in keys]
    for k in missing:
        stats.skipped["image_not_in_feature_store"] += len(by_key.pop(k))
    stats.samples = sum(len(v) for v in by_key.values()) + len(text_only)
    if text_only:
        log.warning("%d text-only records are not used by this feature-store pipeline yet; counted as skipped",
                    len(text_only))
        stats.skipped["text_only"] += len(text_only)
        stats.samples -= len(text_only)
    # a new file order every epoch (reseeded per execution); rows then shuffle in a local buffer
    ds = store.to_ray_dataset(shuffle=FileShuffleConfig(seed=cfg.train.seed))
    # light tasks (half a CPU): they must fit beside the training workers, whose CPUs Ray Data excludes
    ds = ds.map_batches(join_with_records, batch_size=64, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"tokenized": [ray.put(by_key)]})
    joined_mb = stats.samples * store.num_patches * store.hidden_size * 2 / 2**20
    if joined_mb <= cfg.train.materialize_below_mb:
        # small enough to keep in the object store: epochs then skip re-reading and re-joining, and the
        # per-epoch shuffle happens in each worker's local buffer
        log.info("materialising the joined training data (%.1f MiB of features)", joined_mb)
        ds = ds.materialize()
    return ds, store


def _ray_train_loop(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainJobConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    plan = Plan(**config["plan"])
    shard = ray.train.get_dataset_shard("train")

    def epoch_rows(epoch: int):
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

    restore = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            local = Path(tempfile.mkdtemp(prefix="vitune-restore-"))
            import shutil

            shutil.copytree(d, local, dirs_exist_ok=True)
            restore = local
    run_loop(cfg, plan, rank, world, epoch_rows, report, restore, config["feature_dim"], config["fingerprint"],
             on_metrics)


def _ray_storage(cfg: TrainJobConfig) -> tuple[str, Any]:
    base = storage.join(output_uri(cfg), "ray")
    fs, path = storage.resolve(base)
    if storage.is_remote(base):
        return path, fs
    os.makedirs(path, exist_ok=True)
    return path, None


def run_training(cfg: TrainJobConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run one stage end to end; returns a summary (model folder URI, MLflow run id, metrics, data stats)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if cfg.storage.s3_endpoint_url:
        storage.configure_s3(cfg.storage.s3_endpoint_url)
    if cfg.train.init_from:  # workers get a plain folder URI (runs:/ resolved here, against our tracking)
        folder = resolve_init_from(cfg.train.init_from, resolve_tracking_uri(cfg.tracking, cfg.storage.root))
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": folder})})
    init_ray(cfg.ray)
    world = cfg.train.num_workers
    stats = DataStats()
    ds, store = build_dataset(cfg, stats)
    accum = gradient_accumulation(cfg, world)
    plan = Plan(stats.samples, world, cfg.train.micro_batch_size, accum, cfg.train.epochs, cfg.train.max_steps)
    if plan.total_steps < 1:
        raise ValueError(
            f"{stats.samples} samples give no full optimizer step with global batch {cfg.train.global_batch_size}")
    log.info("stage %s: %d samples (%s), %d workers, accum %d, %d steps/epoch, %d steps",
             cfg.stage, stats.samples, stats.as_dict(), world, accum, plan.steps_per_epoch, plan.total_steps)

    tracker = Tracker(cfg.tracking, cfg.storage.root, run_name=f"{cfg.stage}", parent_run_id=parent_run_id,
                      tags={"vitune.stage": cfg.stage})
    tracker.log_params(cfg.model_dump(mode="json"))
    tracker.log_params({"data_stats": stats.as_dict(), "plan": {"total_steps": plan.total_steps, "accum": accum}})
    tracker.log_text(dump_config(cfg), "config/resolved.yaml")
    tracker.log_text(json.dumps(deepspeed_config(cfg, world), indent=2), "config/deepspeed.json")
    storage.write_text(storage.join(output_uri(cfg), "config.yaml"), dump_config(cfg))

    path, fs = _ray_storage(cfg)
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "plan": plan.__dict__,
            "run_id": tracker.run_id,
            "feature_dim": store.feature_dim,
            "fingerprint": store.fingerprint,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=f"vitune-{cfg.stage}", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        datasets={"train": ds},
    )
    try:
        result = trainer.fit()
    except Exception:
        tracker.finish("FAILED")
        raise
    folder = model_folder_uri(cfg)
    metrics = dict(result.metrics or {})
    tracker.set_tags({"vitune.model.folder": folder})
    _log_model_folder(tracker, folder)
    version = None
    if cfg.stage == "finetune" and cfg.tracking.registered_model and tracker.active:
        version = register_model(tracker, cfg.tracking.registered_model)
    tracker.finish()
    summary = {"stage": cfg.stage, "model_folder": folder, "run_id": tracker.run_id, "metrics": metrics,
               "data": stats.as_dict(), "total_steps": plan.total_steps, "registered_version": version,
               "tracking_uri": tracker.uri}
    storage.write_json(storage.join(output_uri(cfg), "summary.json"), summary)
    return summary


def _log_model_folder(tracker: Tracker, folder: str) -> None:
    if not tracker.active:
        return
    with tempfile.TemporaryDirectory(prefix="vitune-art-") as d:
        storage.download_dir(folder, d)
        tracker.log_artifacts(d, "model")


def register_model(tracker: Tracker, name: str) -> str | None:
    """Register the run's ``model`` artifact folder in the MLflow model registry; returns the version."""
    try:
        from mlflow.exceptions import MlflowException

        client = tracker._client
        try:
            client.create_registered_model(name)
        except MlflowException:
            pass  # already registered
        run = client.get_run(tracker.run_id)
        mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=tracker.run_id)
        log.info("registered model %s version %s", name, mv.version)
        return str(mv.version)
    except Exception as exc:  # noqa: BLE001 - the trained model is saved either way
        log.warning("could not register model %s: %s", name, exc)
        return None
