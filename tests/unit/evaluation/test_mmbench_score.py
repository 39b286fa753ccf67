"""MMBench: the TSV, LLaVA-1.5's prompt, option extraction and circular evaluation on hand-made answers."""

from __future__ import annotations

import base64
import csv
import io

import pytest

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import llava_format, mmbench

MC = llava_format.MULTIPLE_CHOICE_PROMPT
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
           "comment", "split"]


def _b64(tag: str) -> str:
    return base64.b64encode(tag.encode() * 40).decode()  # long enough to be an image, not a reference


def _row(index, question, options, answer, category, image, hint="nan"):
    cells = dict(zip("ABCD", [*options, "", "", "", ""][:4], strict=True))
    return {"index": index, "question": question, "hint": hint, **cells, "answer": answer, "category": category,
            "image": image, "source": "s", "l2-category": "coarse_perception", "comment": "nan", "split": "dev"}


ROWS = [
    # group 0: four options and their three circular shifts (copies point at row 0's image by its index)
    _row(0, "Which color?", ["red", "green", "blue", "yellow"], "A", "color", _b64("img0")),
    _row(1_000_000, "Which color?", ["green", "blue", "yellow", "red"], "D", "color", "0"),
    _row(2_000_000, "Which color?", ["blue", "yellow", "red", "green"], "C", "color", "0"),
    _row(3_000_000, "Which color?", ["yellow", "red", "green", "blue"], "B", "color", "0"),
    # group 1: a hint, two options
    _row(1, "Which animal?", ["cat", "dog"], "B", "color", _b64("img1"), hint="Look closely."),
    _row(1_000_001, "Which animal?", ["dog", "cat"], "A", "color", _b64("img1"), hint="Look closely."),
    # group 2: three options
    _row(2, "How many?", ["one", "two", "three"], "C", "count", _b64("img2")),
    _row(1_000_002, "How many?", ["two", "three", "one"], "B", "count", _b64("img2")),
    _row(2_000_002, "How many?", ["three", "one", "two"], "A", "count", _b64("img2")),
    # group 3: option C is "None", which pandas (and so LLaVA) reads as missing: two options
    _row(3, "What is it?", ["cat", "dog", "None"], "B", "count", _b64("img3")),
    _row(4, "Which?", ["x", "y"], "A", "count", _b64("img4")),
]
ANSWERS = {
    0: "A", 1_000_000: "D. red", 2_000_000: "The answer is C", 3_000_000: "B",  # all right
    1: "B", 1_000_001: "a dog",  # right: no letter, but one option text ("dog" = A here)
    2: "C", 1_000_002: "A", 2_000_002: "A",  # the middle copy is wrong → the group is wrong
    3: "C",  # C is not an option of this row: matches nothing → failed extraction
    # 4: no answer
}


def _write_tsv(path) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(ROWS)
    storage.write_text(str(path), buf.getvalue())
    return str(path)


def test_prompt_follows_llavas_mmbench_script(tmp_path):
    questions = mmbench.load_questions(_write_tsv(tmp_path / mmbench.TSV_FILE))
    q1 = next(q for q in questions if q["question_id"] == 1)
    assert q1["prompt"] == "Look closely.\nWhich animal?\nA. cat\nB. dog"
    assert q1["text"] == f"Look closely.\nWhich animal?\nA. cat\nB. dog\n{MC}"
    q3 = next(q for q in questions if q["question_id"] == 3)
    assert q3["prompt"] == "What is it?\nA. cat\nB. dog" and set(q3["options"]) == {"A", "B"}
    # circular copies share their group and, through the index reference, their image
    copies = [q for q in questions if q["g_index"] == 0]
    assert len(copies) == 4 and len({q["image"] for q in copies}) == 1


@pytest.mark.parametrize("text, options, expected", [
    ("B", {"A": "x", "B": "y"}, "B"),
    ("(C) three", {"A": "one", "B": "two", "C": "three"}, "C"),
    ("A cat is in the picture", {"A": "dog", "B": "cat"}, "B"),  # "A" is the article here: the text decides
    ("A or B", {"A": "cat", "B": "dog"}, None),  # two letters, and no option text either
    ("cat", {"A": "cat", "B": "dog"}, "A"),
    ("a cat and a dog", {"A": "cat", "B": "dog"}, None),  # two option texts
    ("the picture clearly shows a cat sitting", {"A": "cat", "B": "dog"}, "A"),  # no length cap in 2023
    ("b", {"A": "x", "B": "y"}, None),  # letters are upper case
])
def test_option_extraction_defaults_to_the_2023_rule(text, options, expected):
    assert mmbench.extract_option(text, options) == expected


