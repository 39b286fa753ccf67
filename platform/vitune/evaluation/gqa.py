"""GQA (testdev-balanced): compositional questions about scenes, exact match after LLaVA's normalisation.

Layout under ``eval.data`` (LLaVA's ``eval.zip`` + the GQA release; each name can be replaced by config):
``llava_gqa_testdev_balanced.jsonl`` (``eval.questions``), ``data/testdev_balanced_questions.json``
(``eval.references``: GQA's ``{question id: {answer, isBalanced, types: {structural, semantic}}}``) and
``data/images/`` (``eval.images``).

LLaVA's ``convert_gqa_for_eval.py`` turns an answer into a GQA prediction by stripping trailing periods and
lower-casing it; GQA's ``eval.py`` then counts a balanced question right when the prediction equals the
gold answer. Reported: accuracy, accuracy on binary (yes/no: every structural type but ``query``) and open
questions, and per structural and semantic type. A question without an answer is wrong and counted.

Answers (``eval.predictions``) may be the folder of ``<N>_<i>.jsonl`` chunks LLaVA's ``gqa.sh`` leaves;
they are merged in chunk order. Official output: ``official/testdev_balanced_predictions.json``
(``convert_gqa_for_eval.py``'s ``[{questionId, prediction}]``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import llava_format as fmt_io
from vitune.evaluation import official_formats
from vitune.evaluation.tables import fmt, metric_name, numbers, table

if TYPE_CHECKING:
    from vitune.evaluation.judge import Judge

log = logging.getLogger(__name__)

QUESTIONS_FILE = "llava_gqa_testdev_balanced.jsonl"
FOLDER = "GQA folder (llava_gqa_testdev_balanced.jsonl, data/testdev_balanced_questions.json, data/images/)"
TRUTH_FILE = "data/testdev_balanced_questions.json"
IMAGES_DIR = "data/images"


def normalize(text: str) -> str:
    """LLaVA's GQA prediction: trailing periods stripped, lower case."""
    return text.rstrip(".").lower()


def score(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]],
          truth: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracies (percent) over the balanced questions; a question missing from ``truth`` raises."""
    texts = fmt_io.match_answers(questions, answers)
    groups: dict[str, list[bool]] = defaultdict(list)
    rows = []
    for q, text in zip(questions, texts, strict=True):
        qid = str(q["question_id"])
        if qid not in truth:
            raise ValueError(f"GQA question {qid} is not in the ground-truth questions file")
        gold = truth[qid]
        if not gold.get("isBalanced", True):
            continue
        pred = normalize(text) if text is not None else None
        hit = pred == gold["answer"]
        types = gold.get("types") or {}
        structural, semantic = types.get("structural"), types.get("semantic")
        groups["all"].append(hit)
        if structural is not None:
            groups["open" if structural == "query" else "binary"].append(hit)
            groups[f"structural/{structural}"].append(hit)
        if semantic is not None:
            groups[f"semantic/{semantic}"].append(hit)
        rows.append({"question_id": q["question_id"], "answer": gold["answer"], "prediction": pred,
                     "correct": hit, "text": text})
    acc = {k: fmt_io.pct(sum(v), len(v)) for k, v in groups.items()}
    result = {"n": len(rows), "missing": sum(r["text"] is None for r in rows), "accuracy": acc.get("all"),
              "binary": acc.get("binary"), "open": acc.get("open"),
              "structural": {k.split("/", 1)[1]: v for k, v in sorted(acc.items()) if k.startswith("structural/")},
              "semantic": {k.split("/", 1)[1]: v for k, v in sorted(acc.items()) if k.startswith("semantic/")}}
    return result, rows


def run_gqa(cfg: EvalJobConfig, out: str, answer_fn: fmt_io.AnswerFn,
            judge: Judge | None = None) -> dict[str, Any]:
    """Questions and GQA's ground truth from ``eval.data`` → answers → accuracy."""
    ev = cfg.eval
    questions = fmt_io.read_benchmark_questions(ev, QUESTIONS_FILE, FOLDER)
    truth = storage.read_json(fmt_io.resolve(ev.data, ev.references, TRUTH_FILE))
    images = ev.images or storage.join(ev.data, IMAGES_DIR)
    report = fmt_io.answer_and_score(cfg, out, answer_fn, questions, images, lambda q, a: score(q, a, truth),
                                     write_official)
    log.info("GQA: accuracy %s over %d questions", report["result"]["accuracy"], report["result"]["n"])
    return report


def write_official(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]],
                   out: str) -> list[str]:
    """``official/testdev_balanced_predictions.json``, the file GQA's ``eval.py --tier testdev_balanced`` reads."""
    texts = fmt_io.match_answers(questions, answers)
    preds = [normalize(t) if t is not None else None for t in texts]
    rows = official_formats.gqa_predictions([q["question_id"] for q in questions], preds)
    return [official_formats.write_json(official_formats.official_uri(out, official_formats.GQA_FILE), rows)]


def markdown(result: Mapping[str, Any]) -> str:
    rows = [["accuracy", fmt(result["accuracy"])], ["binary", fmt(result["binary"])], ["open", fmt(result["open"])]]
    rows += [[f"structural: {k}", fmt(v)] for k, v in result["structural"].items()]
    rows += [[f"semantic: {k}", fmt(v)] for k, v in result["semantic"].items()]
    note = f"{result['n']} balanced questions, {result['missing']} without an answer (scored as wrong)."
    return f"## GQA (testdev-balanced) exact match, %\n\n{table(['', '%'], rows)}\n\n{note}\n"


def metrics(result: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float | None] = {k: result[k] for k in ("accuracy", "binary", "open", "missing")}
    out.update({metric_name("structural", k): v for k, v in result["structural"].items()})
    out.update({metric_name("semantic", k): v for k, v in result["semantic"].items()})
    return numbers(out)
