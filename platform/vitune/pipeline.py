"""The pipeline as one job: features → align → finetune → eval, each step skipped when its output exists
with a matching config, so a re-run after a failure picks up where it stopped.

All steps read one preset (``--config``) with the same overrides; the stage blocks of the preset give each
training step its records and hyperparameters. One MLflow parent run holds the steps' runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from vitune import storage
from vitune.config import (
    EvalJobConfig,
    FeaturesJobConfig,
    TrainJobConfig,
    dump_config,
    load_config,
)
from vitune.tracking import Tracker

log = logging.getLogger(__name__)

STEPS = ("features", "align", "finetune", "eval")


def _train_done(cfg: TrainJobConfig) -> dict | None:
    """The earlier summary when this stage already finished with exactly this resolved config."""
    import yaml

    from vitune.train.worker import output_uri

    out = output_uri(cfg)
    summary_uri, config_uri = storage.join(out, "summary.json"), storage.join(out, "config.yaml")
    if not (storage.exists(summary_uri) and storage.exists(config_uri)):
        return None
    # where Ray runs and where runs are tracked do not change what a stage produces
    ignore = {"ray", "tracking"}
    before = {k: v for k, v in (yaml.safe_load(storage.read_text(config_uri)) or {}).items() if k not in ignore}
    now = {k: v for k, v in yaml.safe_load(dump_config(cfg)).items() if k not in ignore}
    return storage.read_json(summary_uri) if before == now else None


def run_pipeline(config_path: str, overrides: Sequence[str] = (), steps: Sequence[str] = STEPS,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``steps`` in order; returns what each did (or that it was skipped) and where its output is."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown pipeline steps {unknown}; valid steps: {', '.join(STEPS)}")
    say = progress or log.info
    base = load_config(FeaturesJobConfig, config_path, overrides)
    if base.storage.s3_endpoint_url:
        storage.configure_s3(base.storage.s3_endpoint_url)
    parent = Tracker(base.tracking, base.storage.root, run_name="pipeline", tags={"vitune.pipeline": "1"})
    results: dict[str, Any] = {"mlflow_parent_run_id": parent.run_id, "tracking_uri": parent.uri}
    try:
        for step in steps:
            t0 = time.perf_counter()
            if step == "features":
                from vitune.features.extract import extract_features

                out = extract_features(base)
                skipped = out["computed_shards"] == 0
                results["features"] = out
            elif step in ("align", "finetune"):
                from vitune.train.driver import run_training

                cfg = load_config(TrainJobConfig, config_path, [*overrides, f"stage={step}"])
                done = _train_done(cfg)
                skipped = done is not None
                results[step] = done or run_training(cfg, parent_run_id=parent.run_id)
            else:
                from vitune.evaluation.run import run_evaluation

                cfg = load_config(EvalJobConfig, config_path, overrides)
                results["eval"] = run_evaluation(cfg, parent_run_id=parent.run_id)
                skipped = False
            results.setdefault("steps", []).append(
                {"step": step, "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1)})
            say(f"{step}: {'already done, skipped' if skipped else 'done'} in {time.perf_counter() - t0:.1f}s")
    except Exception:
        parent.finish("FAILED")
        raise
    parent.finish()
    return results
