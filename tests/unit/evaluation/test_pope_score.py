"""POPE: LLaVA's yes/no reading of an answer, the label pairing, and the metrics on a hand-made answers file."""

from __future__ import annotations

import json

import pytest

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import llava_format, pope

SHORT = llava_format.SHORT_ANSWER_PROMPT


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No, there is not.", "no"),  # the comma is dropped before splitting
        ("There is not a cat. No.", "no"),  # "not" in the first sentence
        ("Yes. There is no dog.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # not one of the words No / no / not
        ("NO", "yes"),  # case-sensitive
        ("No\nthere is none", "yes"),  # split on spaces only: "No\nthere" is one word
        ("", "yes"),
        (" No", "no"),  # split(" ") leaves an empty word first; "No" is still a word
        ("no.", "no"),
        ("Yes, but not fully.", "no"),  # "not" anywhere in the first sentence
    ],
)
def test_yes_no_rule(text, expected):
    assert pope.yes_no(text) == expected


def _pope_folder(tmp_path):
    """Two splits: random (4 questions) and adversarial (6), with POPE's label files."""
    splits = {  # in the order of LLaVA's file
        "adversarial": [("c.jpg", "Is there a cup in the image?", "yes"),
                        ("c.jpg", "Is there a fork in the image?", "yes"),
                        ("c.jpg", "Is there a cat in the image?", "yes"),
                        ("d.jpg", "Is there a bed in the imange?", "no"),  # POPE's own typo, kept by LLaVA
                        ("d.jpg", "Is there a tv in the image?", "no"),
                        ("d.jpg", "Is there a sink in the image?", "no")],
        "random": [("a.jpg", "Is there a dog in the image?", "yes"), ("a.jpg", "Is there a cat in the image?", "yes"),
                   ("b.jpg", "Is there a car in the image?", "no"), ("b.jpg", "Is there a bus in the image?", "no")],
    }
    questions, offset = [], {"adversarial": 0, "random": 10_000_000}
    for split, rows in splits.items():
        labels = [{"question_id": i + 1, "image": img, "text": q, "label": lab} for i, (img, q, lab) in enumerate(rows)]
        storage.write_jsonl(str(tmp_path / "coco" / pope.label_file(split)), labels)
        questions += [{"question_id": offset[split] + i + 1, "image": img, "text": f"{q}\n{SHORT}", "category": split}
                      for i, (img, q, _) in enumerate(rows)]
    storage.write_jsonl(str(tmp_path / pope.QUESTIONS_FILE), questions)
    return questions


ANSWERS = {
    # random: labels yes, yes, no, no → predictions yes, no, no, yes
    10_000_001: "Yes", 10_000_002: "No, there is not.", 10_000_003: "No", 10_000_004: "Yes, there is a dog.",
    # adversarial: labels yes, yes, yes, no, no, no → yes, yes, no, no, yes (quirk), and no answer for the 6th
    1: "Yes", 2: "yes.", 3: "There is not a cat. No.", 4: "I do not think so", 5: "Nope",
}


def test_scores_a_hand_made_answers_file(tmp_path):
    _pope_folder(tmp_path)
    answers_uri = str(tmp_path / "answers.jsonl")
    storage.write_jsonl(answers_uri, [{"question_id": k, "prompt": "", "text": v} for k, v in ANSWERS.items()])
    questions = llava_format.read_questions(str(tmp_path / pope.QUESTIONS_FILE))
    labelled = pope.attach_labels(questions, str(tmp_path / "coco"))
    result, rows = pope.score(labelled, llava_format.read_answers(answers_uri))

    # random: TP 1 (q1), FN 1 (q2), TN 1 (q3), FP 1 (q4): accuracy 2/4, precision 1/2, recall 1/2, F1 1/2,
    # yes-ratio 2/4
    r = result["splits"]["random"]
    assert (r["tp"], r["fn"], r["tn"], r["fp"]) == (1, 1, 1, 1)
    assert [r[m] for m in pope.METRICS] == [0.5, 0.5, 0.5, 0.5, 0.5]
    # adversarial (5 answered): TP 2, FN 1 (q3), TN 1 (q4), FP 1 (q5 "Nope"): accuracy 3/5, precision 2/3,
    # recall 2/3, F1 2/3, yes-ratio 3/5
    a = result["splits"]["adversarial"]
    assert (a["tp"], a["fn"], a["tn"], a["fp"], a["n"]) == (2, 1, 1, 1, 5)
    assert [a[m] for m in pope.METRICS] == pytest.approx([0.6, 2 / 3, 2 / 3, 2 / 3, 0.6])
    # average over the two splits: F1 (1/2 + 2/3) / 2 = 7/12, accuracy (0.5 + 0.6) / 2 = 0.55
    assert result["average"]["f1"] == pytest.approx(7 / 12)
    assert result["average"]["accuracy"] == pytest.approx(0.55)
    assert result["missing"] == 1 and result["n"] == 10
    assert [r["parsed"] for r in rows if r["split"] == "adversarial"] == ["yes", "yes", "no", "no", "yes", None]
    metrics = pope.metrics(result)
    assert metrics["average.f1"] == pytest.approx(7 / 12) and metrics["random.yes_ratio"] == 0.5
    assert "| average |" in pope.markdown(result)


