"""The one shape of every job entrypoint: parse → load the config → run → print a JSON summary.

``jobs/<name>.py`` is ``sys.exit(main("<name>"))``: ``--config PRESET [key.sub=value ...]`` (a preset name
or a YAML path/URI), logging to stderr, the run through the library (which sets up storage and Ray the
same way for every job, ``vitune.config.connect``), and one JSON line on stdout. ``JOBS`` is the table of
jobs: their config class and run function (``vitune submit`` validates a submission with the same classes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vitune.config import EvalJobConfig, FeaturesJobConfig, GenerateJobConfig, JobConfig, TrainJobConfig, load_config
from vitune.evaluation.report import metrics
from vitune.pipeline import split_steps


def _evaluate_summary(report: dict[str, Any]) -> dict[str, Any]:
    return {"benchmark": report["benchmark"], "output": report["output"], "run_id": report["mlflow_run_id"],
            "metrics": metrics(report)}


def _train_summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("stage", "model_folder", "run_id", "total_steps")}


def _pipeline_summary(results: dict[str, Any]) -> dict[str, Any]:
    return {"steps": results["steps"], "mlflow_parent_run_id": results["mlflow_parent_run_id"]}


@dataclass(frozen=True)
class Job:
    """A job: the config it loads (None for the pipeline: one per step) and ``module:function`` that runs it."""

    config: type[JobConfig] | None
    run: str
    summary: Callable[[Any], dict[str, Any]] = dict

    def __call__(self, config: str, args: Sequence[str]) -> Any:
        # imported when the job runs: each job loads only its own stack (Ray Train and DeepSpeed, the tower, ...)
        module, name = self.run.split(":")
        run = getattr(importlib.import_module(module), name)
        if self.config is None:
            steps, overrides = split_steps(args)
            return run(config, overrides, steps)
        return run(load_config(self.config, config, args))


JOBS: dict[str, Job] = {
    "extract_features": Job(FeaturesJobConfig, "vitune.features.run:run_features"),
    "train": Job(TrainJobConfig, "vitune.train.driver:run_training", _train_summary),
    "evaluate": Job(EvalJobConfig, "vitune.evaluation.run:run_evaluation", _evaluate_summary),
    "generate_instructions": Job(GenerateJobConfig, "vitune.instruct.run:run_generate"),
    "pipeline": Job(None, "vitune.pipeline:run_pipeline", _pipeline_summary),
}


def parse_args(job: str, description: str | None, argv: Sequence[str] | None,
               prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog or f"jobs/{job}.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a preset name (tiny, llava-v1.5-7b, ...) or a YAML path/URI")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides" + (
        "; steps=a,b picks the pipeline's steps" if job == "pipeline" else ""))
    return p.parse_args(argv)


def main(job: str, argv: Sequence[str] | None = None, description: str | None = None,
         prog: str | None = None) -> int:
    """Run job ``job`` with command-line ``argv``; prints its summary as one JSON line, returns the exit code."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; valid jobs: {', '.join(JOBS)}")
    args = parse_args(job, description, argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    spec = JOBS[job]
    result = spec(args.config, args.overrides)
    sys.stdout.write(json.dumps(spec.summary(result), default=str) + "\n")
    return 0
