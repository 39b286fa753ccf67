"""LLaVA-Bench judged as LLaVA's own scripts judge it: the official system prompt, review rules, score
parsing and summary (the default judge prompt; vitune's own prompt stays an option in ``llava_bench``).

Texts (``llava_bench_rules.json``, verbatim, with their source): the system prompt of
``eval_gpt_review_bench.py`` / ``eval_gpt_review_visual.py`` and the ``rule.json`` rules they read —
``llava_bench_{conv,detail,complex}`` for LLaVA-Bench in the wild, ``{conv,detail,complex}`` for COCO.
The judge's message is ``[Context]`` (captions; COCO adds the boxes after a blank line), ``[Question]``,
the two answers between ``[Assistant 1]`` / ``[End of Assistant 1]`` (the reference is assistant 1) and
``[Assistant 2]`` / ``[End of Assistant 2]``, then ``[System]`` and the rule, each block followed by a blank
line. The official run used ``gpt-4-0314`` at temperature 0.2 with 1024 tokens at most.

Scores: the verdict's first line, commas turned into spaces, split on single spaces; exactly two parts that
parse as numbers are the scores, anything else is unparseable and counts as ``(-1, -1)``, which the
official summary (``summarize_gpt_review.py``) averages in like any score. Relative score per category =
mean(model) / mean(reference) × 100; the summary prints it from means rounded to 3 decimals, then rounded
to 1 decimal, next to both means × 10 (``printed``).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # llava_bench imports this module; a runtime import back would be circular
    from vitune.evaluation.llava_bench import BenchItem

RULES_FILE = "llava_bench_rules.json"
UNPARSEABLE = (-1.0, -1.0)
# vitune's category names → the official short names
SHORT = {"conversation": "conv", "detail": "detail", "complex": "complex"}
RULE_PREFIX = {"in_the_wild": "llava_bench_", "coco": ""}


@lru_cache(maxsize=1)
def official_texts() -> dict[str, Any]:
    """``{source, system, rules: {key: {role, prompt}}}`` from ``llava_bench_rules.json``."""
    return json.loads(resources.files("vitune.evaluation").joinpath(RULES_FILE).read_text("utf-8"))


def rule_key(category: str, layout: str) -> str:
    """The ``rule.json`` key LLaVA's scripts read for a vitune category and layout."""
    if layout not in RULE_PREFIX:
        raise ValueError(f"unknown LLaVA-Bench layout {layout!r}; valid: {', '.join(RULE_PREFIX)}")
    return RULE_PREFIX[layout] + SHORT[category]


def review_content(context: str, question: str, answer1: str, answer2: str, rule: dict[str, str]) -> str:
    """The judge's user message, block by block as the official scripts build it."""
    role = rule["role"]
    return (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n[System]\n{rule['prompt']}\n\n")


def review_messages(item: BenchItem, answer1: str, answer2: str, layout: str) -> list[dict[str, str]]:
    """System + user messages for one review; ``item.context`` is already in the official form."""
    texts = official_texts()
    rule = texts["rules"][rule_key(item.category, layout)]
    return [{"role": "system", "content": texts["system"]},
            {"role": "user", "content": review_content(item.context, item.question, answer1, answer2, rule)}]


def parse_scores(review: str | None) -> tuple[float, float] | None:
    """The two scores of a verdict by the official rule; None when unparseable (or no verdict)."""
    if review is None:
        return None
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


def summarize(verdicts: Sequence[tuple[str, tuple[float, float] | None]]) -> dict[str, dict[str, Any]]:
    """``[(category, (reference score, model score) or None when unparseable)]`` → per category and ``all``:
    n, unparseable, the two means (unparseable verdicts averaged in as (-1, -1)), the relative score and
    the official printed line."""
    groups: dict[str, list[tuple[float, float] | None]] = {}
    for category, pair in verdicts:
        groups.setdefault(category, []).append(pair)
        groups.setdefault("all", []).append(pair)
    out = {}
    for name, given in sorted(groups.items()):
        pairs = [p if p is not None else UNPARSEABLE for p in given]
        ref = statistics.fmean(p[0] for p in pairs)
        ours = statistics.fmean(p[1] for p in pairs)
        r_ref, r_ours = round(ref, 3), round(ours, 3)
        out[name] = {"n": len(pairs), "unparseable": sum(p is None for p in given), "reference": ref,
                     "ours": ours, "relative": 100.0 * ours / ref if ref else None,
                     "printed": [round(r_ours / r_ref * 100, 1) if r_ref else None, round(r_ref * 10, 1),
                                 round(r_ours * 10, 1)]}
    return out


@dataclass(frozen=True)
class JudgeStyle:
    """How a judge is asked and read: ``llava_bench`` runs its passes through one of these."""

    name: str  # "official" | "vitune", named in the report
    messages: Callable[[BenchItem, str, str], list[dict[str, str]]]  # (item, answer 1, answer 2)
    parse: Callable[[str | None], tuple[float, float] | None]
    unparseable_as: tuple[float, float] | None  # averaged in as this pair; None = left out of the means


def official_style(layout: str) -> JudgeStyle:
    """LLaVA's prompt and parsing for ``layout``; unparseable verdicts count as (-1, -1)."""
    rule_key("conversation", layout)  # fail early on an unknown layout
    return JudgeStyle("official", lambda item, a1, a2: review_messages(item, a1, a2, layout), parse_scores,
                      UNPARSEABLE)
