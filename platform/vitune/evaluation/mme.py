"""MME: yes/no questions, two per image, in 14 subtasks; scored as MME's ``eval_tool/calculation.py`` does.

Layout under ``eval.data`` (LLaVA's ``eval.zip`` + the MME release; each name can be replaced by config):
``llava_mme.jsonl`` (``eval.questions``: ``{question_id, image, text, category}``; ``question_id`` and
``image`` are ``<subtask>/<file>`` or ``<subtask>/images/<file>``, shared by an image's two questions) and
``MME_Benchmark_release_version/`` (``eval.references``, also the image root unless ``eval.images``), where
each image's ground truth is a text file of ``question<TAB>Yes|No`` lines: ``<subtask>/<stem>.txt``, or
``<subtask>/questions_answers_YN/<stem>.txt`` for subtasks whose images sit in ``images/``.

A question is looked up as LLaVA's ``convert_answer_to_mme.py`` does: its text without the short-answer
instruction, plus " Please answer yes or no." (with two spaces where the release has them). Answer rule
(``calculation.py``): lower case; "yes"/"no" as such, else "yes" or "no" found in the first four characters,
else "other" (wrong). Per subtask: acc = correct questions / questions, acc+ = images with both questions
right / images, score = 100·(acc + acc+) (at most 200); perception = the sum over its 10 subtasks,
cognition over its 4. A question without an answer counts as "other" and is counted.

Official output: ``official/mme/<subtask>.txt``, as ``convert_answer_to_mme.py`` writes it for
``calculation.py`` (``write_official``, ``official_formats.mme_results``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import llava_format as fmt_io
from vitune.evaluation import official_formats
from vitune.evaluation.tables import fmt, metric_name, numbers, table

if TYPE_CHECKING:
    from vitune.evaluation.judge import Judge

log = logging.getLogger(__name__)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
QUESTIONS_FILE = "llava_mme.jsonl"
FOLDER = "MME folder (llava_mme.jsonl, MME_Benchmark_release_version/)"
RELEASE_DIR = "MME_Benchmark_release_version"
YES_NO_SUFFIX = " Please answer yes or no."
_READERS = 16  # ground-truth files are small and many; read them concurrently (S3 round trips)


def truth_file(question_id: str) -> str:
    """The ground-truth file of an image, relative to the release folder."""
    parts = str(question_id).split("/")
    stem = parts[-1].split(".")[0]
    if len(parts) > 2 and parts[1] == "images":
        return f"{parts[0]}/questions_answers_YN/{stem}.txt"
    return f"{parts[0]}/{stem}.txt"


def read_truth(release_root: str, question_ids: Sequence[str]) -> dict[tuple[str, str], str]:
    """``(truth file, question) → "Yes"|"No"`` for the files of ``question_ids``."""
    files = sorted({truth_file(q) for q in question_ids})
    with ThreadPoolExecutor(max_workers=_READERS) as pool:
        texts = list(pool.map(lambda f: storage.read_text(storage.join(release_root, f)), files))
    truth = {}
    for name, text in zip(files, texts, strict=True):
        for line in text.splitlines():
            if line.strip():
                question, answer = line.strip().split("\t")
                truth[(name, question)] = answer
    return truth


def truth_question(text: str) -> str:
    """The question as the ground-truth files spell it (before the double-space fallback)."""
    q = text.replace(fmt_io.SHORT_ANSWER_PROMPT, "").strip()
    return q if YES_NO_SUFFIX.strip() in q else q + YES_NO_SUFFIX


def attach_truth(questions: Sequence[Mapping[str, Any]], release_root: str) -> list[dict[str, Any]]:
    """Questions with their ``label`` ("yes"/"no") from the release's files; a question not found raises."""
    truth = read_truth(release_root, [str(q["question_id"]) for q in questions])
    out = []
    for q in questions:
        name, asked = truth_file(str(q["question_id"])), truth_question(str(q["text"]))
        if (name, asked) not in truth:  # convert_answer_to_mme.py's fallback: two spaces before "Please"
            asked = asked.replace(YES_NO_SUFFIX, " " + YES_NO_SUFFIX)
        answer = truth.get((name, asked))
        if answer is None:
            raise ValueError(f"MME question {q['question_id']!r} {asked!r} is not in {release_root}/{name}")
        out.append({**q, "label": answer.strip().lower(), "truth_question": asked, "truth_answer": answer.strip()})
    return out


