"""LLaVA-Bench: the default judge prompt equals LLaVA's official texts; official score parsing and summary."""

from __future__ import annotations

import pytest

from vitune.evaluation.llava_bench import BenchItem
from vitune.evaluation.llava_bench_official import (
    UNPARSEABLE,
    official_style,
    official_texts,
    parse_scores,
    review_messages,
    rule_key,
    summarize,
)

# Verbatim from haotian-liu/LLaVA: the system message of eval_gpt_review_bench.py / eval_gpt_review_visual.py
# and two rules of llava/eval/table/rule.json.
OFFICIAL_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
_TAIL = (
    "\nPlease rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance."
    "\nPlease first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\nIn the subsequent line, please provide a "
    "comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in "
    "which the responses were presented does not affect your judgment."
)
_HEAD = ("We would like to request your feedback on the performance of two AI assistants in response to the user "
         "question displayed above. The user asks the question on observing an image. For your reference, the "
         "visual content in the image is represented with ")
OFFICIAL_IN_THE_WILD = _HEAD + "a few sentences describing the image. " + _TAIL
OFFICIAL_COCO = _HEAD + (
    "five descriptive sentences describing the same image and the bounding box coordinates of each object in "
    "the scene. These coordinates are in the form of bounding boxes, represented as (x1, y1, x2, y2) with "
    "floating numbers ranging from 0 to 1. These values correspond to the top left x, top left y, bottom right "
    "x, and bottom right y. ") + _TAIL


def test_texts_equal_the_official_ones():
    texts = official_texts()
    assert texts["system"] == OFFICIAL_SYSTEM
    assert "rule.json" in texts["source"]
    for short in ("conv", "detail", "complex"):
        assert texts["rules"][f"llava_bench_{short}"] == {"role": "Assistant", "prompt": OFFICIAL_IN_THE_WILD}
        assert texts["rules"][short] == {"role": "Assistant", "prompt": OFFICIAL_COCO}


def test_review_message_is_built_block_by_block_as_the_official_script():
    item = BenchItem("7", "a.jpg", "What is it?", "complex", "A cat on a mat.", "A cat.")
    system, user = review_messages(item, "A cat.", "A dog.", "in_the_wild")
    assert system == {"role": "system", "content": OFFICIAL_SYSTEM}
    assert user["role"] == "user"
    assert user["content"] == (
        "[Context]\nA cat on a mat.\n\n[Question]\nWhat is it?\n\n[Assistant 1]\nA cat.\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\nA dog.\n\n[End of Assistant 2]\n\n[System]\n{OFFICIAL_IN_THE_WILD}\n\n")
    assert rule_key("conversation", "coco") == "conv" and rule_key("detail", "in_the_wild") == "llava_bench_detail"
    style = official_style("coco")
    assert style.name == "official" and style.unparseable_as == UNPARSEABLE
    assert style.messages(item, "x", "y")[1]["content"].endswith(f"[System]\n{OFFICIAL_COCO}\n\n")
    with pytest.raises(ValueError, match="layout"):
        official_style("wild")


@pytest.mark.parametrize("review, scores", [
    ("8 6\nAssistant 1 is better.", (8.0, 6.0)),
    ("8,6", (8.0, 6.0)),  # a comma becomes a space
    ("7.5 9", (7.5, 9.0)),
    ("8, 6", None),  # "8  6": three parts on single spaces
    ("8 6 ", None),  # a trailing space is a third part
    ("Assistant 1: 8", None),
    ("8/10 6/10", None),
    ("\n8 6", None),  # the first line is empty
    ("", None),
    (None, None),
])
def test_official_score_parsing(review, scores):
    assert parse_scores(review) == scores


def test_summary_averages_unparseable_verdicts_as_minus_one():
    verdicts = [("conversation", (8.0, 6.0)), ("conversation", None), ("detail", (10.0, 5.0))]
    out = summarize(verdicts)
    # conversation: reference (8 + -1) / 2 = 3.5, ours (6 + -1) / 2 = 2.5 → 2.5 / 3.5 = 71.43 %
    assert out["conversation"]["reference"] == 3.5 and out["conversation"]["ours"] == 2.5
    assert out["conversation"]["relative"] == pytest.approx(250 / 3.5)
    assert out["conversation"]["unparseable"] == 1
    # the official line: round(2.5 / 3.5 · 100, 1) = 71.4, then both means × 10
    assert out["conversation"]["printed"] == [71.4, 35.0, 25.0]
    # all: reference (8 - 1 + 10) / 3 = 5.667, ours (6 - 1 + 5) / 3 = 3.333; printed from the 3-decimal means:
    # 3.333 / 5.667 = 58.81 % → 58.8
    assert out["all"]["printed"] == [58.8, 56.7, 33.3]
    assert out["all"]["n"] == 3 and out["detail"]["relative"] == 50.0
