"""What vitune runs, by name: the table of jobs and the table of benchmarks, each entry in one place.

Every place that knows a job or a benchmark reads these tables: the config validates ``eval.benchmark``
against ``BENCHMARKS``; ``evaluation/run.py`` dispatches on it and ``evaluation/report.py`` renders and
flattens with it; ``cli/jobs.py`` (``jobs/<name>.py``), ``cli/main.py`` (``vitune <command>``),
``cli/submit.py`` and ``pipeline.py`` read ``JOBS``. Adding a benchmark or a job is one entry here plus
its own module.

The entries hold ``module:attribute`` strings, imported by ``load`` only when the thing runs: this module
imports nothing of vitune, so the config (and ``vitune submit``, which validates with it) reads the
tables without torch, Ray Train or any benchmark's code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


def load(path: str) -> Any:
    """The object ``module:attribute`` names, its module imported now."""
    module, sep, attribute = path.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"{path!r} is not of the form module:attribute")
    return getattr(importlib.import_module(module), attribute)


# --- jobs: jobs/<name>.py, `vitune <command>`, `vitune submit <name>` ---------------------------------


@dataclass(frozen=True)
class Job:
    """One job: its local subcommand, the config class it loads and the function that runs it."""

    command: str  # `vitune <command>` runs it locally
    help: str  # one line: `vitune --help` and the subcommand's description
    # `module:Class` of its config; None for the pipeline, which loads one config per step (vitune.pipeline)
    config: str | None
    # `module:function`: (config) -> result; (config path, overrides, steps) -> result for a config of None
    run: str
    summary: str | None = None  # `module:function`: result -> the JSON line printed; None = the result itself
    example: str = ""  # what the help's example adds after `--config tiny`


JOBS: dict[str, Job] = {
    "extract_features": Job("features", "images → the fingerprinted feature store (Ray Data)",
                            "vitune.config:FeaturesJobConfig", "vitune.features.run:run_features"),
    "train": Job("train", "train one stage (stage=align|finetune) with Ray Train × DeepSpeed",
                 "vitune.config:TrainJobConfig", "vitune.train.driver:run_training",
                 "vitune.train.driver:job_summary", example="stage=align"),
    "evaluate": Job("evaluate", "evaluate a model folder (eval.benchmark=...)",
                    "vitune.config:EvalJobConfig", "vitune.evaluation.run:run_evaluation",
                    "vitune.evaluation.run:job_summary"),
    "generate_instructions": Job("generate", "generate instruction data through an OpenAI-compatible LLM",
                                 "vitune.config:GenerateJobConfig", "vitune.instruct.run:run_generate"),
    "pipeline": Job("pipeline", "features → align → finetune → eval, skipping finished steps",
                    None, "vitune.pipeline:run_pipeline", "vitune.pipeline:job_summary"),
}


def job(name: str) -> Job:
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; valid jobs: {', '.join(JOBS)}")
    return JOBS[name]


# --- benchmarks: eval.benchmark=<name> ---------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: where its runner, report section, metrics and chart live (``module:function``).

    - ``run(cfg: EvalJobConfig, out: str, answer_fn: AnswerFn, judge: Judge | None)`` → ``{"result": ...,
      "inference": summary or None}``; ``answer_fn`` turns requests into answer texts by request id (batch
      inference, or ``eval.predictions``), see ``vitune.evaluation.llava_format.AnswerFn``
    - ``markdown(result)`` → the report's Markdown section; ``metrics(result)`` → flat numbers for MLflow
    - ``chart(result)`` → ``(what is plotted, score per category, chance per category)``
    """

    run: str
    markdown: str
    metrics: str
    chart: str | None = None  # None: the metrics, plotted as "score"
    judge: str | None = None  # "always", or the eval.* switch that asks for the judge ("ensemble"); None = never
    # the results table (vitune.evaluation.results_table): rows under LLaVA-1.5's published names and units, and
    # the rules that made them (None: the metrics as they are; no rules)
    published: str | None = None
    rules: str | None = None

    def wants_judge(self, ev: Any) -> bool:
        """Whether this benchmark, with these ``eval.*`` settings, is judged by an LLM."""
        return self.judge == "always" or (self.judge is not None and bool(getattr(ev, self.judge)))


_EVAL = "vitune.evaluation"
_TABLE = f"{_EVAL}.results_table"


def _suite(name: str, rules: bool = False) -> Benchmark:
    """A LLaVA-1.5 suite benchmark: LLaVA's question file → answers → the module's scorer."""
    module = f"{_EVAL}.{name}"
    return Benchmark(f"{module}:run_{name}", f"{module}:markdown", f"{module}:metrics",
                     published=f"{_TABLE}:{name}_rows", rules=f"{_TABLE}:{name}_rule" if rules else None)


def _own(name: str, judge: str | None = None, rules: bool = True) -> Benchmark:
    """A benchmark with its own runner, chart and (maybe) judge."""
    module = f"{_EVAL}.{name}"
    return Benchmark(f"{module}:run_{name}", f"{module}:markdown", f"{module}:metrics", f"{module}:chart",
                     judge=judge, published=f"{_TABLE}:{name}_rows", rules=f"{_TABLE}:{name}_rule" if rules else None)


BENCHMARKS: dict[str, Benchmark] = {
    "scienceqa": _own("scienceqa", judge="ensemble"),
    "llava_bench": _own("llava_bench", judge="always"),
    "synthetic": _own("synthetic", rules=False),
    "pope": _suite("pope"),
    "mme": _suite("mme"),
    "textvqa": _suite("textvqa"),
    "gqa": _suite("gqa"),
    "mmbench": _suite("mmbench", rules=True),
    "vqav2": _suite("vqav2"),
}


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
