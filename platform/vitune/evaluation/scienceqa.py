"""ScienceQA: the official layout, LLaVA's prompt formats, answer-letter extraction, accuracy by category.

Layout (any URI): ``problems.json`` ``{pid: {question, choices, answer (index), hint, image, subject,
grade, split, lecture, solution}}``, ``pid_splits.json`` ``{split: [pid, ...]}`` and
``images/<split>/<pid>/<image>``.

Prompt formats (facts from LLaVA's eval scripts; the wording here is ours only where marked):

- ``CQM-A`` (LLaVA v1.5 eval): optional ``Context: <hint>`` line, the question, one ``X. choice`` line per
  option, then "Answer with the option's letter from the given choices directly."
- ``QCM-LEA`` (the paper's ScienceQA model): ``<question>\\nContext: <hint or N/A>\\nOptions: (A) .. (B) ..``;
  the model answers with lecture, explanation and "The answer is X."

Both put ``<image>`` first when the problem has an image. Categories follow the ScienceQA paper's
table: subject NAT/SOC/LAN; context TXT (has a text hint), IMG (has an image), NO (neither) — a
problem with both counts under TXT and IMG; grade G1-6 / G7-12.

The judge ensemble (the paper's 92.53%): a text-only judge answers every problem; where its letter
and ours differ (or either failed), the judge is asked again with both answers to decide. A decision it
fails to state falls back to our letter, then to its own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitune import storage
from vitune.evaluation import llava_format as fmt_io
from vitune.evaluation.inference import single_turn
from vitune.evaluation.scienceqa_official import extract_answer_official
from vitune.evaluation.tables import fmt, table

if TYPE_CHECKING:
    from vitune.config import EvalJobConfig
    from vitune.evaluation.judge import Judge

log = logging.getLogger(__name__)

OPTIONS = "ABCDE"
SINGLE_LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
PROMPT_FORMATS = ("CQM-A", "QCM-LEA")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")

_ANSWER_IS = re.compile(r"(?i:the answer is) \(?([A-Z])\)?(?![A-Za-z])")
_BARE = re.compile(r"^\(?([A-Z])\)?\.?$")
_PREFIX = re.compile(r"^([A-Z])\. ")


@dataclass(frozen=True)
class Problem:
    pid: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    hint: str
    image: str | None  # file name under images/<split>/<pid>/
    subject: str
    grade: str
    lecture: str = ""
    solution: str = ""

    @property
    def letter(self) -> str:
        return OPTIONS[self.answer]

    def categories(self) -> list[str]:
        """The paper's table columns this problem counts under."""
        cats = [SUBJECTS[self.subject]]
        if self.hint.strip():
            cats.append("TXT")
        if self.image:
            cats.append("IMG")
        if not self.hint.strip() and not self.image:
            cats.append("NO")
        cats.append("G1-6" if int(self.grade.removeprefix("grade")) <= 6 else "G7-12")
        return cats


def _problem(pid: str, raw: Any) -> Problem:
    def bad(msg: str) -> ValueError:
        return ValueError(f"ScienceQA problem {pid}: {msg}")

    if not isinstance(raw, dict):
        raise bad(f"expected an object, got {type(raw).__name__}")
    choices = raw.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(OPTIONS):
        raise bad(f"choices must be a list of 2..{len(OPTIONS)} options, got {choices!r}")
    answer = raw.get("answer")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise bad(f"answer must index the {len(choices)} choices, got {answer!r}")
    subject = raw.get("subject")
    if subject not in SUBJECTS:
        raise bad(f"subject must be one of {sorted(SUBJECTS)}, got {subject!r}")
    grade = str(raw.get("grade", ""))
    if not re.fullmatch(r"grade(1[0-2]|[1-9])", grade):
        raise bad(f"grade must be grade1..grade12, got {grade!r}")
    return Problem(pid=pid, question=str(raw.get("question", "")), choices=tuple(str(c) for c in choices),
                   answer=answer, hint=str(raw.get("hint") or ""), image=raw.get("image") or None,
                   subject=subject, grade=grade, lecture=str(raw.get("lecture") or ""),
                   solution=str(raw.get("solution") or ""))


def load_problems(root: str, split: str = "test", limit: int | None = None) -> list[Problem]:
    """The problems of ``split`` in ``pid_splits.json`` order; errors name the pid and the field."""
    splits = storage.read_json(storage.join(root, "pid_splits.json"))
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {root}/pid_splits.json (have: {sorted(splits)})")
    problems = storage.read_json(storage.join(root, "problems.json"))
    pids = [str(p) for p in splits[split]][:limit]
    missing = [p for p in pids if p not in problems]
    if missing:
        raise ValueError(f"{len(missing)} pids of split {split!r} are not in problems.json, e.g. {missing[:3]}")
    return [_problem(pid, problems[pid]) for pid in pids]