def parse_answer(text: str) -> str:
    """MME's reading of an answer: "yes", "no" or "other"."""
    pred = text.lower()
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _subtask(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    by_image: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_image[str(r["question_id"])].append(r["correct"])
    acc = sum(r["correct"] for r in rows) / len(rows)
    acc_plus = sum(all(v) for v in by_image.values()) / len(by_image)
    return {"n": len(rows), "images": len(by_image), "acc": 100 * acc, "acc_plus": 100 * acc_plus,
            "score": 100 * (acc + acc_plus), "other": sum(r["parsed"] == "other" for r in rows)}


def score(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]]
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Scores per subtask and the perception / cognition totals; questions need a ``label``."""
    texts = fmt_io.match_answers(questions, answers)
    rows = []
    for q, text in zip(questions, texts, strict=True):
        parsed = parse_answer(text) if text is not None else "other"
        subtask = str(q["question_id"]).split("/")[0]  # as convert_answer_to_mme.py names it
        rows.append({"question_id": q["question_id"], "subtask": subtask,
                     "label": q["label"], "parsed": parsed, "correct": parsed == q["label"], "text": text})
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["subtask"]].append(r)
    subtasks = {name: _subtask(groups[name]) for name in (*PERCEPTION, *COGNITION, *sorted(groups)) if name in groups}
    totals = {kind: sum(subtasks[s]["score"] for s in names if s in subtasks)
              for kind, names in (("perception", PERCEPTION), ("cognition", COGNITION))}
    missing = sum(t is None for t in texts)
    absent = [s for s in (*PERCEPTION, *COGNITION) if s not in subtasks]
    if absent:
        log.warning("MME: subtasks without questions (their totals are partial): %s", absent)
    return {"n": len(questions), "missing": missing, **totals, "subtasks": subtasks, "absent_subtasks": absent}, rows


def run_mme(cfg: EvalJobConfig, out: str, answer_fn: fmt_io.AnswerFn,
            judge: Judge | None = None) -> dict[str, Any]:
    """Questions from ``eval.data``, ground truth from the MME release → answers → scores."""
    ev = cfg.eval
    questions = fmt_io.read_benchmark_questions(ev, QUESTIONS_FILE, FOLDER)
    release = fmt_io.resolve(ev.data, ev.references, RELEASE_DIR)
    questions = attach_truth(questions, release)
    report = fmt_io.answer_and_score(cfg, out, answer_fn, questions, ev.images or release, score, write_official)
    log.info("MME: perception %.1f, cognition %.1f", report["result"]["perception"], report["result"]["cognition"])
    return report


def write_official(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]],
                   out: str) -> list[str]:
    """``official/mme/<subtask>.txt``, the folder MME's ``calculation.py --results_dir`` reads (questions need
    their truth, see ``attach_truth``); returns the URIs written."""
    texts = fmt_io.match_answers(questions, answers)
    rows = [{**q, "text": t} for q, t in zip(questions, texts, strict=True)]
    written = []
    for task, text in official_formats.mme_results(rows).items():
        uri = official_formats.official_uri(out, official_formats.MME_DIR, f"{task}.txt")
        storage.write_text(uri, text)
        written.append(uri)
    return written


def markdown(result: Mapping[str, Any]) -> str:
    header = ["subtask", "kind", "acc", "acc+", "score", "questions", "other"]
    rows = [[name, "perception" if name in PERCEPTION else "cognition" if name in COGNITION else "–",
             fmt(v["acc"]), fmt(v["acc_plus"]), fmt(v["score"]), str(v["n"]), str(v["other"])]
            for name, v in result["subtasks"].items()]
    head = f"Perception **{fmt(result['perception'])}** (of 2000), cognition **{fmt(result['cognition'])}** (of 800)."
    note = f"{result['n']} questions, {result['missing']} without an answer (scored as wrong)."
    if result["absent_subtasks"]:
        note += f" Subtasks absent: {', '.join(result['absent_subtasks'])}."
    return f"## MME\n\n{head}\n\n{table(header, rows)}\n\n{note}\n"


def metrics(result: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float | None] = {"perception": result["perception"], "cognition": result["cognition"],
                                    "missing": result["missing"]}
    for name, v in result["subtasks"].items():
        out.update({metric_name(name, k): v[k] for k in ("score", "acc", "acc_plus")})
    return numbers(out)
