"""The files each benchmark's official tooling takes, written from vitune's questions and answers.

All go under ``<output>/official/``; each benchmark's runner calls its writer after scoring, and the URIs
written are listed in the result (``official_files``). The rules, from the official code:

- **MMBench** ``<TSV stem>.xlsx``: LLaVA ``scripts/convert_mmbench_for_submission.py`` — the TSV's rows
  without ``hint, category, source, image, comment, l2-category``, a ``prediction`` column inserted as the
  7th (the answer text as generated; no answer → empty), one sheet, no index column. What the MMBench server
  and OpenCompass' ``tools/eval_mmbench.py`` read.
- **MME** ``mme/<subtask>.txt``: LLaVA's ``convert_answer_to_mme.py`` (in its ``eval.zip``) — per subtask one
  ``<image stem>.txt<TAB>question<TAB>Yes|No<TAB>answer`` line per question, the question as the release's
  ground truth spells it; MME's ``eval_tool/calculation.py --results_dir`` pairs consecutive lines as one
  image's two questions, so an image's lines are kept together, an unanswered question is written with an
  empty answer (read as "other", wrong, as vitune scores it) and tabs / line breaks inside an answer
  become spaces (they would split the line).
- **GQA** ``testdev_balanced_predictions.json``: LLaVA ``scripts/convert_gqa_for_eval.py`` — a JSON list of
  ``{questionId, prediction}``, the prediction with trailing periods stripped and lower-cased; GQA's
  ``eval.py --tier testdev_balanced`` refuses a file that misses a balanced question, so an unanswered one is
  written with an empty prediction (wrong, as vitune scores it).
- **TextVQA** ``textvqa_submission.json`` and **VQAv2** ``vqav2_submission.json``: LLaVA
  ``scripts/convert_vqav2_for_submission.py`` — a JSON list of ``{question_id, answer}``, the answer through
  EvalAI's answer processor (``vqa_normalize.normalize_vqa_answer``), every question of the split present,
  ``""`` where there is no answer. TextVQA's ``question_id`` is the annotation's (LLaVA's question file keys
  TextVQA by image id).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from vitune import storage
from vitune.evaluation import xlsx
from vitune.evaluation.vqa_normalize import normalize_vqa_answer
from vitune.tracking import Tracker

OFFICIAL_DIR = "official"
MMBENCH_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
MMBENCH_PREDICTION_COLUMN = 6  # convert_mmbench_for_submission.py: cur_df.insert(6, 'prediction', None)
MME_DIR = "mme"
GQA_FILE = "testdev_balanced_predictions.json"
TEXTVQA_FILE = "textvqa_submission.json"
VQAV2_FILE = "vqav2_submission.json"


def official_uri(out: str, *parts: str) -> str:
    return storage.join(out, OFFICIAL_DIR, *parts)


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").replace("\t", " ")


# --- MMBench ---

def mmbench_columns(tsv_columns: Sequence[str]) -> list[str]:
    """The submission's columns: the TSV's without the dropped ones, ``prediction`` as the 7th."""
    kept = [c for c in tsv_columns if c not in MMBENCH_DROPPED]
    kept.insert(min(MMBENCH_PREDICTION_COLUMN, len(kept)), "prediction")
    return kept


def _mmbench_cell(column: str, value: str | None, is_na: frozenset[str]) -> xlsx.Cell:
    if value is None or value in is_na:
        return None  # pandas read it as NaN, and to_excel leaves NaN cells empty
    if column in ("index", "g_index"):
        return int(float(value))
    return value


def mmbench_submission(tsv_columns: Sequence[str], rows: Sequence[Mapping[str, str]],
                       predictions: Sequence[str | None], is_na: frozenset[str]) -> bytes:
    """The spreadsheet for ``rows`` (TSV rows as strings) and their predictions (None: no answer)."""
    columns = mmbench_columns(tsv_columns)
    table: list[list[xlsx.Cell]] = [list(columns)]
    for row, pred in zip(rows, predictions, strict=True):
        table.append([pred if c == "prediction" else _mmbench_cell(c, row.get(c), is_na) for c in columns])
    return xlsx.workbook(table)


# --- MME ---

def mme_results(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{subtask: text of <subtask>.txt}`` from ``{question_id, truth_question, truth_answer, text}`` rows
    (``text`` None: no answer); an image's questions stay on consecutive lines, in first-seen order."""
    by_task: dict[str, dict[str, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        qid = str(r["question_id"])
        by_task[qid.split("/")[0]][qid].append(r)
    out = {}
    for task, images in by_task.items():
        lines = []
        for qid, questions in images.items():
            name = qid.split("/")[-1].split(".")[0] + ".txt"
            for q in questions:
                answer = _one_line(q["text"]) if q["text"] is not None else ""
                lines.append(f"{name}\t{q['truth_question']}\t{q['truth_answer']}\t{answer}\n")
        out[task] = "".join(lines)
    return out


# --- GQA ---

def gqa_predictions(question_ids: Sequence[Any], predictions: Sequence[str | None]) -> list[dict[str, Any]]:
    """convert_gqa_for_eval.py's list from normalised predictions (``gqa.normalize``); None → ``""``."""
    return [{"questionId": qid, "prediction": pred if pred is not None else ""}
            for qid, pred in zip(question_ids, predictions, strict=True)]


# --- TextVQA, VQAv2 ---

def vqa_submission(question_ids: Sequence[Any], answers: Mapping[Any, str]) -> list[dict[str, Any]]:
    """EvalAI's list: every question of ``question_ids`` with its processed answer, ``""`` where none."""
    return [{"question_id": qid, "answer": normalize_vqa_answer(answers[qid]) if qid in answers else ""}
            for qid in question_ids]


def write_json(uri: str, rows: Any) -> str:
    """Compact JSON, as the official converters ``json.dump`` it."""
    storage.write_text(uri, json.dumps(rows, ensure_ascii=False))
    return uri


def log_to_mlflow(tracker: Tracker, out: str, uris: Sequence[str]) -> None:
    """The official files as artifacts of the evaluation's run, under ``eval/official/`` as under ``out``."""
    if not tracker.active or not uris:
        return
    root = official_uri(out).rstrip("/") + "/"
    with tempfile.TemporaryDirectory(prefix="vitune-official-") as tmp:
        for uri in uris:
            rel = uri[len(root):] if uri.startswith(root) else uri.rsplit("/", 1)[-1]
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(storage.read_bytes(uri))
        tracker.log_artifacts(tmp, f"eval/{OFFICIAL_DIR}")
