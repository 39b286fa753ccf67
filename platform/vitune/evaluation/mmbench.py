"""MMBench (dev): multiple choice with LLaVA-1.5's prompt, option extraction, circular evaluation.

Input: the MMBench TSV (``eval.questions`` under ``eval.data``, default ``mmbench_dev_20230712.tsv``): columns
``index, question, hint, A..D, answer, category, l2-category, image`` (base64; a short value naming another
row's ``index`` means that row's image). The file already holds the circular copies of each question: the
same question with its options shifted, at ``index`` + k·1 000 000 (or with an explicit ``g_index``).

Prompt (LLaVA's ``model_vqa_mmbench.py --single-pred-prompt``): the hint and a newline when there is one,
the question, one ``X. option`` line per option, the image token first and "Answer with the option's letter
from the given choices directly." last. Options stop at the first missing one, and a cell counts as missing
where pandas reads it as NaN (empty, "nan", "None", "NA", ...), as in LLaVA's loader.

Option extraction (``eval.mmbench_rule``, ``mmbench_rules``): ``opencompass_2023`` (default), the 2023
OpenCompass rule LLaVA-1.5's published numbers came through, or ``vlmevalkit``, today's VLMEvalKit rule; the
answer read as the official spreadsheet round trip leaves it. The GPT-based matching stage is not run: an
answer matching nothing is wrong, and counted. The rule is named in the result.

Official output: ``official/<TSV stem>.xlsx``, the submission spreadsheet LLaVA's
``convert_mmbench_for_submission.py`` writes (``write_official``).

Circular evaluation: a question counts as right only when every copy of it is answered right. Reported:
circular accuracy overall, per ``category`` and per ``l2-category``, plus the single-pass accuracies over all
rows and over the originals (the rows whose ``index`` is their group's).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import logging
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import llava_format as fmt_io
from vitune.evaluation import mmbench_rules, official_formats
from vitune.evaluation.tables import fmt, metric_name, numbers, table

if TYPE_CHECKING:
    from vitune.evaluation.judge import Judge

log = logging.getLogger(__name__)

TSV_FILE = "mmbench_dev_20230712.tsv"
IMAGES_DIR = "images"  # under the output folder: the TSV's base64 images as files
LETTERS = "ABCD"
CIRCULAR_OFFSET = 1_000_000


def is_missing(value: str | None) -> bool:
    """A cell LLaVA's loader sees as missing: one of pandas' NaN strings, or "nan" / "none" in any case."""
    return value is None or value in mmbench_rules.PANDAS_NA or value.lower() in ("nan", "none")


def read_tsv(uri: str) -> list[dict[str, str]]:
    """The TSV's rows as dicts of strings (base64 image cells are large: the csv field limit is lifted)."""
    csv.field_size_limit(sys.maxsize)
    return list(csv.DictReader(io.StringIO(storage.read_text(uri)), delimiter="\t"))


def _question(row: Mapping[str, str], image_of: Mapping[str, str]) -> dict[str, Any]:
    options = []
    for letter in LETTERS:
        if is_missing(row.get(letter)):
            break
        options.append(row[letter])
    text = row["question"] if is_missing(row.get("hint")) else f"{row['hint']}\n{row['question']}"
    for letter, option in zip(LETTERS, options, strict=False):
        text += f"\n{letter}. {option}"
    index = int(float(row["index"]))
    image = row.get("image") or ""
    b64 = image_of.get(image, image) if len(image) <= 64 else image
    group = int(float(row["g_index"])) if row.get("g_index") else index % CIRCULAR_OFFSET
    return {"question_id": index, "g_index": group,
            "prompt": text, "text": f"{text}\n{fmt_io.MULTIPLE_CHOICE_PROMPT}",
            "options": dict(zip(LETTERS, options, strict=False)), "answer": (row.get("answer") or "").strip(),
            "category": row.get("category", ""), "l2_category": row.get("l2-category", ""),
            "image": hashlib.sha1(b64.encode()).hexdigest()[:20] + ".jpg", "image_b64": b64,
            # the cells the submission spreadsheet keeps, in the TSV's column order
            "tsv": {k: v for k, v in row.items() if k not in official_formats.MMBENCH_DROPPED}}


