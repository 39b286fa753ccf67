"""The pipeline as one job: features → align → finetune → eval, each step skipped when its output exists
with a matching config, so a re-run after a failure picks up where it stopped.

All steps read one preset (``--config``) with the same overrides; the stage blocks of the preset give each
training step its records and hyperparameters (``step_configs``, which ``vitune submit`` also validates
with). One MLflow parent run holds every step's own run, the features step's included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from vitune import layout, storage
from vitune.config import (
    ConfigError,
    EvalJobConfig,
    FeaturesJobConfig,
    JobConfig,
    TrainJobConfig,
    dump_config,
    load_config,
)
from vitune.runtime import connect
from vitune.tracking import Tracker

log = logging.getLogger(__name__)

STEPS = ("features", "align", "finetune", "eval")
STEPS_KEY = "steps"  # `steps=features,align` on the command line picks the steps


def check_steps(steps: Sequence[str]) -> list[str]:
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"{STEPS_KEY}: unknown pipeline steps {unknown}; valid steps: {', '.join(STEPS)}")
    return list(steps)


def split_steps(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(steps, overrides)`` from a pipeline's command-line arguments: ``steps=a,b`` apart from the rest."""
    steps, rest = list(STEPS), []
    for item in args:
        if item.startswith(f"{STEPS_KEY}="):
            steps = [s for s in item.split("=", 1)[1].split(",") if s]
        else:
            rest.append(item)
    return check_steps(steps), rest


def step_configs(config_path: str, overrides: Sequence[str] = (), steps: Sequence[str] = STEPS) -> dict[str, Any]:
    """Each step's config: the preset + overrides as that step's job loads them (training: its stage block)."""
    out: dict[str, Any] = {}
    for step in steps:
        if step == "features":
            out[step] = load_config(FeaturesJobConfig, config_path, overrides)
        elif step == "eval":
            out[step] = load_config(EvalJobConfig, config_path, overrides)
        else:
            out[step] = load_config(TrainJobConfig, config_path, [*overrides, f"stage={step}"])
    return out


def _train_done(cfg: TrainJobConfig) -> dict | None:
    """The earlier summary when this stage already finished with exactly this resolved config."""
    summary_uri, config_uri = layout.train_summary(cfg), layout.train_config(cfg)
    if not (storage.exists(summary_uri) and storage.exists(config_uri)):
        return None
    # where Ray runs and where runs are tracked do not change what a stage produces
    ignore = {"ray", "tracking"}
    before = {k: v for k, v in (yaml.safe_load(storage.read_text(config_uri)) or {}).items() if k not in ignore}
    now = {k: v for k, v in yaml.safe_load(dump_config(cfg)).items() if k not in ignore}
    return storage.read_json(summary_uri) if before == now else None


def run_step(step: str, cfg: Any, parent_run_id: str | None) -> tuple[dict[str, Any], bool]:
    """Run one step as a child run of ``parent_run_id``; returns ``(its result, whether it was skipped)``."""
    # deferred: `vitune submit` reads STEPS and step_configs here without loading Ray Train, torch or DeepSpeed
    if step == "features":
        from vitune.features.run import run_features

        out = run_features(cfg, parent_run_id=parent_run_id)
        return out, out["computed_shards"] == 0
    if step == "eval":
        # deferred: each step loads only its own stack (Ray Train + DeepSpeed, or the eval actors)
        from vitune.evaluation.run import run_evaluation

        return run_evaluation(cfg, parent_run_id=parent_run_id), False
    # deferred: each step loads only its own stack (Ray Train + DeepSpeed, or the eval actors)
    from vitune.train.driver import run_training

    done = _train_done(cfg)
    return (done, True) if done is not None else (run_training(cfg, parent_run_id=parent_run_id), False)


def run_pipeline(config_path: str, overrides: Sequence[str] = (), steps: Sequence[str] = STEPS,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``steps`` in order; returns what each did (or that it was skipped) and where its output is."""
    steps = check_steps(steps)
    say = progress or log.info
    configs = step_configs(config_path, overrides, steps)
    base = load_config(JobConfig, config_path, overrides)  # where the pipeline's own run goes
    connect(base)
    parent = Tracker(base.tracking, base.storage.root, run_name="pipeline", tags={"vitune.pipeline": "1"})
    results: dict[str, Any] = {"mlflow_parent_run_id": parent.run_id, "tracking_uri": parent.uri, "steps": []}
    try:
        for step in steps:
            t0 = time.perf_counter()
            results[step], skipped = run_step(step, configs[step], parent.run_id)
            seconds = time.perf_counter() - t0
            results["steps"].append({"step": step, "skipped": skipped, "seconds": round(seconds, 1)})
            say(f"{step}: {'already done, skipped' if skipped else 'done'} in {seconds:.1f}s")
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return results
