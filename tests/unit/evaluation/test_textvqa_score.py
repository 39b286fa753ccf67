"""TextVQA: LLaVA-1.5's OCR prompt, the standard answer normalisation, VQA accuracy on hand-made answers."""

from __future__ import annotations

import pytest

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import llava_format, textvqa
from vitune.evaluation.vqa_normalize import normalize_vqa_answer, vqa_accuracy

SHORT = llava_format.SHORT_ANSWER_PROMPT


def test_prompt_is_llava_15s():
    # a line of LLaVA's llava_textvqa_val_v051_ocr.jsonl, and one whose image has no OCR tokens
    assert textvqa.build_prompt("What number is on the player's jersey?", ["22"]) == (
        "What number is on the player's jersey?\nReference OCR token: 22\n"
        "Answer the question using a single word or phrase.")
    assert textvqa.build_prompt("Whats the lowest number yard line that you can see?", []) == (
        "Whats the lowest number yard line that you can see?\nReference OCR token: \n"
        "Answer the question using a single word or phrase.")


@pytest.mark.parametrize("prompt, question", [
    (f"What Is This?\nReference OCR token: A, B\n{SHORT}", "what is this?"),
    ("Reference OCR token: A, B\nWhat is this?\nAnswer briefly.", "what is this?"),
    (f"What is this?\n{SHORT}", "what is this?"),
    ("OCR tokens: A B Question: What is this? Short answer:", "what is this?"),
])
def test_question_read_back_from_the_prompt(prompt, question):
    assert textvqa.question_of(prompt) == question


@pytest.mark.parametrize("text, normalized", [
    ("Dakota.", "dakota"),  # a period not followed by a digit goes
    ("5.5", "5.5"),
    ("Two", "2"),  # number words become digits
    ("the Yankees", "yankees"),  # articles go
    ("dont", "don't"),  # contractions are spelled out
    ("coca-cola", "coca cola"),  # punctuation touching no space becomes a space
    ("new york - city", "new york city"),  # ... and touching a space is removed
    ("10,000", "10000"),  # commas go first
    ("What's?", "what 's"),
    (" Dakota\n", "dakota"),  # stray whitespace and line breaks go
    ("", ""),  # an empty answer matches no human
])
def test_standard_normalisation(text, normalized):
    assert normalize_vqa_answer(text) == normalized


def test_vqa_accuracy_is_the_leave_one_out_mean():
    # k of 10 humans agree: mean over the 10 subsets of 9 of min(1, matches / 3)
    # k=1: 9 subsets keep 1 match (1/3), one keeps 0 → 9·(1/3)/10 = 0.3
    assert vqa_accuracy("a", ["a"] + ["b"] * 9) == pytest.approx(0.3)
    # k=2: 8·(2/3) + 2·(1/3) = 6 → 0.6;  k=3: 7·1 + 3·(2/3) = 9 → 0.9;  k=4: 1.0
    assert vqa_accuracy("a", ["a"] * 2 + ["b"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("a", ["a"] * 3 + ["b"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("a", ["a"] * 4 + ["b"] * 6) == 1.0
    assert vqa_accuracy("c", ["a"] * 10) == 0.0


def _annotations(tmp_path):
    data = [
        {"image_id": "img1", "question": "What brand is this?", "answers": ["Dakota"] * 3 + ["dakota digital"] * 7},
        {"image_id": "img2", "question": "What number is shown?", "answers": ["2", "two"] + ["22"] * 8},
        {"image_id": "img3", "question": "Which team?", "answers": ["the yankees"] * 4 + ["ny"] * 6},
        {"image_id": "img3", "question": "What color is the cap?", "answers": ["red"] + ["blue"] * 9},
        {"image_id": "img4", "question": "What is written?", "answers": ["stop"] * 10},
    ]
    storage.write_json(str(tmp_path / textvqa.ANNOTATIONS_FILE), {"dataset_name": "textvqa", "data": data})
    questions = [{"question_id": a["image_id"], "image": f"{a['image_id']}.jpg",
                  "text": textvqa.build_prompt(a["question"], ["TOKEN"]), "category": "default"} for a in data]
    storage.write_jsonl(str(tmp_path / textvqa.QUESTIONS_FILE), questions)
    return questions


ANSWERS = [
    ("img1", "Dakota."),  # → "dakota", 3 humans said it → 0.9
    ("img2", "Two"),  # → "2", and "two" → "2": 2 humans → 0.6
    ("img3", "Yankees"),  # "the yankees" → "yankees": 4 humans → 1.0
    ("img3", "red"),  # 1 human → 0.3 (same question id as the line above: matched on the prompt)
    # img4 has no answer → 0
]


def test_scores_a_hand_made_answers_file(tmp_path):
    questions = _annotations(tmp_path)
    answers_uri = str(tmp_path / "answers.jsonl")
    rows = [{"question_id": qid, "prompt": q["text"], "text": t}
            for (qid, t), q in zip(ANSWERS, questions, strict=False)]
    storage.write_jsonl(answers_uri, rows[::-1])  # any order
    annotations = textvqa.read_annotations(str(tmp_path / textvqa.ANNOTATIONS_FILE))
    result, scored = textvqa.score(questions, llava_format.read_answers(answers_uri), annotations)
    # (0.9 + 0.6 + 1.0 + 0.3 + 0) / 5 = 0.56 → 56 %
    assert result["accuracy"] == pytest.approx(56.0)
    assert (result["n"], result["missing"]) == (5, 1)
    assert [r["accuracy"] for r in scored] == pytest.approx([0.9, 0.6, 1.0, 0.3, 0.0])
    assert textvqa.metrics(result) == {"accuracy": pytest.approx(56.0), "missing": 1.0}


def test_a_question_without_annotation_is_an_error(tmp_path):
    questions = _annotations(tmp_path)
    questions[0] = {**questions[0], "question_id": "nope"}
    with pytest.raises(ValueError, match="no annotation"):
        textvqa.score(questions, [], textvqa.read_annotations(str(tmp_path / textvqa.ANNOTATIONS_FILE)))


def test_run_textvqa_from_predictions(tmp_path):
    questions = _annotations(tmp_path)
    preds = str(tmp_path / "preds.jsonl")
    storage.write_jsonl(preds, [{"question_id": qid, "prompt": q["text"], "text": t}
                                for (qid, t), q in zip(ANSWERS, questions, strict=False)])
    cfg = EvalJobConfig.model_validate({"eval": {"data": str(tmp_path), "predictions": preds}})
    report = textvqa.run_textvqa(cfg, str(tmp_path / "out"), lambda _: pytest.fail("must not generate"))
    assert report["result"]["accuracy"] == pytest.approx(56.0) and report["inference"] is None
