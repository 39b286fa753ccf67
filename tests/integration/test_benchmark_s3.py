"""One LLaVA-1.5 suite benchmark end to end: POPE in LLaVA's ``eval.zip`` layout on the S3 server, answered by the
tiny model (its folder on S3 too) through Ray batch inference, scored, written as JSON + Markdown, logged to the
MLflow tracking server; then the answers file alone re-scored, and a hand-made answers file scored by hand.

The tiny model's answers are noise, so its run checks the plumbing (every question answered in LLaVA's answers
format, the counts adding up, re-scoring agreeing); the numbers are checked on the hand-made answers below.
"""

from __future__ import annotations

import io
import json
import math

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from vitune import storage
from vitune.config import EvalJobConfig, load_config
from vitune.evaluation.llava_format import ANSWERS_FILE, SHORT_ANSWER_PROMPT

pytestmark = pytest.mark.integration

# question_id: (split, image, object asked about, label)
QUESTIONS = {
    1: ("random", "COCO_val2014_000000000001.jpg", "dog", "yes"),
    2: ("random", "COCO_val2014_000000000002.jpg", "car", "no"),
    3: ("random", "COCO_val2014_000000000003.jpg", "cup", "no"),
    4: ("adversarial", "COCO_val2014_000000000001.jpg", "cat", "yes"),
    5: ("adversarial", "COCO_val2014_000000000002.jpg", "bus", "yes"),
    6: ("adversarial", "COCO_val2014_000000000003.jpg", "fork", "no"),
}
# hand-made answers and what eval_pope.py's rule reads in them ("no" when the first sentence has No/no/not)
HAND_ANSWERS = {1: "Yes", 2: "No, there is not.", 3: "Yes.", 4: "no", 5: "There is a bus. No doubt.", 6: "No"}
# by hand, positive = yes:
#   random:      1 yes/yes TP, 2 no/no TN, 3 yes/no FP → acc 2/3, precision 1/2, recall 1/1, F1 2/3, yes-ratio 2/3
#   adversarial: 4 no/yes FN, 5 yes/yes TP, 6 no/no TN → acc 2/3, precision 1/1, recall 1/2, F1 2/3, yes-ratio 1/3
#   average:     acc 2/3, precision 3/4, recall 3/4, F1 2/3, yes-ratio 1/2
EXPECTED = {"random.f1": 2 / 3, "random.precision": 0.5, "random.recall": 1.0, "random.yes_ratio": 2 / 3,
            "adversarial.f1": 2 / 3, "adversarial.precision": 1.0, "adversarial.recall": 0.5,
            "adversarial.yes_ratio": 1 / 3, "average.accuracy": 2 / 3, "average.precision": 0.75,
            "average.recall": 0.75, "average.f1": 2 / 3, "average.yes_ratio": 0.5}


def _question(obj: str) -> str:
    return f"Is there a {obj} in the image?"


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), ((seed * 70) % 256, 90, 160)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pope_s3(s3_bucket, tiny_model_folder) -> dict[str, str]:
    """The POPE folder as LLaVA's eval.zip + POPE's coco/ files lay it out, and the tiny model, on S3."""
    root = f"{s3_bucket}/bench-pope"
    data = storage.join(root, "pope")
    storage.write_jsonl(storage.join(data, "llava_pope_test.jsonl"), [
        {"question_id": qid, "image": image, "text": f"{_question(obj)}\n{SHORT_ANSWER_PROMPT}", "category": split}
        for qid, (split, image, obj, _) in QUESTIONS.items()])
    for split in ("random", "adversarial"):
        storage.write_jsonl(storage.join(data, "coco", f"coco_pope_{split}.json"), [
            {"question_id": qid, "image": image, "text": _question(obj), "label": label}
            for qid, (s, image, obj, label) in QUESTIONS.items() if s == split])
    for k, image in enumerate(sorted({q[1] for q in QUESTIONS.values()})):
        storage.write_bytes(storage.join(data, "val2014", image), _jpeg(k))
    model = storage.join(root, "model")
    storage.upload_dir(tiny_model_folder, model)
    hand = storage.join(root, "hand_answers.jsonl")
    storage.write_jsonl(hand, [{"question_id": qid, "prompt": f"{_question(QUESTIONS[qid][2])}\n{SHORT_ANSWER_PROMPT}",
                                "text": text, "answer_id": str(qid), "model_id": "hand", "metadata": {}}
                               for qid, text in HAND_ANSWERS.items()])
    return {"root": root, "data": data, "model": model, "hand": hand}


