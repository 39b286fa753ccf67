"""MMBench option extraction, by name: the rule behind LLaVA-1.5's published numbers and today's VLMEvalKit rule.

Both are the rule-based ("prefetch") stage of MMBench's matcher; the ChatGPT matching stage that follows it
in the official evaluators is not run here, so an answer the rule cannot read is wrong, and counted.

``opencompass_2023`` (the default) — ``can_infer`` of open-compass/opencompass ``tools/eval_mmbench.py``
(commit 6ca2be66, Aug 2023), the evaluation behind the MMBench server that scored LLaVA-1.5's submission
(LLaVA ``scripts/convert_mmbench_for_submission.py`` writes the spreadsheet it took):

1. the answer split on whitespace; if exactly one of the words is a bare letter A–E, that letter — unless
   the word ``A`` is among more than three words (then "A" is taken for the article and this step skipped);
2. else, for each wrapping in order ``X.``, ``X,``, ``X:``, ``X)``, ``X).``, ``(X)``, ``(X).``, ``:X``,
   ``:X,``, ``:X.``, ``:X)``, ``:X).``: the first under which exactly one letter A–E occurs as a word gives it
   (so an answer naming several options in one form can still be read in another);
3. else the one option whose text (lower case) occurs in the lower-cased answer, when exactly one does.

Letters run to E whatever the question's options are, so a bare "E" on a four-option question is read as E
(and is wrong).

``vlmevalkit`` — ``can_infer`` of open-compass/VLMEvalKit ``vlmeval/utils/matching_util.py`` (commit
e8e78f05, 2026), the rule vitune followed before:

1. an answer holding "Failed to obtain answer via API" skips to step 5; one holding a refusal phrase of
   ``REFUSALS`` is "Z" (no option);
2. the characters ``.()[],:;!*#{}`` turned into spaces, the answer split on whitespace; if exactly one
   word is one of the question's option letters and it is among the last five words, that letter;
3. else, if no word is an option letter but one is "Z", "Z";
4. else "answer is X" / "correct answer is X" (any case, ``*`` allowed around X, X in A–D) → X when it is
   an option;
5. else, unless the answer is longer than twice the options' texts together, the one option whose text
   occurs in the lower-cased answer.

The prediction each rule reads is the one the official spreadsheet round trip leaves (``as_submitted``):
pandas reads an empty cell, and a cell holding one of its NaN spellings ("None", "NA", "nan", ...), as NaN,
which the evaluators turn into the string "nan".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

LETTERS_2023 = "ABCDE"
_WRAPPINGS_2023 = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                   (":", ","), (":", "."), (":", ")"), (":", ")."))
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILURE = "Failed to obtain answer via API"
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
# the strings pandas reads as NaN by default (read_table and read_excel alike)
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def as_submitted(text: str | None) -> str:
    """The prediction as the official evaluators read it back from the submission spreadsheet."""
    return "nan" if text is None or text in PANDAS_NA else text


def _text_match(answer: str, options: Mapping[str, str]) -> str | None:
    low = answer.lower()
    found = [c for c, o in options.items() if str(o).lower() in low]
    return found[0] if len(found) == 1 else None


def extract_opencompass_2023(answer: str, options: Mapping[str, str]) -> str | None:
    """The letter by OpenCompass' 2023 rule (see the module docstring), or None."""
    words = [w.strip() for w in answer.split()]
    if _API_FAILURE not in answer:
        bare = [c for c in LETTERS_2023 if c in words]
        if len(bare) == 1 and not ("A" in words and len(words) > 3):
            return bare[0]
        for prefix, suffix in _WRAPPINGS_2023:
            hits = [c for c in LETTERS_2023 if f"{prefix}{c}{suffix}" in words]
            if len(hits) == 1:
                return hits[0]
    return _text_match(answer, options)


def extract_vlmevalkit(answer: str, options: Mapping[str, str]) -> str | None:
    """The letter (or "Z" for no option) by today's VLMEvalKit rule (see the module docstring), or None."""
    if _API_FAILURE not in answer:
        if any(r in answer for r in REFUSALS):
            return "Z"
        words = answer.translate(_SEPARATORS).split()
        named = [c for c in options if c in words]
        if len(named) == 1 and words.index(named[0]) > len(words) - 5:
            return named[0]
        if not named and "Z" in words:
            return "Z"
        m = _ANSWER_IS.search(answer)
        if m and m.group(1).upper() in options:
            return m.group(1).upper()
    if len(answer) > 2 * sum(len(str(o)) for o in options.values()):
        return None
    return _text_match(answer, options)


RULES: dict[str, Callable[[str, Mapping[str, str]], str | None]] = {
    "opencompass_2023": extract_opencompass_2023,
    "vlmevalkit": extract_vlmevalkit,
}
DEFAULT_RULE = "opencompass_2023"  # the rule LLaVA-1.5's published MMBench numbers came through


def get(name: str) -> Callable[[str, Mapping[str, str]], str | None]:
    if name not in RULES:
        raise ValueError(f"unknown MMBench extraction rule {name!r}; valid: {', '.join(RULES)}")
    return RULES[name]
