"""ScienceQA: the official extraction rule of LLaVA's eval_science_qa.py on a table of edge outputs."""

from __future__ import annotations

import pytest

from vitune.evaluation.scienceqa import extract_answer
from vitune.evaluation.scienceqa_official import extract_answer_official

# (model output, official letter, vitune's lenient letter); None = failed. The official column is what
# eval_science_qa.py's three steps give: the whole text a letter A–E; "X. " at the start (3+ characters);
# "The answer is ([A-Z])." found exactly once (its last "." is any character but a newline).
EDGE_OUTPUTS = [
    ("B", "B", "B"),
    ("B. slippery", "B", "B"),
    ("The answer is C.", "C", "C"),
    ("Lecture: magnets attract.\nThe answer is A.", "A", "A"),
    ("B\n", None, "B"),  # a letter then a newline: not the whole text, no ". "
    ("B\nBecause it is smooth.", None, None),
    ("B.", None, "B"),  # "B." alone: two characters, no ". "
    ("(B)", None, "B"),
    ("The answer is B", None, "B"),  # nothing after the letter for the pattern's last "."
    ("The answer is B. The answer is B.", None, "B"),  # two statements fail, even of one letter
    ("The answer is B. The answer is C.", None, None),
    ("The answer is B. the answer is C.", "B", None),  # the official pattern is case-sensitive
    ("the answer is (B).", None, "B"),
    ("The answer is (B).", None, "B"),  # "(" is not a letter
    ("The answer is AB", "A", None),  # the last "." matches "B"
    (" B", None, "B"),  # no stripping
    ("b", None, None),
    ("", None, None),
    (None, None, None),  # no answer
    ("E", None, None),  # a letter beyond the problem's four options scores as wrong
    ("E. a fifth option", None, None),
]


@pytest.mark.parametrize("text, official, lenient", EDGE_OUTPUTS)
def test_official_rule_on_edge_outputs(text, official, lenient):
    assert extract_answer_official(text, num_choices=4) == official


@pytest.mark.parametrize("text, official, lenient", EDGE_OUTPUTS)
def test_the_lenient_rule_differs_where_the_table_says(text, official, lenient):
    assert extract_answer(text, num_choices=4) == lenient


def test_five_options_accept_e():
    assert extract_answer_official("E", num_choices=5) == "E"
    assert extract_answer_official("The answer is E.", num_choices=5) == "E"
