"""The standard VQA answer normalisation and the VQA accuracy, as the TextVQA evaluator LLaVA uses runs them.

Normalisation, in order: lower case; drop ``,`` and ``?``; ``'s`` → `` 's``; newlines and tabs → spaces;
punctuation removed where it touches a space (else replaced by a space); periods not followed by a digit
removed; number words → digits; articles dropped; contraction spellings fixed. The tables (contractions,
number words, articles, punctuation) are data of the metric, kept verbatim in ``vqa_normalize.json`` with
their source.

VQA accuracy of a prediction against n human answers: the mean over the n leave-one-out subsets of
min(1, #matching humans in the subset / 3); with 10 answers, k matches score 0.3, 0.6, 0.9, 1.0 for
k = 1, 2, 3, ≥4.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

TABLES_FILE = "vqa_normalize.json"

# The reference processor's period pattern is written ``(?!<=\d)(\.)(?!\d)``: its first group is a lookahead
# (a typo for a lookbehind) that always passes, so the rule is "a period not followed by a digit"; and it is
# called as ``sub("", text, re.UNICODE)``, which passes 32 as the count. Both quirks are kept.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_MAX = int(re.UNICODE)
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")


@lru_cache(maxsize=1)
def tables() -> dict[str, Any]:
    """The normalisation tables (see ``vqa_normalize.json``)."""
    return json.loads(resources.files("vitune.evaluation").joinpath(TABLES_FILE).read_text("utf-8"))


def _punctuation(text: str) -> str:
    joined_digits = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in tables()["punctuation"]:
        # the test looks at the text as it came in, not as it is being rewritten
        if joined_digits or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX)


def _digits_articles(text: str) -> str:
    t = tables()
    words = [t["numbers"].get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in t["articles"]]
    return " ".join(t["contractions"].get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """An answer in the form the VQA metric compares (see the module docstring)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy in 0..1 of one prediction (both sides normalised)."""
    humans = [normalize_vqa_answer(a) for a in human_answers]
    pred = normalize_vqa_answer(prediction)
    matches = humans.count(pred)
    if not matches:
        return 0.0
    # leaving out a matching human leaves matches - 1 in the subset, leaving out another leaves all of them
    per_subset = [min(1.0, (matches - (h == pred)) / 3.0) for h in humans]
    return sum(per_subset) / len(per_subset)