def build_prompt(problem: Problem, prompt_format: str = "CQM-A") -> str:
    """The question text in one of LLaVA's formats (without the image token)."""
    if prompt_format == "CQM-A":
        lines = [f"Context: {problem.hint}"] if problem.hint.strip() else []
        lines.append(problem.question)
        lines += [f"{OPTIONS[i]}. {c}" for i, c in enumerate(problem.choices)]
        lines.append(SINGLE_LETTER_PROMPT)
        return "\n".join(lines)
    if prompt_format == "QCM-LEA":
        options = " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem.choices))
        text = f"{problem.question}\nContext: {problem.hint.strip() or 'N/A'}\nOptions: {options}"
        return text.replace("  ", " ").strip()
    raise ValueError(f"unknown ScienceQA prompt format {prompt_format!r}; valid: {', '.join(PROMPT_FORMATS)}")


def build_requests(problems: Sequence[Problem], prompt_format: str, images_root: str) -> list[dict[str, Any]]:
    """Batch-inference requests, one per problem, keyed by pid."""
    out = []
    for p in problems:
        image = storage.join(images_root, p.pid, p.image) if p.image else None
        out.append({"id": p.pid, "image": image, "conversations": single_turn(build_prompt(p, prompt_format),
                                                                              image is not None)})
    return out


def extract_answer(text: str | None, num_choices: int = len(OPTIONS)) -> str | None:
    """The answer letter, or None (failed). Accepted: a bare letter (``B``, ``B.``, ``(B)``), an ``X. ``
    prefix (``B. slippery``), or one stated ``The answer is X.`` (several stating different letters fail).
    A letter beyond the problem's options fails too.
    """
    if not text:
        return None
    text = text.strip()
    letter = None
    if m := _BARE.match(text):
        letter = m.group(1)
    elif m := _PREFIX.match(text):
        letter = m.group(1)
    else:
        found = set(_ANSWER_IS.findall(text))
        if len(found) == 1:
            letter = found.pop()
    if letter is None or letter not in OPTIONS[:num_choices]:
        return None
    return letter


def _tally(problems: Sequence[Problem], letters: Mapping[str, str | None]) -> dict[str, Any]:
    """Accuracy (percent) overall and per category, plus the failed-extraction count."""
    counts = {c: [0, 0] for c in CATEGORIES}  # category → [correct, n]
    correct = failed = 0
    for p in problems:
        letter = letters.get(p.pid)
        hit = letter == p.letter
        correct += hit
        failed += letter is None
        for c in p.categories():
            counts[c][0] += hit
            counts[c][1] += 1
    n = len(problems)
    return {
        "n": n,
        "correct": correct,
        "accuracy": 100.0 * correct / n if n else 0.0,
        "failed_extraction": failed,
        "by_category": {c: {"n": k, "correct": h, "accuracy": 100.0 * h / k if k else None}
                        for c, (h, k) in counts.items()},
    }


EXTRACTIONS = {"official": extract_answer_official, "lenient": extract_answer}


def score(problems: Sequence[Problem], predictions: Mapping[str, str],
          extraction: str = "official") -> tuple[dict[str, Any], list[dict]]:
    """Score predicted texts by pid (a missing pid counts as failed) with the named extraction rule
    (``official``: LLaVA's ``eval_science_qa.py``; ``lenient``: vitune's); returns the tally and per-problem rows."""
    if extraction not in EXTRACTIONS:
        raise ValueError(f"unknown ScienceQA extraction {extraction!r}; valid: {', '.join(EXTRACTIONS)}")
    extract = EXTRACTIONS[extraction]
    letters = {p.pid: extract(predictions.get(p.pid), len(p.choices)) for p in problems}
    rows = [{"pid": p.pid, "truth": p.letter, "parsed": letters[p.pid], "correct": letters[p.pid] == p.letter,
             "categories": p.categories(), "text": predictions.get(p.pid)} for p in problems]
    tally = _tally(problems, letters)
    tally["missing"] = sum(1 for p in problems if p.pid not in predictions)
    return tally, rows


# --- the judge ensemble (prompt wording is ours) ---

_JUDGE_SYSTEM = "You are a careful expert in natural science, social science and language arts."
_FINAL_LINE = 'Finish with one line of the form "The answer is X." where X is the letter of the option.'


def _problem_text(problem: Problem) -> str:
    options = " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem.choices))
    return f"Question: {problem.question}\nContext: {problem.hint.strip() or 'N/A'}\nOptions: {options}"


