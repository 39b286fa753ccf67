"""LLaVA's evaluation files: the question JSONL of its ``eval.zip``, the answers JSONL its scripts write, and
the batch-inference requests and answer rows that connect the two.

Question files (``llava_pope_test.jsonl``, ``llava_mme.jsonl``, ``llava_textvqa_val_v051_ocr.jsonl``,
``llava_gqa_testdev_balanced.jsonl``) hold one ``{question_id, image, text, category}`` a line; ``text`` is the
whole question LLaVA-1.5 asks, its instruction line included ("Answer the question using a single word or
phrase."); ``model_vqa_loader.py`` puts the image token and a newline before it. Its answers are
``{question_id, prompt, text, answer_id, model_id, metadata}`` with ``prompt`` = the question's ``text``.

``question_id`` is not unique in every file (MME and TextVQA ask two questions about one image under one
id), so requests get ids of their own (``<question_id>#<n>`` for the n-th repeat) and an answer is matched
to its question on (question_id, prompt), falling back to file order among answers of one id.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation.inference import single_turn

log = logging.getLogger(__name__)

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
ANSWERS_FILE = "llava_answers.jsonl"  # the answers in LLaVA's format, next to the inference shards
RESULTS_FILE = "results.jsonl"  # one scored row per question

# requests → (answer text by request id, inference summary or None); run.py's get_answers, partly applied
AnswerFn = Callable[[list[dict[str, Any]]], tuple[dict[str, str], dict[str, Any] | None]]


def read_questions(uri: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a LLaVA question JSONL; a row without its fields raises naming its line."""
    rows = storage.read_jsonl(uri)[:limit]
    for i, row in enumerate(rows):
        missing = [k for k in ("question_id", "image", "text") if k not in row]
        if missing:
            raise ValueError(f"{uri} row {i + 1}: missing {', '.join(missing)}")
    return rows


def read_answers(uri: str) -> list[dict[str, Any]]:
    """An answers JSONL in LLaVA's format (``prompt`` may be absent; then answers match on id and order)."""
    rows = storage.read_jsonl(uri)
    for i, row in enumerate(rows):
        if "question_id" not in row or "text" not in row:
            raise ValueError(f"{uri} row {i + 1}: an answer needs question_id and text")
    return rows


def resolve(root: str, given: str | None, default: str) -> str:
    """``given`` (a name under ``root``, or an absolute path / URI) or ``default`` under ``root``."""
    name = given or default
    return name if "://" in name or name.startswith("/") else storage.join(root, name)


def request_ids(questions: Sequence[Mapping[str, Any]]) -> list[str]:
    """Unique, stable ids: the question id, with ``#<n>`` added to its n-th repeat in file order."""
    seen: dict[str, int] = defaultdict(int)
    ids = []
    for q in questions:
        qid = str(q["question_id"])
        ids.append(qid if seen[qid] == 0 else f"{qid}#{seen[qid]}")
        seen[qid] += 1
    return ids


def build_requests(questions: Sequence[Mapping[str, Any]], images_root: str | None) -> list[dict[str, Any]]:
    """One single-turn request per question, the image first as in ``model_vqa_loader.py``.

    ``images_root`` None: each question's ``image`` is already a URI.
    """
    out = []
    for rid, q in zip(request_ids(questions), questions, strict=True):
        image = str(q["image"]) if images_root is None else storage.join(images_root, str(q["image"]))
        out.append({"id": rid, "image": image, "conversations": single_turn(str(q["text"]), True)})
    return out


def answer_rows(questions: Sequence[Mapping[str, Any]], texts: Mapping[str, str],
                model_id: str) -> list[dict[str, Any]]:
    """Answers in LLaVA's format, one per question that has a text; ``prompt`` as LLaVA's scripts record it."""
    rows = []
    for rid, q in zip(request_ids(questions), questions, strict=True):
        if rid in texts:
            rows.append({"question_id": q["question_id"], "prompt": q.get("prompt", q["text"]),
                         "text": texts[rid], "answer_id": rid, "model_id": model_id, "metadata": {}})
    return rows


def match_answers(questions: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any]],
                  prompt_key: str = "text") -> list[str | None]:
    """Each question's answer text (None when it has none): same question_id and the answer's ``prompt``
    equal to the question's ``prompt_key`` field; questions left over then take the unused answers of
    their id in file order."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, a in enumerate(answers):
        by_id[str(a["question_id"])].append(i)
    used: set[int] = set()
    picks: list[int | None] = []
    for q in questions:  # pass 1: the prompt matches
        pool = [i for i in by_id.get(str(q["question_id"]), []) if i not in used]
        pick = next((i for i in pool if answers[i].get("prompt") == q.get(prompt_key)), None)
        if pick is not None:
            used.add(pick)
        picks.append(pick)
    for k, q in enumerate(questions):  # pass 2: file order among what is left
        if picks[k] is None:
            pool = [i for i in by_id.get(str(q["question_id"]), []) if i not in used]
            if pool:
                picks[k] = pool[0]
                used.add(pool[0])
    return [None if i is None else str(answers[i]["text"]) for i in picks]


def collect_answers(cfg: EvalJobConfig, questions: Sequence[Mapping[str, Any]], images_root: str | None,
                    out: str, answer_fn: AnswerFn) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The answers to score: ``eval.predictions`` (LLaVA's answers JSONL) as given, or generated through
    ``answer_fn`` and written under ``out`` in LLaVA's format, so the official scripts can read them too."""
    ev = cfg.eval
    if ev.predictions:
        rows = read_answers(ev.predictions)
        log.info("scoring %d answers from %s", len(rows), ev.predictions)
        return rows, None
    texts, inference = answer_fn(build_requests(questions, images_root))
    model_id = (ev.name or (ev.model_folder or "vitune").rstrip("/").rsplit("/", 1)[-1])
    rows = answer_rows(questions, texts, model_id)
    storage.write_jsonl(storage.join(out, ANSWERS_FILE), rows)
    return rows, inference


def data_root(ev: Any) -> str:
    """``eval.data``, which every benchmark needs: its data's URI."""
    if not ev.data:
        raise ValueError(f"eval.data: the {ev.benchmark} data URI is required")
    return ev.data


def read_benchmark_questions(ev: Any, questions_file: str, folder: str) -> list[dict[str, Any]]:
    """``eval.data`` (required: ``folder`` says what it holds) → its question file (``eval.questions`` or
    ``questions_file``), the first ``eval.limit`` questions."""
    if not ev.data:
        raise ValueError(f"eval.data: the {folder} is required")
    return read_questions(resolve(ev.data, ev.questions, questions_file), ev.limit)


def answer_and_score(cfg: EvalJobConfig, out: str, answer_fn: AnswerFn, questions: Sequence[Mapping[str, Any]],
                     images_root: str | None, score: Callable[..., tuple[dict[str, Any], list[dict[str, Any]]]]
                     ) -> dict[str, Any]:
    """The tail every suite benchmark shares: answers (generated or ``eval.predictions``) → ``score(questions,
    answers)`` → ``results.jsonl`` under ``out``; returns ``{"result", "inference"}``."""
    answers, inference = collect_answers(cfg, questions, images_root, out, answer_fn)
    result, rows = score(questions, answers)
    write_results(out, rows)
    return {"result": result, "inference": inference}


def write_results(out: str, rows: Sequence[Mapping[str, Any]]) -> None:
    storage.write_jsonl(storage.join(out, RESULTS_FILE), rows)


def pct(num: float, den: float) -> float | None:
    """``100 · num / den``, None when there is nothing to divide by."""
    return 100.0 * num / den if den else None