def load_questions(uri: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` rows as questions (``image`` = the file name its decoded image is written to)."""
    rows = read_tsv(uri)
    image_of = {r["index"]: r.get("image") or "" for r in rows if len(r.get("image") or "") > 64}
    questions = [_question(r, image_of) for r in rows[:limit]]
    unanswerable = [q["question_id"] for q in questions if q["answer"] not in q["options"]]
    if unanswerable:
        raise ValueError(f"{len(unanswerable)} MMBench rows have no answer among their options (a test split?), "
                         f"e.g. {unanswerable[:3]}; circular evaluation needs the dev set")
    return questions


def write_images(questions: Sequence[Mapping[str, Any]], folder: str) -> None:
    """Decode each distinct image once into ``folder`` (kept when already there, so reruns skip it)."""
    done: set[str] = set()
    for q in questions:
        name = q["image"]
        uri = storage.join(folder, name)
        if name not in done and not storage.exists(uri):
            storage.write_bytes(uri, base64.b64decode(q["image_b64"]))
        done.add(name)


def extract_option(text: str, options: Mapping[str, str], rule: str = mmbench_rules.DEFAULT_RULE) -> str | None:
    """The chosen letter ("Z": none of them, by VLMEvalKit's rule), or None, by the named rule."""
    return mmbench_rules.get(rule)(mmbench_rules.as_submitted(text), options)


def _accuracy(hits: Sequence[bool]) -> float | None:
    return fmt_io.pct(sum(hits), len(hits))


def score(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]],
          rule: str = mmbench_rules.DEFAULT_RULE) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Circular and single-pass accuracies (percent) and the failed-extraction count, options read by ``rule``."""
    mmbench_rules.get(rule)  # an unknown name fails before any work
    texts = fmt_io.match_answers(questions, answers, prompt_key="prompt")
    rows = []
    for q, text in zip(questions, texts, strict=True):
        letter = extract_option(text, q["options"], rule) if text is not None else None
        rows.append({"question_id": q["question_id"], "g_index": q["g_index"], "answer": q["answer"],
                     "parsed": letter, "correct": letter == q["answer"], "text": text,
                     "category": q["category"], "l2_category": q["l2_category"]})
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["g_index"]].append(r)
    circular: dict[str, list[bool]] = defaultdict(list)
    for members in groups.values():
        main = next((r for r in members if r["question_id"] == r["g_index"]), members[0])
        hit = all(r["correct"] for r in members)
        circular["all"].append(hit)
        circular[f"category/{main['category']}"].append(hit)
        circular[f"l2/{main['l2_category']}"].append(hit)
    sub = {k: _accuracy(v) for k, v in sorted(circular.items())}
    result = {
        "rule": rule, "n_questions": len(groups), "n_rows": len(rows), "circular_accuracy": sub.get("all"),
        "by_category": {k.split("/", 1)[1]: v for k, v in sub.items() if k.startswith("category/")},
        "by_l2_category": {k.split("/", 1)[1]: v for k, v in sub.items() if k.startswith("l2/")},
        "single_pass_accuracy": _accuracy([r["correct"] for r in rows]),
        "originals_accuracy": _accuracy([r["correct"] for r in rows if r["question_id"] == r["g_index"]]),
        "failed_extraction": sum(r["parsed"] is None and r["text"] is not None for r in rows),
        "missing": sum(r["text"] is None for r in rows),
    }
    return result, rows


def run_mmbench(cfg: EvalJobConfig, out: str, answer_fn: fmt_io.AnswerFn,
                judge: Judge | None = None) -> dict[str, Any]:
    """The dev TSV → images written under ``out`` → answers → circular accuracy, and the submission spreadsheet."""
    ev = cfg.eval
    if not ev.data:
        raise ValueError("eval.data: the MMBench folder (holding mmbench_dev_20230712.tsv) is required")
    tsv = fmt_io.resolve(ev.data, ev.questions, TSV_FILE)
    questions = load_questions(tsv, ev.limit)
    images = storage.join(out, IMAGES_DIR)
    if not ev.predictions:
        write_images(questions, images)
    slim = [{k: v for k, v in q.items() if k != "image_b64"} for q in questions]
    report = fmt_io.answer_and_score(cfg, out, answer_fn, slim, images,
                                     lambda q, a: score(q, a, ev.mmbench_rule),
                                     lambda q, a, o: write_official(q, a, o, tsv))
    result = report["result"]
    log.info("MMBench: circular accuracy %s over %d questions (%d rows), %s rule", result["circular_accuracy"],
             result["n_questions"], result["n_rows"], result["rule"])
    return report


def write_official(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]], out: str,
                   tsv_uri: str) -> list[str]:
    """The submission spreadsheet ``official/<TSV stem>.xlsx`` (see ``official_formats``); returns its URI."""
    texts = fmt_io.match_answers(questions, answers, prompt_key="prompt")
    columns = list(questions[0]["tsv"]) if questions else []
    data = official_formats.mmbench_submission(columns, [q["tsv"] for q in questions], texts,
                                               mmbench_rules.PANDAS_NA)
    stem = tsv_uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    uri = official_formats.official_uri(out, f"{stem}.xlsx")
    storage.write_bytes(uri, data)
    return [uri]


def markdown(result: Mapping[str, Any]) -> str:
    rows = [["circular accuracy", fmt(result["circular_accuracy"])],
            ["single pass, all rows", fmt(result["single_pass_accuracy"])],
            ["single pass, originals only", fmt(result["originals_accuracy"])]]
    rows += [[f"circular: {k}", fmt(v)] for k, v in result["by_l2_category"].items()]
    rows += [[f"circular: {k}", fmt(v)] for k, v in result["by_category"].items()]
    note = (f"Options read by the {result.get('rule', mmbench_rules.DEFAULT_RULE)} rule. "
            f"{result['n_questions']} questions in {result['n_rows']} rows; {result['failed_extraction']} answers "
            f"matched no option and {result['missing']} rows have no answer (both scored as wrong).")
    return f"## MMBench (dev), %\n\n{table(['', '%'], rows)}\n\n{note}\n"


def metrics(result: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float | None] = {k: result[k] for k in ("circular_accuracy", "single_pass_accuracy",
                                                           "originals_accuracy", "failed_extraction", "missing")}
    out.update({metric_name("l2", k): v for k, v in result["by_l2_category"].items()})
    out.update({metric_name("category", k): v for k, v in result["by_category"].items()})
    return numbers(out)
