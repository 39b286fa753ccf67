"""VQAv2 (test-dev): short answers for the EvalAI server, written as LLaVA's ``convert_vqav2_for_submission.py``
writes them. The test splits have no public labels, so vitune reports coverage, not accuracy.

Layout under ``eval.data`` (LLaVA's ``eval.zip``; each name can be replaced by config):
``llava_vqav2_mscoco_test-dev2015.jsonl`` (``eval.questions``: ``{question_id, image, text, category}``, the
questions asked), ``llava_vqav2_mscoco_test2015.jsonl`` (``eval.references``: every question of test2015,
which the submission must list; when absent, the questions asked) and ``test2015/`` (``eval.images``).

Official output: ``official/vqav2_submission.json``, ``[{question_id, answer}]`` over the whole test split,
each answer through EvalAI's answer processor, ``""`` for a question not answered (``official_formats``).
Answers (``eval.predictions``) may be the folder of ``<N>_<i>.jsonl`` chunks LLaVA's ``vqav2.sh`` leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import llava_format as fmt_io
from vitune.evaluation import official_formats
from vitune.evaluation.tables import numbers, table

log = logging.getLogger(__name__)

QUESTIONS_FILE = "llava_vqav2_mscoco_test-dev2015.jsonl"
TEST_FILE = "llava_vqav2_mscoco_test2015.jsonl"
FOLDER = "VQAv2 folder (llava_vqav2_mscoco_test-dev2015.jsonl, llava_vqav2_mscoco_test2015.jsonl, test2015/)"
IMAGES_DIR = "test2015"


def score(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]]
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Coverage only (the labels are the server's): questions, answered, missing."""
    texts = fmt_io.match_answers(questions, answers)
    rows = [{"question_id": q["question_id"], "text": t} for q, t in zip(questions, texts, strict=True)]
    missing = sum(t is None for t in texts)
    return {"n": len(rows), "answered": len(rows) - missing, "missing": missing}, rows


def split_ids(test_uri: str, questions: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The question ids the submission lists: the whole test split's file, else the questions asked."""
    if storage.exists(test_uri):
        return [q["question_id"] for q in fmt_io.read_questions(test_uri)]
    log.warning("VQAv2: %s not found; the submission lists only the %d questions asked", test_uri, len(questions))
    return [q["question_id"] for q in questions]


def write_official(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]], out: str,
                   test_uri: str) -> list[str]:
    """``official/vqav2_submission.json`` over the whole test split; returns its URI."""
    texts = fmt_io.match_answers(questions, answers)
    answered = {q["question_id"]: t for q, t in zip(questions, texts, strict=True) if t is not None}
    rows = official_formats.vqa_submission(split_ids(test_uri, questions), answered)
    return [official_formats.write_json(official_formats.official_uri(out, official_formats.VQAV2_FILE), rows)]


def run_vqav2(cfg: EvalJobConfig, out: str, answer_fn: fmt_io.AnswerFn, judge: Any = None) -> dict[str, Any]:
    """Questions from ``eval.data`` → answers → the EvalAI submission file."""
    ev = cfg.eval
    questions = fmt_io.read_benchmark_questions(ev, QUESTIONS_FILE, FOLDER)
    test_uri = fmt_io.resolve(ev.data, ev.references, TEST_FILE)
    images = ev.images or storage.join(ev.data, IMAGES_DIR)
    report = fmt_io.answer_and_score(cfg, out, answer_fn, questions, images, score,
                                     lambda q, a, o: write_official(q, a, o, test_uri))
    log.info("VQAv2: %d of %d questions answered; submit %s to EvalAI", report["result"]["answered"],
             report["result"]["n"], report["result"].get("official_files"))
    return report


def markdown(result: Mapping[str, Any]) -> str:
    rows = [["questions", str(result["n"])], ["answered", str(result["answered"])],
            ["without an answer (submitted as \"\")", str(result["missing"])]]
    files = ", ".join(f"`{f}`" for f in result.get("official_files", []))
    return (f"## VQAv2 (test-dev): scored by the EvalAI server\n\n{table(['', ''], rows)}\n\n"
            f"Submission: {files or '–'}\n")


def metrics(result: Mapping[str, Any]) -> dict[str, float]:
    return numbers({"answered": result["answered"], "missing": result["missing"]})
