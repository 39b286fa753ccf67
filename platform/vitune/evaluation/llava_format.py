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

Answers are read as the official scripts leave them: one JSONL, or a folder of the chunks that
``model_vqa_loader.py --num-chunks N --chunk-idx i`` writes (``<N>_<i>.jsonl``, merged in chunk order as
LLaVA's ``gqa.sh`` / ``vqav2.sh`` concatenate them). Errors name the file and line: a line without
``question_id`` or ``text``, the same (question_id, prompt) answered twice, an answer for a question the
question file does not hold, more answers for an id than it has questions.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vitune import HUMAN, IMAGE_TOKEN, storage
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


class AnswerRow(dict):
    """One answer as read from a file, with ``where`` = ``"<file> line <n>"`` for error messages."""

    where: str = ""


_CHUNK = re.compile(r"^(\d+)_(\d+)\.jsonl$")


def numbered_jsonl(uri: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a JSON Lines file, blank lines skipped; a bad line raises naming file and line."""
    rows = []
    for lineno, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{uri} line {lineno}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{uri} line {lineno}: expected an object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def answer_files(uri: str) -> list[str]:
    """The answers JSONL itself, or a folder's ``<N>_<i>.jsonl`` chunks in chunk order (all N chunks needed)."""
    if not storage.is_dir(uri):
        return [uri]
    chunks: dict[int, dict[int, str]] = defaultdict(dict)
    for f in storage.list_files(uri, ".jsonl", recursive=False):
        m = _CHUNK.match(f.rstrip("/").rsplit("/", 1)[-1])
        if m:
            chunks[int(m.group(1))][int(m.group(2))] = f
    if len(chunks) != 1:
        found = ", ".join(f"{n} chunks" for n in sorted(chunks)) or "none"
        raise ValueError(f"{uri}: expected the <N>_<i>.jsonl chunks of one run of model_vqa_loader (found: {found})")
    (n, parts), = chunks.items()
    missing = [f"{n}_{i}.jsonl" for i in range(n) if i not in parts]
    if missing:
        raise ValueError(f"{uri}: chunks missing: {', '.join(missing)}")
    return [parts[i] for i in range(n)]


def read_answers(uri: str, id_keys: Sequence[str] = ("question_id",)) -> list[AnswerRow]:
    """An answers JSONL (or chunk folder) in LLaVA's format. ``prompt`` may be absent (answers then match on
    id and order); the id is the first of ``id_keys`` a row has. Errors name the file and line."""
    rows: list[AnswerRow] = []
    first: dict[tuple[str, str], str] = {}
    for f in answer_files(uri):
        for lineno, raw in numbered_jsonl(f):
            where = f"{f} line {lineno}"
            key = next((k for k in id_keys if k in raw), None)
            if key is None or "text" not in raw:
                raise ValueError(f"{where}: an answer needs {' or '.join(id_keys)} and text")
            row = AnswerRow(raw)
            row["question_id"] = raw[key]
            row.where = where
            if "prompt" in raw:
                pair = (str(row["question_id"]), str(raw["prompt"]))
                if pair in first:
                    raise ValueError(f"{where}: question {pair[0]!r} with this prompt is answered twice "
                                     f"(first at {first[pair]})")
                first[pair] = where
            rows.append(row)
    return rows


def _where(answer: Mapping[str, Any], i: int) -> str:
    return getattr(answer, "where", "") or f"answer {i + 1}"


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

    ``images_root`` None: each question's ``image`` is already a URI. A question of several images (``image`` a
    list, as multi-image records write it) keeps a ``text`` that places its own ``<image>`` tokens as written
    (batch inference refuses the row, naming it, when their count is not the images'); a ``text`` without any
    gets one per image in front.
    """
    def uri(name: Any) -> str:
        return str(name) if images_root is None else storage.join(images_root, str(name))

    out = []
    for rid, q in zip(request_ids(questions), questions, strict=True):
        text = str(q["text"])
        if isinstance(q["image"], list):
            image: str | list[str] = [uri(name) for name in q["image"]]
            turns = ([{"from": HUMAN, "value": text}] if IMAGE_TOKEN in text
                     else single_turn(text, len(q["image"])))
        else:
            image, turns = uri(q["image"]), single_turn(text, True)
        out.append({"id": rid, "image": image, "conversations": turns})
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
    their id in file order. An answer whose id no question has, or one more than its id has questions,
    raises naming where it was read."""
    asked: dict[str, int] = defaultdict(int)
    for q in questions:
        asked[str(q["question_id"])] += 1
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, a in enumerate(answers):
        qid = str(a["question_id"])
        if qid not in asked:
            raise ValueError(f"{_where(a, i)}: an answer for question {qid!r}, which the question file does not hold")
        by_id[qid].append(i)
        if len(by_id[qid]) > asked[qid]:
            earlier = ", ".join(_where(answers[j], j) for j in by_id[qid][:-1])
            raise ValueError(f"{_where(a, i)}: question {qid!r} is answered again (also at {earlier}); it is asked "
                             f"{asked[qid]} time(s)")
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


def answer_texts(uri: str, ids: Sequence[str], limited: bool = False) -> dict[str, str]:
    """``{id: text}`` from an answers file for questions with unique ``ids`` (ScienceQA pids, LLaVA-Bench
    question ids); ``question_id`` or ``id`` names the question. A duplicate or unknown id raises naming the
    line; with ``limited`` (``eval.limit``) answers beyond the questions asked are left out instead."""
    rows = read_answers(uri, ("question_id", "id"))
    known = {str(i) for i in ids}
    if limited:
        rows = [r for r in rows if str(r["question_id"]) in known]
    match_answers([{"question_id": i} for i in known], rows)  # raises on an unknown or repeated id
    return {str(r["question_id"]): str(r["text"]) for r in rows}


def collect_answers(cfg: EvalJobConfig, questions: Sequence[Mapping[str, Any]], images_root: str | None,
                    out: str, answer_fn: AnswerFn) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The answers to score: ``eval.predictions`` (LLaVA's answers JSONL) as given, or generated through
    ``answer_fn`` and written under ``out`` in LLaVA's format, so the official scripts can read them too."""
    ev = cfg.eval
    if ev.predictions:
        rows = read_answers(ev.predictions)
        if ev.limit:  # the answers of the questions past the limit are not an error, only not scored
            asked = {str(q["question_id"]) for q in questions}
            rows = [r for r in rows if str(r["question_id"]) in asked]
        log.info("scoring %d answers from %s", len(rows), ev.predictions)
        return rows, None
    texts, inference = answer_fn(build_requests(questions, images_root))
    rows = answer_rows(questions, texts, model_id(cfg))
    storage.write_jsonl(storage.join(out, ANSWERS_FILE), rows)
    return rows, inference


def data_root(ev: Any) -> str:
    """``eval.data``, which every benchmark needs: its data's URI."""
    if not ev.data:
        raise ValueError(f"eval.data: the {ev.benchmark} data URI is required")
    return ev.data


def model_id(cfg: EvalJobConfig) -> str:
    """The ``model_id`` LLaVA's answer rows carry (and official submission files are named after)."""
    return cfg.eval.name or (cfg.eval.model_folder or "vitune").rstrip("/").rsplit("/", 1)[-1]


def read_benchmark_questions(ev: Any, questions_file: str, folder: str) -> list[dict[str, Any]]:
    """``eval.data`` (required: ``folder`` says what it holds) → its question file (``eval.questions`` or
    ``questions_file``), the first ``eval.limit`` questions."""
    if not ev.data:
        raise ValueError(f"eval.data: the {folder} is required")
    return read_questions(resolve(ev.data, ev.questions, questions_file), ev.limit)


Score = Callable[..., tuple[dict[str, Any], list[dict[str, Any]]]]
# (questions, answers, output URI) → the official files written (official_formats)
OfficialWriter = Callable[[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]], str], list[str]]


def answer_and_score(cfg: EvalJobConfig, out: str, answer_fn: AnswerFn, questions: Sequence[Mapping[str, Any]],
                     images_root: str | None, score: Score, official: OfficialWriter | None = None
                     ) -> dict[str, Any]:
    """The tail every suite benchmark shares: answers (generated or ``eval.predictions``) → ``score(questions,
    answers)`` → ``results.jsonl`` under ``out``, and the benchmark's official files (``official``) beside
    it, their URIs in ``result["official_files"]``; returns ``{"result", "inference"}``."""
    answers, inference = collect_answers(cfg, questions, images_root, out, answer_fn)
    result, rows = score(questions, answers)
    write_results(out, rows)
    if official is not None:
        result["official_files"] = official(questions, answers, out)
    return {"result": result, "inference": inference}


def write_results(out: str, rows: Sequence[Mapping[str, Any]]) -> None:
    storage.write_jsonl(storage.join(out, RESULTS_FILE), rows)


def pct(num: float, den: float) -> float | None:
    """``100 · num / den``, None when there is nothing to divide by."""
    return 100.0 * num / den if den else None
