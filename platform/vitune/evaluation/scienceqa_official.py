"""ScienceQA answer extraction by the official rule of LLaVA's ``eval_science_qa.py`` (the default rule).

In order, on the answer text exactly as given (no stripping, case-sensitive):

1. the whole text is one of the letters A–E → that letter;
2. it is at least three characters, its first is one of A–E and the next two are ``". "`` → the first;
3. the pattern ``The answer is ([A-Z]).`` (its last ``.`` matches any character but a newline) occurs
   exactly once → its letter; zero or several occurrences (even of one letter) fail.

A letter beyond the problem's options scores as wrong, like a failure; a missing answer fails. So ``B\\n``,
``B.`` alone, ``(B)``, a trailing ``The answer is B`` with nothing after it, and two ``The answer is``
statements all fail here, where vitune's lenient rule (``scienceqa.extract_answer``) accepts the first four
and a repeated single letter.
"""

from __future__ import annotations

import re

OPTIONS = ("A", "B", "C", "D", "E")
NAME = "official"  # the rule's name in reports; the other one is "lenient"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def extract_answer_official(text: str | None, num_choices: int = len(OPTIONS)) -> str | None:
    """The answer letter by the official rule, or None (failed, or not one of the problem's options)."""
    if text is None:
        return None
    if text in OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    if letter is None or letter not in OPTIONS[:num_choices]:
        return None
    return letter
