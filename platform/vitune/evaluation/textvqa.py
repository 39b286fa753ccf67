"""TextVQA (val): reading text in images, prompted with reference OCR tokens as LLaVA-1.5 does, VQA accuracy.

Layout under ``eval.data`` (LLaVA's ``eval.zip`` + the TextVQA release; each name can be replaced by config):
``llava_textvqa_val_v051_ocr.jsonl`` (``eval.questions``: ``{question_id (= the image id), image, text}``),
``TextVQA_0.5.1_val.json`` (``eval.references``: ``{"data": [{image_id, question, answers (10)}]}``) and
``train_images/`` (``eval.images``).

LLaVA-1.5's prompt (``build_prompt``): the question, ``Reference OCR token: `` with the image's OCR tokens
joined by ", " (empty when there are none), then "Answer the question using a single word or phrase.", one
per line. As LLaVA's ``eval_textvqa.py`` does, an answer is matched to its annotation on (image id, question
in lower case), the question read back from the prompt; the score is the VQA accuracy with the standard
answer normalisation (``vqa_normalize``), averaged over questions. A question without an answer scores 0
and is counted.

Official output: ``official/textvqa_submission.json``, EvalAI's ``[{question_id, answer}]`` with the
annotations' question ids and answers through EvalAI's processor (``official_formats``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import llava_format as fmt_io
from vitune.evaluation import official_formats
from vitune.evaluation.tables import fmt, numbers, table
from vitune.evaluation.vqa_normalize import normalize_vqa_answer, vqa_accuracy

if TYPE_CHECKING:
    from vitune.evaluation.judge import Judge

log = logging.getLogger(__name__)

QUESTIONS_FILE = "llava_textvqa_val_v051_ocr.jsonl"
FOLDER = "TextVQA folder (llava_textvqa_val_v051_ocr.jsonl, TextVQA_0.5.1_val.json, train_images/)"
ANNOTATIONS_FILE = "TextVQA_0.5.1_val.json"
IMAGES_DIR = "train_images"
OCR_LINE = "Reference OCR token: "
_OCR_PROMPT_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def build_prompt(question: str, ocr_tokens: Sequence[str]) -> str:
    """LLaVA-1.5's TextVQA prompt for a question and its image's OCR tokens."""
    return f"{question}\n{OCR_LINE}{', '.join(ocr_tokens)}\n{fmt_io.SHORT_ANSWER_PROMPT}"


def question_of(prompt: str) -> str:
    """The question inside a prompt, in lower case, by the rules of LLaVA's ``eval_textvqa.py``."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = _OCR_PROMPT_QUESTION.search(prompt)
        if m is None:
            raise ValueError(f"TextVQA prompt has no 'Question: ... Short answer:' part: {prompt!r}")
        question = m.group(1)
    elif OCR_LINE in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith(OCR_LINE.strip()) else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"cannot find the question in TextVQA prompt {prompt!r}")
    return question.lower()


def annotation_rows(uri: str) -> list[dict[str, Any]]:
    """The annotation records of a TextVQA JSON (``{"data": [...]}``, or the list itself)."""
    data = storage.read_json(uri)
    return data["data"] if isinstance(data, dict) else data


def _key(row: Mapping[str, Any]) -> tuple[str, str]:
    return str(row["image_id"]), str(row["question"]).lower()


def read_annotations(uri: str | None = None, rows: Sequence[Mapping[str, Any]] | None = None
                     ) -> dict[tuple[str, str], list[str]]:
    """``(image id, question in lower case) → the human answers``, from ``uri`` or already read ``rows``."""
    rows = annotation_rows(uri) if rows is None else rows
    return {_key(a): [str(x) for x in a["answers"]] for a in rows}


def score(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]],
          annotations: Mapping[tuple[str, str], Sequence[str]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Mean VQA accuracy (percent); a question with no annotation raises, one with no answer scores 0."""
    texts = fmt_io.match_answers(questions, answers)
    rows = []
    for q, text in zip(questions, texts, strict=True):
        key = (str(q["question_id"]), question_of(str(q["text"])))
        if key not in annotations:
            raise ValueError(f"TextVQA question {key} has no annotation")
        humans = annotations[key]
        acc = vqa_accuracy(text, humans) if text is not None else 0.0
        rows.append({"question_id": q["question_id"], "question": key[1], "accuracy": acc, "text": text,
                     "normalized": normalize_vqa_answer(text) if text is not None else None})
    missing = sum(t is None for t in texts)
    total = sum(r["accuracy"] for r in rows)
    return {"n": len(rows), "missing": missing, "accuracy": fmt_io.pct(total, len(rows))}, rows


def run_textvqa(cfg: EvalJobConfig, out: str, answer_fn: fmt_io.AnswerFn,
                judge: Judge | None = None) -> dict[str, Any]:
    """Questions (with OCR tokens) and annotations from ``eval.data`` → answers → VQA accuracy."""
    ev = cfg.eval
    questions = fmt_io.read_benchmark_questions(ev, QUESTIONS_FILE, FOLDER)
    rows = annotation_rows(fmt_io.resolve(ev.data, ev.references, ANNOTATIONS_FILE))
    annotations = read_annotations(rows=rows)
    images = ev.images or storage.join(ev.data, IMAGES_DIR)
    report = fmt_io.answer_and_score(cfg, out, answer_fn, questions, images,
                                     lambda q, a: score(q, a, annotations),
                                     lambda q, a, o: write_official(q, a, o, rows))
    log.info("TextVQA: accuracy %s over %d questions", report["result"]["accuracy"], report["result"]["n"])
    return report


def write_official(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]], out: str,
                   annotations: Sequence[Mapping[str, Any]]) -> list[str]:
    """``official/textvqa_submission.json`` (EvalAI's ``[{question_id, answer}]``, ids from the annotations);
    nothing when the annotations carry no ``question_id``."""
    ids = {_key(a): a.get("question_id") for a in annotations}
    if any(v is None for v in ids.values()):
        log.warning("TextVQA: the annotations have no question_id; no submission file written")
        return []
    texts = fmt_io.match_answers(questions, answers)
    keys = [(str(q["question_id"]), question_of(str(q["text"]))) for q in questions]
    answered = {ids[k]: t for k, t in zip(keys, texts, strict=True) if t is not None}
    rows = official_formats.vqa_submission([ids[k] for k in keys], answered)
    return [official_formats.write_json(official_formats.official_uri(out, official_formats.TEXTVQA_FILE), rows)]


def markdown(result: Mapping[str, Any]) -> str:
    rows = [["VQA accuracy, %", fmt(result["accuracy"])], ["questions", str(result["n"])],
            ["without an answer (scored 0)", str(result["missing"])]]
    return f"## TextVQA (val, with reference OCR tokens)\n\n{table(['', ''], rows)}\n"


def metrics(result: Mapping[str, Any]) -> dict[str, float]:
    return numbers({"accuracy": result["accuracy"], "missing": result["missing"]})
