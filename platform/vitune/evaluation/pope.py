"""POPE (object hallucination): yes/no questions in three splits, scored as LLaVA-1.5's ``eval_pope.py`` does.

Layout under ``eval.data`` (LLaVA's ``eval.zip`` + POPE's COCO files; each name can be replaced by config):
``llava_pope_test.jsonl`` (``eval.questions``: ``{question_id, image, text, category}``, ``text`` ends with
"Answer the question using a single word or phrase."), ``coco/`` (``eval.references``: POPE's
``coco_pope_<split>.json``, JSON Lines ``{question_id, image, text, label}``) and ``val2014/`` (``eval.images``).

The official script pairs a split's answers with its label file by position, so answers merged from
chunks or re-ordered would be scored against the wrong labels; here answers are matched to questions by
question id (and prompt), and a question to its split's label by content (same image, same question), so
no file's order matters. A question row may carry its own ``label`` instead. Errors name the file and line:
a label row without its fields, a question labelled twice, a question its label file lacks (and, from
``llava_format``, an answer for an unknown question id or a question answered twice).

Answer rule (``eval_pope.py``): keep the text before its first period, drop commas, split on spaces; a word
``No``, ``no`` or ``not`` makes it "no", anything else is "yes". Metrics per split, positive = "yes":
accuracy, precision, recall, F1 and the yes-ratio (share of "yes" answers); ``average`` is their mean over
the splits present (LLaVA-1.5 reports the average F1). Questions without an answer are left out and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import llava_format as fmt_io
from vitune.evaluation.tables import fmt, metric_name, numbers, table

if TYPE_CHECKING:
    from vitune.evaluation.judge import Judge

log = logging.getLogger(__name__)

SPLITS = ("random", "popular", "adversarial")
QUESTIONS_FILE = "llava_pope_test.jsonl"
FOLDER = "POPE folder (llava_pope_test.jsonl, coco/, val2014/)"
LABELS_DIR = "coco"
IMAGES_DIR = "val2014"
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def label_file(split: str) -> str:
    return f"coco_pope_{split}.json"


def yes_no(text: str) -> str:
    """LLaVA's reading of a POPE answer: "no" when its first sentence has the word No, no or not."""
    first = text.split(".")[0]
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def _question_line(text: str) -> str:
    return text.replace(fmt_io.SHORT_ANSWER_PROMPT, "").strip()


def read_labels(uri: str) -> dict[tuple[str, str], str]:
    """A POPE label file as ``(image, question) → label``; a pair labelled twice raises naming both lines."""
    labels: dict[tuple[str, str], str] = {}
    lines: dict[tuple[str, str], int] = {}
    for lineno, row in fmt_io.numbered_jsonl(uri):
        if not {"image", "text", "label"} <= set(row):
            raise ValueError(f"{uri} line {lineno}: a label row needs image, text and label")
        key = (str(row["image"]), str(row["text"]).strip())
        if key in lines:
            raise ValueError(f"{uri} line {lineno}: {key[0]} {key[1]!r} is labelled again (first at line "
                             f"{lines[key]})")
        labels[key], lines[key] = str(row["label"]), lineno
    return labels


def attach_labels(questions: Sequence[dict[str, Any]], labels_root: str) -> list[dict[str, Any]]:
    """Questions with their ``label``: their own, or their split's label for the same image and question
    (found by content, so neither file's order matters); a question its split's file lacks raises."""
    out = [dict(q) for q in questions]
    for split in sorted({str(q.get("category")) for q in out if "label" not in q}):
        uri = storage.join(labels_root, label_file(split))
        labels = read_labels(uri)
        for q in out:
            if "label" not in q and str(q.get("category")) == split:
                key = (str(q["image"]), _question_line(q["text"]))
                if key not in labels:
                    raise ValueError(f"POPE question {q['question_id']} ({split}: {key[0]} {key[1]!r}) is not "
                                     f"in its label file {uri}")
                q["label"] = labels[key]
    return out


def confusion_metrics(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``[(prediction, label)]`` of "yes"/"no" → counts and the five metrics (None where undefined)."""
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t != "yes" for p, t in pairs)
    tn = sum(p == "no" and t != "yes" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = None
    if precision is not None and recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": (tp + tn) / n if n else None,
            "precision": precision, "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / n if n else None}


def score(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]]
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics per split and their average; questions need a ``label`` (see ``attach_labels``)."""
    texts = fmt_io.match_answers(questions, answers)
    rows, pairs = [], {}
    for q, text in zip(questions, texts, strict=True):
        split = str(q.get("category"))
        label = "yes" if str(q["label"]).strip().lower() == "yes" else "no"
        pred = yes_no(text) if text is not None else None
        if pred is not None:
            pairs.setdefault(split, []).append((pred, label))
        rows.append({"question_id": q["question_id"], "split": split, "label": label, "parsed": pred,
                     "correct": pred == label, "text": text})
    by_split = {s: confusion_metrics(pairs[s]) for s in (*SPLITS, *sorted(pairs)) if s in pairs}
    average = {}
    for m in METRICS:
        vals = [v[m] for v in by_split.values() if v[m] is not None]
        average[m] = sum(vals) / len(vals) if vals else None
    missing = sum(t is None for t in texts)
    if missing:
        log.warning("POPE: %d of %d questions have no answer (left out)", missing, len(questions))
    return {"n": len(questions), "missing": missing, "splits": by_split, "average": average}, rows


def run_pope(cfg: EvalJobConfig, out: str, answer_fn: fmt_io.AnswerFn,
             judge: Judge | None = None) -> dict[str, Any]:
    """Questions and labels from ``eval.data`` → answers (generated or ``eval.predictions``) → metrics."""
    ev = cfg.eval
    questions = fmt_io.read_benchmark_questions(ev, QUESTIONS_FILE, FOLDER)
    questions = attach_labels(questions, fmt_io.resolve(ev.data, ev.references, LABELS_DIR))
    images = ev.images or storage.join(ev.data, IMAGES_DIR)
    report = fmt_io.answer_and_score(cfg, out, answer_fn, questions, images, score)
    log.info("POPE: average F1 %s over splits %s", report["result"]["average"]["f1"], list(report["result"]["splits"]))
    return report


def markdown(result: Mapping[str, Any]) -> str:
    header = ["split", "accuracy", "precision", "recall", "F1", "yes-ratio", "n"]
    rows = [[s, *[fmt(100 * v[m] if v[m] is not None else None) for m in METRICS], str(v["n"])]
            for s, v in result["splits"].items()]
    avg = result["average"]
    rows.append(["average", *[fmt(100 * avg[m] if avg[m] is not None else None) for m in METRICS], ""])
    note = f"{result['n']} questions, {result['missing']} without an answer (left out)."
    return f"## POPE, % (positive = yes)\n\n{table(header, rows)}\n\n{note}\n"


def metrics(result: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float | None] = {metric_name("average", m): result["average"][m] for m in METRICS}
    for split, v in result["splits"].items():
        out.update({metric_name(split, m): v[m] for m in METRICS})
    out["missing"] = result["missing"]
    return numbers(out)