def test_scores_a_hand_made_answers_file(tmp_path):
    questions = mmbench.load_questions(_write_tsv(tmp_path / mmbench.TSV_FILE))
    answers_uri = str(tmp_path / "answers.jsonl")
    by_id = {q["question_id"]: q for q in questions}
    storage.write_jsonl(answers_uri, [{"question_id": k, "round_id": 0, "prompt": by_id[k]["prompt"], "text": v}
                                      for k, v in ANSWERS.items()])
    result, rows = mmbench.score(questions, llava_format.read_answers(answers_uri), "vlmevalkit")
    # groups: 0 right, 1 right, 2 wrong (a copy), 3 wrong (failed), 4 wrong (no answer) → 2/5 = 40 %
    assert result["circular_accuracy"] == pytest.approx(40.0) and result["rule"] == "vlmevalkit"
    assert (result["n_questions"], result["n_rows"]) == (5, 11)
    # rows right: 4 + 2 + 2 + 0 + 0 = 8 of 11; originals (index 0..4): 0, 1, 2 right → 3/5
    assert result["single_pass_accuracy"] == pytest.approx(800 / 11)
    assert result["originals_accuracy"] == pytest.approx(60.0)
    assert (result["failed_extraction"], result["missing"]) == (1, 1)
    # per category: color = groups 0, 1 → 100; count = groups 2, 3, 4 → 0; the one l2-category → 40
    assert result["by_category"] == {"color": 100.0, "count": 0.0}
    assert result["by_l2_category"] == {"coarse_perception": pytest.approx(40.0)}
    assert [r["parsed"] for r in rows if r["g_index"] == 1] == ["B", "A"]
    assert mmbench.metrics(result)["l2.coarse_perception"] == pytest.approx(40.0)
    # the 2023 rule reads row 3's bare "C" as C (letters run to E): a wrong answer, not a failed extraction
    old, old_rows = mmbench.score(questions, llava_format.read_answers(answers_uri))
    assert old["rule"] == "opencompass_2023" and old["circular_accuracy"] == pytest.approx(40.0)
    assert (old["failed_extraction"], next(r["parsed"] for r in old_rows if r["question_id"] == 3)) == (0, "C")


def test_run_mmbench_writes_each_image_once_and_asks_llavas_prompt(tmp_path):
    _write_tsv(tmp_path / mmbench.TSV_FILE)
    seen = []

    def answer(requests):
        seen.extend(requests)
        return {r["id"]: ANSWERS[int(r["id"])] for r in requests if int(r["id"]) in ANSWERS}, None

    cfg = EvalJobConfig.model_validate({"eval": {"data": str(tmp_path)}})
    out = str(tmp_path / "out")
    report = mmbench.run_mmbench(cfg, out, answer)
    assert report["result"]["circular_accuracy"] == pytest.approx(40.0)
    images = storage.list_files(storage.join(out, mmbench.IMAGES_DIR))
    assert len(images) == 5  # five distinct images among eleven rows
    first = seen[0]
    assert storage.read_bytes(first["image"]) == b"img0" * 40
    assert first["conversations"][0]["value"] == f"<image>\nWhich color?\nA. red\nB. green\nC. blue\nD. yellow\n{MC}"
    written = storage.read_jsonl(storage.join(out, llava_format.ANSWERS_FILE))
    assert written[0]["prompt"] == "Which color?\nA. red\nB. green\nC. blue\nD. yellow"


def test_a_split_without_answers_is_refused(tmp_path):
    ROWS_NO_ANSWER = [{**ROWS[0], "answer": "nan"}]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(ROWS_NO_ANSWER)
    storage.write_text(str(tmp_path / "test.tsv"), buf.getvalue())
    with pytest.raises(ValueError, match="dev set"):
        mmbench.load_questions(str(tmp_path / "test.tsv"))