def test_labels_in_the_question_rows_need_no_label_files():
    questions = [{"question_id": 1, "image": "a.jpg", "text": "q", "category": "random", "label": "no"}]
    assert pope.attach_labels(questions, "/nonexistent")[0]["label"] == "no"
    result, _ = pope.score(questions, [{"question_id": 1, "text": "No"}])
    # one true negative: accuracy 1, precision and recall undefined, yes-ratio 0
    assert result["splits"]["random"]["accuracy"] == 1.0
    assert result["splits"]["random"]["precision"] is None and result["splits"]["random"]["yes_ratio"] == 0.0


def test_labels_are_found_by_content_and_answers_by_id_whatever_the_order(tmp_path):
    _pope_folder(tmp_path)
    for split in ("random", "adversarial"):  # label files in another order than the questions
        uri = tmp_path / "coco" / pope.label_file(split)
        storage.write_jsonl(str(uri), [json.loads(line) for line in uri.read_text().splitlines()][::-1])
    questions = llava_format.read_questions(str(tmp_path / pope.QUESTIONS_FILE))
    labelled = pope.attach_labels(questions, str(tmp_path / "coco"))
    answers = [{"question_id": k, "text": v} for k, v in reversed(ANSWERS.items())]  # answers out of order too
    result, _ = pope.score(labelled, answers)
    assert (result["splits"]["random"]["f1"], result["average"]["f1"]) == pytest.approx((0.5, 7 / 12))


def test_label_file_errors_name_the_file_and_line(tmp_path):
    _pope_folder(tmp_path)
    uri = tmp_path / "coco" / pope.label_file("random")
    rows = [json.loads(line) for line in uri.read_text().splitlines()]
    questions = llava_format.read_questions(str(tmp_path / pope.QUESTIONS_FILE))
    storage.write_jsonl(str(uri), [{**rows[0], "image": "other.jpg"}, *rows[1:]])
    with pytest.raises(ValueError, match=r"10000001 \(random: a.jpg 'Is there a dog in the image\?'\) is not in .*"
                                         r"coco_pope_random.json"):
        pope.attach_labels(questions, str(tmp_path / "coco"))
    storage.write_jsonl(str(uri), [*rows, rows[1]])
    with pytest.raises(ValueError, match=r"coco_pope_random.json line 5: .* labelled again \(first at line 2\)"):
        pope.attach_labels(questions, str(tmp_path / "coco"))


def test_run_pope_generates_rescores_and_writes_llava_answers(tmp_path):
    _pope_folder(tmp_path)
    seen = []

    def answer(requests):
        seen.extend(requests)
        return {r["id"]: ANSWERS.get(int(r["id"]), "") for r in requests}, {"generated": len(requests)}

    cfg = EvalJobConfig.model_validate({"eval": {"data": str(tmp_path)}})
    out = str(tmp_path / "out")
    report = pope.run_pope(cfg, out, answer)
    assert report["inference"] == {"generated": 10}
    first = seen[0]
    assert first["image"] == storage.join(str(tmp_path), "val2014", "c.jpg")
    assert first["conversations"] == [{"from": "human", "value": f"<image>\nIs there a cup in the image?\n{SHORT}"}]
    written = storage.read_jsonl(storage.join(out, llava_format.ANSWERS_FILE))
    assert written[0] == {"question_id": 1, "prompt": f"Is there a cup in the image?\n{SHORT}", "text": "Yes",
                          "answer_id": "1", "model_id": "vitune", "metadata": {}}
    # the written answers, given back as eval.predictions, score the same without generating anything
    cfg2 = EvalJobConfig.model_validate({"eval": {"data": str(tmp_path),
                                                  "predictions": storage.join(out, llava_format.ANSWERS_FILE)}})
    again = pope.run_pope(cfg2, str(tmp_path / "out2"), lambda _: pytest.fail("must not generate"))
    assert again["result"]["splits"] == report["result"]["splits"]
    # every question was answered here, the 6th adversarial one with "", which LLaVA's rule reads as "yes":
    # adversarial FP 2 → precision 2/4, recall 2/3, F1 2·(1/2)(2/3)/(1/2 + 2/3) = 4/7
    assert report["result"]["missing"] == 0
    assert report["result"]["splits"]["adversarial"]["f1"] == pytest.approx(4 / 7)
    assert storage.exists(storage.join(out, llava_format.RESULTS_FILE))
