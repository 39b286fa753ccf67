"""Answer extraction and scoring rules of the benchmarks: ScienceQA letters, judge score lines, categories."""

from __future__ import annotations

import pytest

from vitune.evaluation.llava_bench import format_context, parse_scores, relative_scores
from vitune.evaluation.scienceqa import Problem, build_prompt, extract_answer, score
from vitune.evaluation.synthetic import normalize_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        # a bare letter
        ("B", "B"),
        ("  C\n", "C"),
        ("B.", "B"),
        ("(D)", "D"),
        # an "X. " prefix
        ("A. shiny", "A"),
        ("E. the last option", "E"),
        # "The answer is X."
        ("The answer is C.", "C"),
        ("Lecture: magnets attract.\nSolution: look at the poles. The answer is A.", "A"),
        ("the answer is (B).", "B"),
        ("The answer is B. As said, the answer is B.", "B"),  # one letter stated twice
    ],
)
def test_accepted_forms(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "I think it is the first one.",
        "b",  # lower case is not a letter option
        "A.shiny",  # no space after the period: neither a bare letter nor a prefix
        "The answer is A. No wait, the answer is B.",  # two different letters
        "The answer is Apple.",
        "AB",
    ],
)
def test_failed_forms(text):
    assert extract_answer(text) is None


def test_letter_beyond_the_options_fails():
    assert extract_answer("D", num_choices=3) is None
    assert extract_answer("The answer is C.", num_choices=3) == "C"


def _problem(pid, answer=0, hint="", image=None, subject="natural science", grade="grade3", n=3):
    return Problem(pid=pid, question=f"q{pid}?", choices=tuple(f"c{i}" for i in range(n)), answer=answer, hint=hint,
                   image=image, subject=subject, grade=grade)


def test_categories_follow_the_paper_table():
    assert _problem("1", hint="h", image="image.png").categories() == ["NAT", "TXT", "IMG", "G1-6"]
    assert _problem("2", subject="social science", grade="grade7").categories() == ["SOC", "NO", "G7-12"]
    assert _problem("3", subject="language science", hint="h", grade="grade12").categories() == \
        ["LAN", "TXT", "G7-12"]


def test_score_counts_failed_and_missing():
    problems = [_problem("1", answer=0), _problem("2", answer=1), _problem("3", answer=2)]
    tally, rows = score(problems, {"1": "A", "2": "banana"})
    assert (tally["correct"], tally["failed_extraction"], tally["missing"]) == (1, 2, 1)
    assert tally["accuracy"] == pytest.approx(100 / 3)
    assert [r["parsed"] for r in rows] == ["A", None, None]


def test_prompt_formats():
    p = _problem("9", hint="A hint.", image="image.png")
    assert build_prompt(p, "CQM-A") == ("Context: A hint.\nq9?\nA. c0\nB. c1\nC. c2\n"
                                        "Answer with the option's letter from the given choices directly.")
    assert build_prompt(_problem("8"), "CQM-A").startswith("q8?\nA. c0")
    assert build_prompt(_problem("8"), "QCM-LEA") == "q8?\nContext: N/A\nOptions: (A) c0 (B) c1 (C) c2"
    with pytest.raises(ValueError, match="valid: CQM-A, QCM-LEA"):
        build_prompt(p, "XYZ")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8 6\nAssistant 1 is more detailed.", (8.0, 6.0)),
        ("8, 6", (8.0, 6.0)),
        ("\n  7,5  \nreasons", (7.0, 5.0)),
        ("(9, 4)", (9.0, 4.0)),
        ("8.5 7", (8.5, 7.0)),
        ("8/10 6/10", (8.0, 6.0)),
    ],
)
def test_judge_scores_parsed(text, expected):
    assert parse_scores(text) == expected


@pytest.mark.parametrize("text", [None, "", "Assistant 1: 8, Assistant 2: 6", "8", "8 6 4", "11 3", "0 5",
                                  "I cannot judge this.\n8 6"])
def test_judge_scores_unparseable(text):
    assert parse_scores(text) is None


def test_relative_score_is_ratio_of_means():
    rel = relative_scores([("conversation", 8, 6), ("conversation", 10, 9), ("detail", 5, 5)])
    assert rel["conversation"]["relative"] == pytest.approx(100 * 7.5 / 9)
    assert rel["detail"]["relative"] == pytest.approx(100.0)
    assert rel["complex"] == {"n": 0, "reference": None, "ours": None, "relative": None}
    assert rel["all"]["relative"] == pytest.approx(100 * (20 / 3) / (23 / 3))


def test_context_formats():
    assert format_context({"caption": "A cat."}) == "A cat."
    coco = {"captions": ["A cat.", "A pet."], "instances": [{"category": "cat", "bbox": [0.1, 0.2, 0.5, 0.9]}]}
    assert format_context(coco) == "A cat.\nA pet.\n\ncat: [0.1, 0.2, 0.5, 0.9]"


def test_synthetic_normalisation():
    assert normalize_answer(" Red.") == "red"
    assert normalize_answer("Two") == normalize_answer("2")
    assert normalize_answer("circle") != normalize_answer("circles")
