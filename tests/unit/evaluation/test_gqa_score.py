"""GQA: LLaVA's prediction normalisation and exact match on a hand-made answers file."""

from __future__ import annotations

import pytest

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import gqa, llava_format

SHORT = llava_format.SHORT_ANSWER_PROMPT

TRUTH = {
    "1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify", "semantic": "attr"}},
    "2": {"answer": "left", "isBalanced": True, "types": {"structural": "query", "semantic": "rel"}},
    "3": {"answer": "table", "isBalanced": True, "types": {"structural": "query", "semantic": "obj"}},
    "4": {"answer": "no", "isBalanced": True, "types": {"structural": "logical", "semantic": "obj"}},
    "5": {"answer": "blue", "isBalanced": False, "types": {"structural": "query", "semantic": "attr"}},
    "6": {"answer": "red", "isBalanced": True, "types": {"structural": "query", "semantic": "attr"}},
}
ANSWERS = {"1": "Yes.", "2": "Left", "3": "the table", "4": "no", "5": "blue"}  # 6 has no answer


def test_normalisation_is_llavas():
    assert gqa.normalize("Yes.") == "yes"
    assert gqa.normalize("The Table...") == "the table"  # periods at the end only, articles stay
    assert gqa.normalize("3.5") == "3.5"


def _gqa_folder(tmp_path):
    storage.write_json(str(tmp_path / gqa.TRUTH_FILE), TRUTH)
    questions = [{"question_id": qid, "image": f"n{qid}.jpg", "text": f"Question {qid}?\n{SHORT}"} for qid in TRUTH]
    storage.write_jsonl(str(tmp_path / gqa.QUESTIONS_FILE), questions)
    return questions


def test_scores_a_hand_made_answers_file(tmp_path):
    questions = _gqa_folder(tmp_path)
    result, rows = gqa.score(questions, [{"question_id": k, "text": v} for k, v in ANSWERS.items()], TRUTH)
    # balanced: 1, 2, 3, 4, 6 (5 is not); right: 1 ("yes"), 2 ("left"), 4 ("no") → 3/5 = 60 %
    assert result["accuracy"] == pytest.approx(60.0)
    # binary = verify + logical: 1 and 4, both right → 100; open = query: 2 right, 3 ("the table") and 6 wrong → 1/3
    assert result["binary"] == pytest.approx(100.0) and result["open"] == pytest.approx(100 / 3)
    assert result["structural"] == pytest.approx({"logical": 100.0, "query": 100 / 3, "verify": 100.0})
    # semantic: attr 1 right, 6 wrong → 50; obj 3 wrong, 4 right → 50; rel 2 right → 100
    assert result["semantic"] == pytest.approx({"attr": 50.0, "obj": 50.0, "rel": 100.0})
    assert (result["n"], result["missing"]) == (5, 1)
    assert [r["prediction"] for r in rows] == ["yes", "left", "the table", "no", None]
    assert gqa.metrics(result)["structural.query"] == pytest.approx(100 / 3)


def test_run_gqa_end_to_end(tmp_path):
    _gqa_folder(tmp_path)

    def answer(requests):
        assert requests[0]["image"] == storage.join(str(tmp_path), "data", "images", "n1.jpg")
        return {r["id"]: ANSWERS[r["id"]] for r in requests if r["id"] in ANSWERS}, None

    cfg = EvalJobConfig.model_validate({"eval": {"data": str(tmp_path)}})
    report = gqa.run_gqa(cfg, str(tmp_path / "out"), answer)
    assert report["result"]["accuracy"] == pytest.approx(60.0)
    assert "| binary | 100.00 |" in gqa.markdown(report["result"])
