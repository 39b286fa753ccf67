"""Official files in and out: vitune reads the answers the official scripts leave (chunks, their own row
shapes) and writes each benchmark's official file; the official reader's logic (``official_readers``) reads
back the numbers vitune reported."""

from __future__ import annotations

import json
import zipfile

import pytest

from tests.unit.evaluation import official_readers
from tests.unit.evaluation import test_gqa_score as gqa_case
from tests.unit.evaluation import test_mme_score as mme_case
from tests.unit.evaluation import test_textvqa_score as textvqa_case
from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import gqa, llava_format, mme, official_formats, textvqa, vqav2, xlsx

SHORT = llava_format.SHORT_ANSWER_PROMPT


def _llava_row(qid, prompt, text, **extra):
    """An answer row exactly as model_vqa_loader.py writes it."""
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "Xk3", "model_id": "llava-v1.5-13b",
            "metadata": {}, **extra}


def test_mme_results_folder_reads_back_the_same_scores(tmp_path):
    mme_case._mme_folder(tmp_path)
    preds = tmp_path / "llava-v1.5-13b.jsonl"
    storage.write_jsonl(str(preds), [_llava_row(qid, f"{q}\n{SHORT}", t) for qid, q, t in mme_case.ANSWERS])
    cfg = EvalJobConfig.model_validate({"eval": {"data": str(tmp_path), "predictions": str(preds)}})
    result = mme.run_mme(cfg, str(tmp_path / "out"), lambda _: pytest.fail("must not generate"))["result"]
    folder = tmp_path / "out" / "official" / "mme"
    assert sorted(p.name for p in folder.iterdir()) == ["artwork.txt", "code_reasoning.txt", "existence.txt"]
    lines = (folder / "artwork.txt").read_text().splitlines()
    # convert_answer_to_mme.py's line: <stem>.txt, the question as the ground truth spells it (two spaces kept)
    assert lines[0] == "10.txt\tIs this artwork by Monet?  Please answer yes or no.\tYes\tyes"
    assert (folder / "code_reasoning.txt").read_text().endswith("\tYes\t\n")  # unanswered: an empty answer
    scores = official_readers.mme_calculation(folder, ["existence", "artwork", "code_reasoning"])
    assert scores == {name: result["subtasks"][name]["score"] for name in scores}
    assert scores["existence"] + scores["artwork"] == result["perception"]


def test_mme_lines_stay_one_per_question():
    rows = [{"question_id": "OCR/1.jpg", "truth_question": "q1", "truth_answer": "Yes", "text": "Yes\nit\tis"},
            {"question_id": "OCR/1.jpg", "truth_question": "q2", "truth_answer": "No", "text": None}]
    assert official_formats.mme_results(rows) == {"OCR": "1.txt\tq1\tYes\tYes it is\n1.txt\tq2\tNo\t\n"}


def test_gqa_chunks_are_merged_and_the_predictions_file_reads_back_the_same(tmp_path):
    questions = gqa_case._gqa_folder(tmp_path)
    chunks = tmp_path / "answers" / "llava_gqa_testdev_balanced" / "llava-v1.5-13b"
    answered = [(q, gqa_case.ANSWERS[q["question_id"]]) for q in questions if q["question_id"] in gqa_case.ANSWERS]
    for i, part in enumerate((answered[:3], answered[3:])):  # gqa.sh with two GPUs: 2_0.jsonl, 2_1.jsonl
        storage.write_jsonl(str(chunks / f"2_{i}.jsonl"), [_llava_row(q["question_id"], q["text"], t) for q, t in part])
    cfg = EvalJobConfig.model_validate({"eval": {"data": str(tmp_path), "predictions": str(chunks)}})
    result = gqa.run_gqa(cfg, str(tmp_path / "out"), lambda _: pytest.fail("must not generate"))["result"]
    assert result["accuracy"] == pytest.approx(60.0)
    written = json.loads((tmp_path / "out" / "official" / official_formats.GQA_FILE).read_text())
    assert written[:2] == [{"questionId": "1", "prediction": "yes"}, {"questionId": "2", "prediction": "left"}]
    assert written[-1] == {"questionId": "6", "prediction": ""}  # unanswered, so eval.py accepts the file
    assert official_readers.gqa_eval(written, gqa_case.TRUTH) == pytest.approx(result["accuracy"])


@pytest.mark.parametrize("answer, prediction", [("Yes.", "yes"), ("Yes. ", "yes. "), ("LEFT...", "left"),
                                                ("", ""), ("3.5", "3.5")])
