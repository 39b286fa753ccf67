"""The evaluation job's config (jobs/evaluate.py): the benchmark (one of vitune.catalog's), its data, generation
settings; the judge."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from vitune import catalog
from vitune.config.base import JobConfig, Section, _absolute_or_stage
from vitune.config.generation import EndpointConfig


class JudgeConfig(EndpointConfig):
    """The judge: any OpenAI-compatible chat endpoint, plus how its verdicts are cached and repeated."""

    temperature: float = Field(0.2, ge=0, le=2)  # LLaVA's review temperature
    cache: str | None = None  # verdict cache URI; default: layout's <storage.root>/judge_cache
    use_cache: bool = True
    swap_order: bool = False  # LLaVA-Bench: a second pass with the two answers swapped → position bias
    repeats: int = Field(1, ge=1)  # LLaVA-Bench: judge every question this many times → spread (std) of the score


class EvalConfig(Section):
    benchmark: str = "scienceqa"  # a name in vitune.catalog.BENCHMARKS (an unknown one is refused, naming them)
    model_folder: str | None = None  # model folder URI, runs:/<training run id>, or a stage name (its model folder)
    model_run_id: str | None = None  # the training run to link; default: from runs:/ or the model folder
    data: str | None = None  # benchmark root URI (synthetic: the eval.json URI)
    images: str | None = None  # image root; default: <data>/images/<split> (ScienceQA), <data>/images (LLaVA-Bench)
    output: str | None = None  # default: layout's <storage.root>/eval/<benchmark>/<name>
    name: str | None = None  # default: the model folder's last path component
    predictions: str | None = None  # JSONL {question_id, text}: score these answers instead of generating
    limit: int | None = Field(None, gt=0)  # evaluate only the first N questions
    # ScienceQA
    split: str = "test"
    prompt_format: Literal["CQM-A", "QCM-LEA"] = "CQM-A"  # v1.5's single-letter prompt | the paper's model
    ensemble: bool = False  # ask the judge text-only; where it disagrees with us, let it decide given both
    extraction: Literal["official", "lenient"] = "official"  # answer letters: eval_science_qa.py's rule | vitune's
    judge_prompt: Literal["official", "vitune"] = "official"  # LLaVA-Bench: LLaVA's prompt + rule.json | our own
    # MMBench option extraction: the 2023 OpenCompass rule behind LLaVA-1.5's numbers | today's VLMEvalKit
    mmbench_rule: Literal["opencompass_2023", "vlmevalkit"] = "opencompass_2023"
    # LLaVA-Bench: file names under `data` (None = the layout's official names)
    layout: Literal["in_the_wild", "coco"] = "in_the_wild"
    questions: str | None = None  # also: the LLaVA question file (POPE, MME, TextVQA, GQA) or the MMBench TSV
    context: str | None = None
    references: str | None = None  # also: ground truth (POPE coco/, MME folder, TextVQA val JSON, GQA questions)
    # generation
    template: str | None = None  # conversation template; default: the model folder's
    max_new_tokens: int = Field(1024, gt=0)
    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(8, gt=0)
    num_actors: int | None = Field(None, gt=0)  # None = one per GPU on a cluster, 1–2 locally
    use_gpu: bool | None = None  # None = when the cluster has GPUs

    _model = field_validator("model_folder")(_absolute_or_stage)

    @field_validator("benchmark")
    @classmethod
    def _known_benchmark(cls, v: str) -> str:
        catalog.benchmark(v)  # the table, read when validating: its entries, not a copy of their names
        return v


class EvalJobConfig(JobConfig):
    eval: EvalConfig = Field(default_factory=EvalConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
