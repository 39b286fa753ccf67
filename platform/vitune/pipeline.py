"""The pipeline as one job: features → align → finetune → eval, each step skipped when its output exists
with a matching config, so a re-run after a failure picks up where it stopped.

Each step runs a job of ``vitune.catalog.JOBS`` (``PIPELINE``). All steps read one preset (``--config``) with
the same overrides; the stage blocks of the preset give each training step its records and hyperparameters
(``step_configs``, which ``vitune submit`` also validates with). One MLflow parent run holds every step's
own run, the features step's included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from vitune import catalog, layout, storage
from vitune.config import ConfigError, JobConfig, TrainJobConfig, dump_config, load_config
from vitune.runtime import connect
from vitune.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """A step of the pipeline: the job it runs (its name in ``vitune.catalog.JOBS``) and what it adds to the
    pipeline's overrides."""

    job: str
    overrides: tuple[str, ...] = ()


PIPELINE: dict[str, Step] = {
    "features": Step("extract_features"),
    "align": Step("train", ("stage=align",)),
    "finetune": Step("train", ("stage=finetune",)),
    "eval": Step("evaluate"),
}
STEPS = tuple(PIPELINE)
STORE_JOBS = ("extract_features", "train")  # the jobs whose config names the store's form
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


def _load_step(step: str, config_path: str, overrides: Sequence[str]) -> Any:
    spec = PIPELINE[step]
    config_class = catalog.load(catalog.job(spec.job).config)  # vitune.config's classes: no job stack
    return load_config(config_class, config_path, [*overrides, *spec.overrides])


def pipeline_store_form(config_path: str, overrides: Sequence[str] = ()) -> str | None:
    """``pixels`` when a training stage of the preset tunes the vision tower and ``features.form`` is not set:
    the pipeline's one store is then the pixel store, and every stage reads it (a frozen tower runs in the step,
    the same features as the feature store's); None = each config's own pick."""
    stages = [_load_step(step, config_path, overrides) for step in STEPS
              if PIPELINE[step].job == "train"]
    if any(c.features.form for c in stages) or not any(c.tower_trains for c in stages):
        return None
    return "pixels"


def step_configs(config_path: str, overrides: Sequence[str] = (), steps: Sequence[str] = STEPS) -> dict[str, Any]:
    """Each step's config: the preset + overrides as that step's job loads them (training: its stage block).
    A preset that tunes the tower in a stage gets ``features.form=pixels`` throughout (``pipeline_store_form``)."""
    form = pipeline_store_form(config_path, overrides)
    extra = [f"features.form={form}"] if form is not None else []
    if form is not None:
        log.info("a stage tunes the vision tower: the pipeline's store is the pixel store (features.form=%s)", form)
    return {step: _load_step(step, config_path, [*overrides, *extra] if PIPELINE[step].job in STORE_JOBS
                             else overrides) for step in steps}


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
    job = PIPELINE[step].job
    if isinstance(cfg, TrainJobConfig):
        done = _train_done(cfg)
        if done is not None:
            return done, True
    # imported here: `vitune submit` reads the steps and step_configs without loading Ray Train, torch or
    # DeepSpeed, and each step loads only its own stack (Ray Train + DeepSpeed, the tower, or the eval actors)
    out = catalog.load(catalog.job(job).run)(cfg, parent_run_id=parent_run_id)
    return out, job == "extract_features" and out["computed_shards"] == 0  # a complete store: nothing computed


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


def job_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The line ``jobs/pipeline.py`` prints: what each step did and the parent run."""
    return {"steps": results["steps"], "mlflow_parent_run_id": results["mlflow_parent_run_id"]}