def _evaluate(setup: dict[str, str], mlflow_uri: str, name: str, *extra: str) -> dict:
    from vitune.evaluation.run import run_evaluation

    cfg = load_config(EvalJobConfig, "tiny", [
        f"storage.root={setup['root']}", f"tracking.uri={mlflow_uri}", "tracking.experiment=bench-s3",
        "eval.benchmark=pope", f"eval.data={setup['data']}", "eval.images=null", f"eval.output={setup['root']}/{name}",
        "eval.num_actors=1", "eval.batch_size=8", "eval.max_new_tokens=3", "eval.model_folder=null", *extra])
    report = run_evaluation(cfg)
    assert storage.read_json(storage.join(report["output"], "report.json")) == json.loads(json.dumps(report))
    return report


def _mlflow_metrics(mlflow_uri: str, run_id: str) -> dict[str, float]:
    return MlflowClient(mlflow_uri).get_run(run_id).data.metrics


def test_pope_end_to_end_on_the_tiny_model_from_s3(pope_s3, ray_local, mlflow_server):
    report = _evaluate(pope_s3, mlflow_server, "generated", f"eval.model_folder={pope_s3['model']}")
    result = report["result"]
    assert (result["n"], result["missing"]) == (6, 0)
    assert set(result["splits"]) == {"random", "adversarial"}
    for split in result["splits"].values():
        assert split["n"] == 3 == split["tp"] + split["fp"] + split["tn"] + split["fn"]
        assert math.isclose(split["accuracy"], (split["tp"] + split["tn"]) / 3)
    # the answers in LLaVA's format, one per question, its prompt the question's text
    answers = storage.read_jsonl(storage.join(report["output"], ANSWERS_FILE))
    assert sorted(a["question_id"] for a in answers) == sorted(QUESTIONS)
    assert all(a["prompt"].endswith(SHORT_ANSWER_PROMPT) and isinstance(a["text"], str) for a in answers)
    assert report["inference"]["generated"] == 6 and report["inference"]["errors"] == 0
    md = storage.read_text(storage.join(report["output"], "report.md"))
    assert "## POPE" in md and "| random |" in md and "| adversarial |" in md
    metrics = _mlflow_metrics(mlflow_server, report["mlflow_run_id"])
    assert math.isclose(metrics["random.accuracy"], result["splits"]["random"]["accuracy"])
    assert metrics["inference.generated"] == 6
    # the answers file alone gives the same scores (what the official eval_pope.py would read)
    rescored = _evaluate(pope_s3, mlflow_server, "rescored",
                         f"eval.predictions={storage.join(report['output'], ANSWERS_FILE)}")
    assert rescored["result"] == result


def test_pope_scores_a_hand_made_answers_file_as_computed_by_hand(pope_s3, mlflow_server):
    report = _evaluate(pope_s3, mlflow_server, "hand", f"eval.predictions={pope_s3['hand']}")
    metrics = _mlflow_metrics(mlflow_server, report["mlflow_run_id"])
    for key, value in EXPECTED.items():
        assert math.isclose(metrics[key], value), key
    md = storage.read_text(storage.join(report["output"], "report.md"))
    assert "| random | 66.67 | 50.00 | 100.00 | 66.67 | 66.67 | 3 |" in md
