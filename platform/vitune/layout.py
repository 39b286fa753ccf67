"""Every storage path a job reads or writes, derived from its config here and nowhere else.

Under ``storage.root`` (a local folder or ``s3://bucket/prefix``)::

    data/                        the synthetic set (``vitune demo``): images + captions/instruct/eval.json
    features/<fingerprint id>/   a feature store (``vitune.features.store`` describes its inside; one writer at
                                 a time holds its lease, ``vitune.features.lease``)
    pixels/<fingerprint id>/     a pixel store: the preprocessed tiles a training tower reads
                                 (``features.form=pixels``, ``vitune.features.pixels``)
    train/<stage>/               config.yaml, summary.json, ray/ (Ray Train checkpoints), model/ (the model folder)
    eval/<benchmark>/<name>/     answers, results, report (``vitune.evaluation.run``)
    generate/                    records/<kind>.json, errors/errors.jsonl, summary.json
    llm_cache/, judge_cache/     LLM response caches: instruction generation, the evaluation judge
    mlflow.db                    the embedded MLflow store (a local root and no tracking URI)

A config key overrides a path only where a user must be able to (``features.output``, ``data.features``,
``train.output``, ``eval.output``, ``generate.output``, the caches); unset, the path is the one here. Where a
config names a model folder (``train.init_from``, ``eval.model_folder``), a stage name (``align``) means that
stage's model folder under the same root; the config resolves it when it is loaded (``stage_model``).
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from vitune import storage
from vitune.config import (
    STAGES,
    DataConfig,
    EvalJobConfig,
    FeaturesJobConfig,
    GenerateJobConfig,
    JudgeConfig,
    SyntheticJobConfig,
    TrainJobConfig,
)
from vitune.vision_recipe import VisionRecipe, fingerprint_id, preprocess_stats

MODEL_META_FILE = "vitune_model.json"  # a model folder's description (``vitune.model.folder`` writes the rest)
FEATURE_MANIFEST = "manifest.json"  # written last in a feature store (``vitune.features.store`` writes the rest)
WithFeatures = FeaturesJobConfig | TrainJobConfig  # the jobs that name a feature store


def image_root(data: DataConfig) -> str:
    """Where record images are read from: ``data.image_root``, else the first records file's folder (LLaVA's way)."""
    if data.image_root:
        return data.image_root
    first = data.records[0]
    return posixpath.dirname(first.rstrip("/")) if "://" in first else os.path.dirname(os.path.abspath(first))


def synthetic_data(cfg: SyntheticJobConfig) -> str:
    """Where ``vitune demo`` writes the synthetic set (the tiny preset's records and eval data point here)."""
    return storage.join(cfg.storage.root, "data")


def pixel_fingerprint(cfg: WithFeatures) -> dict[str, Any]:
    """The fingerprint of the pixel store a config names, from its vision config alone (no tower built)."""
    mean, std = preprocess_stats(cfg.model.vision)
    return VisionRecipe.of(cfg.model.vision).pixel_fingerprint(mean, std, cfg.features.pixel_dtype)


def pixel_fingerprint_id(cfg: WithFeatures) -> str:
    """The id of the pixel store a config names (``pixel_fingerprint``)."""
    return fingerprint_id(pixel_fingerprint(cfg))


def _default_features(cfg: WithFeatures, fp_id: str | None) -> str:
    if cfg.store_form == "pixels":  # the pixel store's own folder: never one of a feature store
        return storage.join(cfg.storage.root, "pixels", fp_id or pixel_fingerprint_id(cfg))
    return storage.join(cfg.storage.root, "features", fp_id or VisionRecipe.of(cfg.model.vision).fingerprint_id())


def features_output(cfg: WithFeatures, fp_id: str | None = None) -> str:
    """The store the feature job writes: ``features.output``, else ``data.features``, else by fingerprint
    (``features/<id>``, or ``pixels/<id>`` for the pixel store: ``cfg.store_form``)."""
    return cfg.features.output or cfg.data.features or _default_features(cfg, fp_id)


def features_input(cfg: WithFeatures) -> str:
    """The store training reads: ``data.features``, else ``features.output``, else the same config's default."""
    return cfg.data.features or cfg.features.output or _default_features(cfg, None)


def stage_dir(root: str, stage: str) -> str:
    return storage.join(root, "train", stage)


def stage_model(root: str, ref: str | None) -> str | None:
    """A model reference as a config gives it: a stage name → that stage's model folder; else unchanged."""
    return storage.join(stage_dir(root, ref), "model") if ref in STAGES else ref


def train_output(cfg: TrainJobConfig) -> str:
    """A training stage's folder: ``train.output``, else ``<root>/train/<stage>``."""
    return cfg.train.output or stage_dir(cfg.storage.root, cfg.stage)


def model_folder(cfg: TrainJobConfig) -> str:
    return storage.join(train_output(cfg), "model")


def train_checkpoints(cfg: TrainJobConfig) -> str:
    return storage.join(train_output(cfg), "ray")


def train_summary(cfg: TrainJobConfig) -> str:
    return storage.join(train_output(cfg), "summary.json")


def train_config(cfg: TrainJobConfig) -> str:
    return storage.join(train_output(cfg), "config.yaml")


def eval_output(cfg: EvalJobConfig, model: str | None) -> str:
    """``eval.output``, else ``<root>/eval/<benchmark>/<eval.name or the model folder's name>``."""
    name = cfg.eval.name or (model.rstrip("/").rsplit("/", 1)[-1] if model else "predictions")
    return cfg.eval.output or storage.join(cfg.storage.root, "eval", cfg.eval.benchmark, name)


def generate_output(cfg: GenerateJobConfig) -> str:
    return cfg.generate.output or storage.join(cfg.storage.root, "generate")


def generate_records(out: str, kind: str) -> str:
    return storage.join(out, "records", f"{kind}.json")


def generate_errors(out: str) -> str:
    return storage.join(out, "errors", "errors.jsonl")


def generate_summary(out: str) -> str:
    return storage.join(out, "summary.json")


def llm_cache(cfg: GenerateJobConfig) -> str | None:
    """The instruction generator's response cache (None when caching is off)."""
    g = cfg.generate
    return (g.cache or storage.join(cfg.storage.root, "llm_cache")) if g.use_cache else None


def judge_cache(judge: JudgeConfig, root: str) -> str | None:
    """The evaluation judge's verdict cache (None when caching is off)."""
    return (judge.cache or storage.join(root, "judge_cache")) if judge.use_cache else None


def mlflow_db(root: str) -> str:
    """The embedded MLflow SQLite file: under a local root, else under ``./runs`` (SQLite needs a local disk)."""
    return os.path.join(storage.local_path(root) or os.path.abspath("./runs"), "mlflow.db")


def mlflow_artifacts(root: str) -> str:
    """The artifacts of runs tracked in the embedded store (a tracking server keeps its own)."""
    local = storage.local_path(root)
    return os.path.join(local, "mlflow-artifacts") if local else storage.join(root, "mlflow-artifacts")


def imported_models(root: str) -> str:
    """Where ``train.init_from`` checkpoints of other layouts (llava-hf, official LLaVA, mm_projector.bin) are
    converted to model folders, one sub-folder per source."""
    return storage.join(root, "imported")
