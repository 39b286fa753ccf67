"""The official tools' reading and scoring, re-implemented for the tests from their documented behaviour, so a
file vitune writes can be checked the way the official tooling would check it (none of them installs here).

- ``read_xlsx``: what ``pandas.read_excel`` gives for a one-sheet workbook (empty and NaN-spelled cells → None).
- ``mmbench_2023``: OpenCompass' 2023 ``tools/eval_mmbench.py`` without its ChatGPT stage: predictions as
  ``str``, the rule-based ``can_infer``, circular groups by ``index % 1e6``, accuracy over the main rows.
- ``mme_calculation``: MME's ``eval_tool/calculation.py`` over a results folder.
- ``gqa_eval``: GQA's ``eval.py`` accuracy on balanced questions (every balanced question needs a prediction).
- ``vqa_accuracy``: EvalAI's VQA accuracy (leave-one-out, min(1, matches / 3)) on already-processed answers.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from xml.etree import ElementTree

_NS = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _col(ref: str) -> int:
    n = 0
    for ch in re.match(r"[A-Z]+", ref).group(0):
        n = n * 26 + ord(ch) - 64
    return n - 1


def read_xlsx(data: bytes) -> list[dict]:
    """The first sheet's rows as dicts keyed by the header row."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        root = ElementTree.fromstring(z.read("xl/worksheets/sheet1.xml"))
    grid = []
    for row in root.iter(f"{{{_NS['m']}}}row"):
        cells = {}
        for c in row.findall("m:c", _NS):
            if c.get("t") == "inlineStr":
                value = "".join(t.text or "" for t in c.iter(f"{{{_NS['m']}}}t"))
                cells[_col(c.get("r"))] = None if value in _PANDAS_NA else value
            else:
                text = c.find("m:v", _NS).text
                cells[_col(c.get("r"))] = int(text) if re.fullmatch(r"-?\d+", text) else float(text)
        grid.append(cells)
    header = [grid[0][i] for i in range(len(grid[0]))]
    return [{h: cells.get(i) for i, h in enumerate(header)} for cells in grid[1:]]


def _can_infer_2023(answer: str, choices: dict) -> str | bool:
    splits = answer.split()
    letters = [c for c in "ABCDE" if c in splits]
    if len(letters) == 1 and not ("A" in splits and len(splits) > 3):
        return letters[0]
    for pattern in (r"([A-E])\.", r"([A-E]),", r"([A-E]):", r"([A-E])\)", r"([A-E])\)\.", r"\(([A-E])\)",
                    r"\(([A-E])\)\.", r":([A-E])", r":([A-E]),", r":([A-E])\.", r":([A-E])\)", r":([A-E])\)\."):
        found = {m.group(1) for w in splits if (m := re.fullmatch(pattern, w))}
        if len(found) == 1:
            return found.pop()
    hits = [k for k, v in choices.items() if str(v).lower() in answer.lower()]
    return hits[0] if len(hits) == 1 else False


def mmbench_2023(submission: list[dict], meta: list[dict]) -> float:
    """Circular accuracy (%) of a submission spreadsheet's rows against the TSV's rows (``meta``)."""
    answer = {int(m["index"]): m["answer"] for m in meta}
    rows = sorted(submission, key=lambda r: r["index"])
    for r in rows:
        r["prediction"] = "nan" if r["prediction"] is None else str(r["prediction"])  # str(NaN)
    hits = []
    for main in (r for r in rows if r["index"] < 1_000_000):
        group = [r for r in rows if r["index"] % 1_000_000 == main["index"]]
        ok = True
        for r in group:
            choices = {c: r[c] for c in "ABCD" if r.get(c) is not None}
            ok = ok and _can_infer_2023(r["prediction"], choices) == answer[r["index"]]
        hits.append(ok)
    return 100.0 * sum(hits) / len(hits)


def _parse_mme(pred: str) -> str:
    if pred in ("yes", "no"):
        return pred
    return "yes" if "yes" in pred[:4] else "no" if "no" in pred[:4] else "other"


def mme_calculation(results_dir: Path, tasks: list[str]) -> dict[str, float]:
    """``{task: score}`` as ``calculation.py`` prints them: lines in pairs, score = 100·acc + 100·acc+."""
    scores = {}
    for task in tasks:
        lines = (results_dir / f"{task}.txt").read_text().splitlines(keepends=True)
        correct = plus = 0
        for i in range(0, len(lines), 2):
            pair = lines[i:i + 2]
            assert len(pair) == 2
            right = 0
            for line in pair:
                _img, _question, gt, pred = line.split("\t")
                right += _parse_mme(pred.lower()) == gt.lower()
            correct += right
            plus += right == 2
        scores[task] = 100 * correct / len(lines) + 100 * plus / (len(lines) / 2)
    return scores


def gqa_eval(predictions: list[dict], questions: dict) -> float:
    """GQA's ``eval.py`` accuracy (%) over the balanced questions."""
    pred = {p["questionId"]: p["prediction"] for p in predictions}
    balanced = [qid for qid, q in questions.items() if q["isBalanced"]]
    missing = [qid for qid in balanced if qid not in pred]
    if missing:
        raise AssertionError(f"no prediction for question {missing[0]}")
    return 100.0 * sum(pred[qid] == questions[qid]["answer"] for qid in balanced) / len(balanced)


def vqa_accuracy(answer: str, humans: list[str]) -> float:
    """EvalAI's accuracy of a processed answer against processed human answers."""
    subsets = [humans[:i] + humans[i + 1:] for i in range(len(humans))]
    return sum(min(1.0, s.count(answer) / 3) for s in subsets) / len(subsets)