def judge_messages(problem: Problem) -> list[dict[str, str]]:
    """Ask the text-only judge for its own answer."""
    user = ("Answer this multiple-choice question. It may refer to a picture you cannot see; rely on the "
            f"context and your knowledge. Reason briefly. {_FINAL_LINE}\n\n{_problem_text(problem)}")
    return [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": user}]


def decide_messages(problem: Problem, ours: str, judge: str) -> list[dict[str, str]]:
    """Ask the judge to decide between our answer (which saw the image) and its own."""
    user = ("Two assistants answered this multiple-choice question and disagree. Assistant 1 could see the "
            "picture the question may refer to; Assistant 2 saw only the text. Weigh both answers and decide "
            f"which option is correct. {_FINAL_LINE}\n\n{_problem_text(problem)}\n\n"
            f"[Assistant 1]\n{ours}\n[End of Assistant 1]\n\n[Assistant 2]\n{judge}\n[End of Assistant 2]")
    return [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": user}]


AskMany = Callable[[list[list[dict[str, str]]]], list[str | None]]


def ensemble(problems: Sequence[Problem], predictions: Mapping[str, str], ask_many: AskMany,
             extraction: str = "official") -> dict[str, Any]:
    """The judge alone and the judge-decides ensemble; ``ask_many`` maps message lists to reply texts
    (None where the request failed). Our answers are read with ``extraction``; the judge's replies, which
    follow our own instruction, with the lenient rule."""
    ours = {p.pid: EXTRACTIONS[extraction](predictions.get(p.pid), len(p.choices)) for p in problems}
    judge_texts = dict(zip([p.pid for p in problems], ask_many([judge_messages(p) for p in problems]),
                           strict=True))
    judge = {p.pid: extract_answer(judge_texts[p.pid], len(p.choices)) for p in problems}
    disputed = [p for p in problems if ours[p.pid] is None or ours[p.pid] != judge[p.pid]]
    decisions = ask_many([decide_messages(p, predictions.get(p.pid) or "", judge_texts[p.pid] or "")
                          for p in disputed])
    final = dict(ours)
    undecided = 0
    for p, text in zip(disputed, decisions, strict=True):
        decided = extract_answer(text, len(p.choices))
        undecided += decided is None
        final[p.pid] = decided or ours[p.pid] or judge[p.pid]
    errors = sum(t is None for t in judge_texts.values()) + sum(t is None for t in decisions)
    log.info("ScienceQA ensemble: %d of %d problems disputed, %d undecided", len(disputed), len(problems),
             undecided)
    return {
        "judge": _tally(problems, judge),
        "ensemble": {**_tally(problems, final), "disputed": len(disputed), "undecided": undecided},
        "judge_errors": errors,
        "rows": [{"pid": p.pid, "ours": ours[p.pid], "judge": judge[p.pid], "final": final[p.pid],
                  "judge_text": judge_texts[p.pid]} for p in problems],
    }


# --- the benchmark (vitune.catalog.BENCHMARKS["scienceqa"]): run, report section, metrics, chart ---


def run_scienceqa(cfg: EvalJobConfig, out: str, answer_fn: fmt_io.AnswerFn,
                  judge: Judge | None = None) -> dict[str, Any]:
    """``eval.split`` of ``eval.data`` → answers → accuracy by category; with a judge, the ensemble too.
    Writes one row per problem to ``results.jsonl`` under ``out``."""
    ev = cfg.eval
    root = fmt_io.data_root(ev)
    problems = load_problems(root, ev.split, ev.limit)
    images = ev.images or storage.join(root, "images", ev.split)
    texts, inference = answer_fn(build_requests(problems, ev.prompt_format, images))
    ours, rows = score(problems, texts, ev.extraction)
    result: dict[str, Any] = {"split": ev.split, "prompt_format": ev.prompt_format, "extraction": ev.extraction,
                              "ours": ours}
    if judge is not None:
        ens = ensemble(problems, texts, judge.ask_many, ev.extraction)
        by_pid = {r["pid"]: r for r in ens.pop("rows")}
        for row in rows:
            row.update({k: by_pid[row["pid"]][k] for k in ("judge", "final", "judge_text")})
        result.update(ens)
    fmt_io.write_results(out, rows)
    return {"result": result, "inference": inference}


_PARTS = ("ours", "judge", "ensemble")


def markdown(result: Mapping[str, Any]) -> str:
    header = ["", *CATEGORIES, "Avg", "n", "failed extraction"]
    rows = []
    for name in _PARTS:
        part = result.get(name)
        if part:
            cats = [fmt(part["by_category"][c]["accuracy"]) for c in CATEGORIES]
            rows.append([name, *cats, fmt(part["accuracy"]), str(part["n"]), str(part["failed_extraction"])])
    title = (f"ScienceQA ({result['split']}, {result['prompt_format']}, "
             f"{result.get('extraction', 'official')} answer extraction) accuracy, %")
    return f"## {title}\n\n{table(header, rows)}\n"


def metrics(result: Mapping[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in _PARTS:
        if result.get(name):
            out[f"{name}.accuracy"] = result[name]["accuracy"]
            out[f"{name}.failed_extraction"] = result[name]["failed_extraction"]
            out.update({f"{name}.{c}": v["accuracy"] for c, v in result[name]["by_category"].items()})
    return out


def chart(result: Mapping[str, Any]) -> tuple[str, dict[str, float], dict[str, float]]:
    part = result.get("ensemble") or result.get("judge") or result["ours"]
    return "accuracy, %", {c: part["by_category"][c]["accuracy"] for c in CATEGORIES}, {}