def test_gqa_prediction_as_convert_gqa_for_eval_writes_it(answer, prediction):
    assert official_formats.gqa_predictions(["1"], [gqa.normalize(answer)]) == [
        {"questionId": "1", "prediction": prediction}]


def test_textvqa_submission_uses_the_annotation_ids(tmp_path):
    questions = textvqa_case._annotations(tmp_path)
    ann = tmp_path / textvqa.ANNOTATIONS_FILE
    data = json.loads(ann.read_text())
    for i, row in enumerate(data["data"]):
        row["question_id"] = 34602 + i
    ann.write_text(json.dumps(data))
    preds = tmp_path / "preds.jsonl"
    storage.write_jsonl(str(preds), [_llava_row(qid, q["text"], t)
                                     for (qid, t), q in zip(textvqa_case.ANSWERS, questions, strict=False)])
    cfg = EvalJobConfig.model_validate({"eval": {"data": str(tmp_path), "predictions": str(preds)}})
    result = textvqa.run_textvqa(cfg, str(tmp_path / "out"), lambda _: pytest.fail("must not generate"))["result"]
    sub = json.loads((tmp_path / "out" / "official" / official_formats.TEXTVQA_FILE).read_text())
    assert sub == [{"question_id": 34602, "answer": "dakota"}, {"question_id": 34603, "answer": "2"},
                   {"question_id": 34604, "answer": "yankees"}, {"question_id": 34605, "answer": "red"},
                   {"question_id": 34606, "answer": ""}]
    # EvalAI's accuracy over the submission, humans processed as EvalAI processes them, is vitune's
    from vitune.evaluation.vqa_normalize import normalize_vqa_answer

    humans = {34602 + i: [normalize_vqa_answer(a) for a in row["answers"]] for i, row in enumerate(data["data"])}
    acc = [official_readers.vqa_accuracy(s["answer"], humans[s["question_id"]]) if s["answer"] else 0.0 for s in sub]
    assert 100 * sum(acc) / len(acc) == pytest.approx(result["accuracy"])


def test_vqav2_submission_lists_the_whole_test_split(tmp_path):
    dev = [{"question_id": q, "image": f"COCO_test2015_{q:012d}.jpg", "text": f"What is {q}?\n{SHORT}",
            "category": "default"} for q in (1, 2, 3)]
    storage.write_jsonl(str(tmp_path / vqav2.QUESTIONS_FILE), dev)
    storage.write_jsonl(str(tmp_path / vqav2.TEST_FILE), [*dev, {**dev[0], "question_id": 9}])
    answers = {"1": "Two", "2": "the dog's bowl", "3": "Yes."}

    def answer(requests):
        assert requests[0]["image"].endswith("test2015/COCO_test2015_000000000001.jpg")
        return {r["id"]: answers[r["id"]] for r in requests if r["id"] != "3"}, None

    cfg = EvalJobConfig.model_validate({"eval": {"benchmark": "vqav2", "data": str(tmp_path)}})
    result = vqav2.run_vqav2(cfg, str(tmp_path / "out"), answer)["result"]
    assert (result["n"], result["answered"], result["missing"]) == (3, 2, 1)
    sub = json.loads((tmp_path / "out" / "official" / official_formats.VQAV2_FILE).read_text())
    # convert_vqav2_for_submission.py: every test2015 question, EvalAI-processed answers, "" where none
    assert sub == [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "dog 's bowl"},
                   {"question_id": 3, "answer": ""}, {"question_id": 9, "answer": ""}]
    assert "EvalAI" in vqav2.markdown(result)


def test_xlsx_is_a_spreadsheet_pandas_would_read():
    data = xlsx.workbook([["index", "text", "x"], [1_000_002, " a <b> & \"c\" ", None], [3, "bad\x01char", 1.5]])
    with zipfile.ZipFile(__import__("io").BytesIO(data)) as z:
        assert {"[Content_Types].xml", "xl/workbook.xml", "xl/worksheets/sheet1.xml"} <= set(z.namelist())
    rows = official_readers.read_xlsx(data)
    assert rows == [{"index": 1_000_002, "text": " a <b> & \"c\" ", "x": None},
                    {"index": 3, "text": "badchar", "x": 1.5}]
    assert [xlsx.column_name(i) for i in (0, 25, 26, 701, 702)] == ["A", "Z", "AA", "ZZ", "AAA"]
