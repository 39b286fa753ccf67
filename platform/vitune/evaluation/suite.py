"""The LLaVA-1.5 benchmark suite by name: each benchmark's runner, Markdown section and MLflow metrics.

``evaluation/run.py`` and ``report.py`` look benchmarks up here, so a new one is one entry. A runner takes
the job config, the output URI and an ``AnswerFn`` (requests → answer texts by request id, inference
summary) and returns ``{"result": ..., "inference": ...}`` like the other benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vitune.config import EvalJobConfig
from vitune.evaluation import gqa, mmbench, mme, pope, textvqa, vqav2
from vitune.evaluation.llava_format import AnswerFn


@dataclass(frozen=True)
class SuiteBenchmark:
    run: Callable[[EvalJobConfig, str, AnswerFn], dict[str, Any]]
    markdown: Callable[[Mapping[str, Any]], str]
    metrics: Callable[[Mapping[str, Any]], dict[str, float]]
    prompt: str  # what the model is asked, for the README and the report


_SHORT = "the question, then \"Answer the question using a single word or phrase.\""
BENCHMARKS: dict[str, SuiteBenchmark] = {
    "pope": SuiteBenchmark(pope.run_pope, pope.markdown, pope.metrics, _SHORT),
    "mme": SuiteBenchmark(mme.run_mme, mme.markdown, mme.metrics, _SHORT),
    "textvqa": SuiteBenchmark(textvqa.run_textvqa, textvqa.markdown, textvqa.metrics,
                              "the question, \"Reference OCR token: <tokens>\", then the short-answer line"),
    "gqa": SuiteBenchmark(gqa.run_gqa, gqa.markdown, gqa.metrics, _SHORT),
    "mmbench": SuiteBenchmark(mmbench.run_mmbench, mmbench.markdown, mmbench.metrics,
                              "hint, question, \"X. option\" lines, then \"Answer with the option's letter "
                              "from the given choices directly.\""),
    "vqav2": SuiteBenchmark(vqav2.run_vqav2, vqav2.markdown, vqav2.metrics, _SHORT),
}


def get(name: str) -> SuiteBenchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown LLaVA-1.5 suite benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
