"""LLaVA-Bench (COCO and In-the-Wild): judge-scored answers and the relative score per category.

Layout under ``data`` (official names per layout; each file can be renamed by config):

===========  =========================  ===================================  ==========================
layout       questions                  context                              reference answers
===========  =========================  ===================================  ==========================
in_the_wild  ``questions.jsonl``        ``context.jsonl`` (caption)           ``answers_gpt4.jsonl``
coco         ``qa90_questions.jsonl``   ``caps_boxes_coco2014_val_80.jsonl``  ``qa90_gpt4_answer.jsonl``
===========  =========================  ===================================  ==========================

Questions are ``{question_id, image, text, category}``; contexts are keyed by ``image`` and hold a
``caption`` (string or list) or ``captions`` plus ``instances`` (``{category, bbox}``, COCO boxes
normalised to 0..1); references are ``{question_id, text}``.

Per question the judge sees the context, the question, the reference as assistant 1 and our answer as
assistant 2, and a rule for the category, and states two scores 1..10 on its first line. By default the
system prompt and rules are LLaVA's own texts (``llava_bench_official``, so scores compare with published
ones) and an unparseable verdict counts as [-1, -1] in the means, as LLaVA's ``summarize_gpt_review`` does;
``eval.judge_prompt=vitune`` uses our wording and leaves unparseable verdicts out. Either way they are
counted. Relative score = mean(ours) / mean(reference) × 100, per category and pooled over all questions. Beyond the
paper: ``repeats`` judges each question several times → mean and sample std of the score;
``swap_order`` adds a pass with the answers swapped and reports the judge's position bias.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitune import storage
from vitune.evaluation import llava_format as fmt_io
from vitune.evaluation.inference import single_turn
from vitune.evaluation.llava_bench_official import JudgeStyle, official_style
from vitune.evaluation.tables import fmt, table

if TYPE_CHECKING:
    from vitune.config import EvalJobConfig
    from vitune.evaluation.judge import Judge

log = logging.getLogger(__name__)

CATEGORIES = ("conversation", "detail", "complex")
CATEGORY_ALIASES = {"conv": "conversation", "conversation": "conversation", "detail": "detail",
                    "detailed": "detail", "complex": "complex", "reasoning": "complex"}
LAYOUTS = {
    "in_the_wild": ("questions.jsonl", "context.jsonl", "answers_gpt4.jsonl"),
    "coco": ("qa90_questions.jsonl", "caps_boxes_coco2014_val_80.jsonl", "qa90_gpt4_answer.jsonl"),
}
SCORE_RANGE = (1.0, 10.0)
REVIEWS_FILE = "reviews.jsonl"  # the judge's verdicts, one row per question, repeat and order

JUDGE_SYSTEM = "You are a fair, exacting reviewer of answers about images."
_OUTPUT_FORMAT = (
    "Output format: on the first line write only the two scores, Assistant 1's and then Assistant 2's, each an "
    "integer from 1 to 10, separated by a space. From the second line on, justify the scores. Judge the content "
    "only: neither the order in which the answers appear nor their length may sway you."
)
_SEEING = ("You cannot see the image; the context above describes it (captions and, where given, objects with "
           "bounding boxes (x1, y1, x2, y2) normalised to 0..1). Treat the context as the truth about the image.")
RULES = {
    "conversation": (
        f"The user asked a short question about an image. {_SEEING} Score each answer for whether it answers "
        "exactly what was asked and is correct about the image; a concise right answer beats a long one that "
        f"adds wrong details.\n{_OUTPUT_FORMAT}"
    ),
    "detail": (
        f"The user asked for a detailed description of an image. {_SEEING} Score each answer for how much of "
        "the image it covers correctly (objects, attributes, counts, positions, the scene as a whole) and "
        f"penalise every detail that the context contradicts or does not support.\n{_OUTPUT_FORMAT}"
    ),
    "complex": (
        f"The user asked a question that needs reasoning beyond what is visible in an image. {_SEEING} Score "
        "each answer for sound reasoning grounded in the image, correct use of world knowledge, and a clear "
        f"conclusion that answers the question.\n{_OUTPUT_FORMAT}"
    ),
}


@dataclass(frozen=True)
class BenchItem:
    question_id: str
    image: str
    question: str
    category: str  # one of CATEGORIES
    context: str  # what the judge sees of the image
    reference: str


def format_context(row: Mapping[str, Any]) -> str:
    """Captions (one per line) and, for COCO, ``category: [x1, y1, x2, y2]`` lines."""
    caps = row.get("captions", row.get("caption", ""))
    text = "\n".join(str(c) for c in caps) if isinstance(caps, list) else str(caps)
    boxes = "\n".join(f"{inst['category']}: {inst['bbox']}" for inst in row.get("instances") or [])
    return f"{text}\n\n{boxes}" if boxes else text


def file_uris(data: str, layout: str, questions: str | None = None, context: str | None = None,
              references: str | None = None) -> tuple[str, str, str]:
    """The three files of a layout under ``data``; a given name or URI replaces the layout's default."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LLaVA-Bench layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    names = [given or default for given, default in zip((questions, context, references), LAYOUTS[layout],
                                                        strict=True)]
    return tuple(n if "://" in n or n.startswith("/") else storage.join(data, n) for n in names)  # type: ignore[return-value]


def load_bench(questions_uri: str, context_uri: str, references_uri: str, limit: int | None = None) -> list[BenchItem]:
    """Join questions with their image's context and the reference answer; errors name the question."""
    contexts = {str(r["image"]): format_context(r) for r in storage.read_jsonl(context_uri)}
    refs = {str(r["question_id"]): str(r["text"]) for r in storage.read_jsonl(references_uri)}
    items = []
    for q in storage.read_jsonl(questions_uri)[:limit]:
        qid = str(q.get("question_id"))
        category = CATEGORY_ALIASES.get(str(q.get("category", "")).lower())
        if category is None:
            raise ValueError(f"question {qid}: category {q.get('category')!r} is not one of {sorted(CATEGORY_ALIASES)}")
        if str(q.get("image")) not in contexts:
            raise ValueError(f"question {qid}: image {q.get('image')!r} has no context in {context_uri}")
        if qid not in refs:
            raise ValueError(f"question {qid}: no reference answer in {references_uri}")
        items.append(BenchItem(qid, str(q["image"]), str(q["text"]), category, contexts[str(q["image"])], refs[qid]))
    return items


def build_requests(items: Sequence[BenchItem], images_root: str) -> list[dict[str, Any]]:
    return [{"id": it.question_id, "image": storage.join(images_root, it.image),
             "conversations": single_turn(it.question, True)} for it in items]


def review_messages(item: BenchItem, answer1: str, answer2: str) -> list[dict[str, str]]:
    """The judge's request: context, question, the two answers, the category's rule."""
    content = (f"[Context]\n{item.context}\n\n[Question]\n{item.question}\n\n"
               f"[Assistant 1]\n{answer1}\n\n[End of Assistant 1]\n\n"
               f"[Assistant 2]\n{answer2}\n\n[End of Assistant 2]\n\n[System]\n{RULES[item.category]}\n\n")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


_NUMBER = r"(\d+(?:\.\d+)?)(?:\s*/\s*10)?"
_PAIR = re.compile(rf"^{_NUMBER}\s+{_NUMBER}$")


def parse_scores(text: str | None) -> tuple[float, float] | None:
    """The two scores of a verdict's first non-empty line (``8 6``, ``8, 6``, ``(8, 6)``, ``8/10 6/10``);
    None when that line is anything else or a score is outside 1..10."""
    if not text:
        return None
    first = next((line for line in text.splitlines() if line.strip()), "")
    first = first.replace(",", " ").strip().strip("()[]").strip()
    m = _PAIR.match(re.sub(r"\s+", " ", first))
    if not m:
        return None
    s1, s2 = float(m.group(1)), float(m.group(2))
    lo, hi = SCORE_RANGE
    if not (lo <= s1 <= hi and lo <= s2 <= hi):
        return None
    return s1, s2


def relative_scores(verdicts: Sequence[tuple[str, float, float]]) -> dict[str, dict[str, Any]]:
    """``[(category, reference score, our score)]`` → per category and ``all``: n, means, relative score."""
    groups: dict[str, list[tuple[float, float]]] = {c: [] for c in (*CATEGORIES, "all")}
    for category, ref, ours in verdicts:
        groups[category].append((ref, ours))
        groups["all"].append((ref, ours))
    out = {}
    for name, pairs in groups.items():
        ref_mean = statistics.fmean(p[0] for p in pairs) if pairs else None
        our_mean = statistics.fmean(p[1] for p in pairs) if pairs else None
        out[name] = {"n": len(pairs), "reference": ref_mean, "ours": our_mean,
                     "relative": 100.0 * our_mean / ref_mean if pairs and ref_mean else None}
    return out


AskMany = Callable[[list[list[dict[str, str]]], int], list[str | None]]


def judge_style(prompt: str, layout: str) -> JudgeStyle:
    """``official``: LLaVA's system prompt and rule.json texts (unparseable verdicts count as [-1, -1], as its
    summary does); ``vitune``: our own wording (unparseable verdicts left out of the means)."""
    if prompt == "official":
        return official_style(layout)
    if prompt == "vitune":
        return JudgeStyle("vitune", review_messages, parse_scores, None)
    raise ValueError(f"unknown LLaVA-Bench judge prompt {prompt!r}; valid: official, vitune")


def _judge_pass(items: Sequence[BenchItem], answers: Mapping[str, str], ask_many: AskMany, swapped: bool,
                repeat: int, style: JudgeStyle) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """One judging pass → verdict rows and the relative scores of its verdicts (unparseable ones as the
    style says)."""
    msgs = [style.messages(it, answers[it.question_id], it.reference) if swapped
            else style.messages(it, it.reference, answers[it.question_id]) for it in items]
    replies = ask_many(msgs, repeat)
    rows, scored = [], []
    for it, reply in zip(items, replies, strict=True):
        pair = style.parse(reply)
        counted = pair if pair is not None else (style.unparseable_as if reply is not None else None)
        ref = ours = None
        if counted is not None:
            ours, ref = counted if swapped else counted[::-1]
            scored.append((it.category, ref, ours))
        rows.append({"question_id": it.question_id, "category": it.category, "order": "swapped" if swapped else
                     "reference_first", "repeat": repeat, "scores": list(pair) if pair else None,
                     "reference_score": ref, "our_score": ours, "error": reply is None, "content": reply})
    return rows, relative_scores(scored)


def judge_bench(items: Sequence[BenchItem], answers: Mapping[str, str], ask_many: AskMany, repeats: int = 1,
                swap_order: bool = False,
                style: JudgeStyle | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge every item ``repeats`` times (plus once swapped) in ``style`` (default: the official prompt for
    In-the-Wild); returns the report and all verdict rows."""
    style = style or judge_style("official", "in_the_wild")
    rows: list[dict[str, Any]] = []
    per_repeat = []
    for r in range(repeats):
        pass_rows, scores = _judge_pass(items, answers, ask_many, swapped=False, repeat=r, style=style)
        rows += pass_rows
        per_repeat.append(scores)
    keys = (*CATEGORIES, "all")
    relative: dict[str, float | None] = {}
    spread: dict[str, float | None] = {}
    for k in keys:
        vals = [s[k]["relative"] for s in per_repeat if s[k]["relative"] is not None]
        relative[k] = statistics.fmean(vals) if vals else None
        spread[k] = statistics.stdev(vals) if len(vals) > 1 else None
    report: dict[str, Any] = {
        "n": len(items),
        "relative_score": relative,
        "relative_score_std": spread,
        "scores": per_repeat[0],
        "per_repeat": [{k: s[k]["relative"] for k in keys} for s in per_repeat],
        "repeats": repeats,
        "unparseable": sum(1 for row in rows if row["scores"] is None and not row["error"]),
        "judge_errors": sum(1 for row in rows if row["error"]),
        "judge_prompt": style.name,
        "unparseable_counted_as": list(style.unparseable_as) if style.unparseable_as else None,
    }
    if swap_order:
        swap_rows, swap_scores = _judge_pass(items, answers, ask_many, swapped=True, repeat=0, style=style)
        rows += swap_rows
        report["swapped"] = _position_bias(rows[: len(items)], swap_rows, swap_scores)
    log.info("LLaVA-Bench: relative score %s (unparseable %d, errors %d)", relative, report["unparseable"],
             report["judge_errors"])
    return report, rows


def _position_bias(forward: Sequence[dict], swapped: Sequence[dict], swap_scores: dict) -> dict[str, Any]:
    """Position-1 advantage: mean over items parseable in both orders of the score the judge gave the first
    slot minus the second, averaged over the two orders (quality differences cancel; 0 = no bias)."""
    diffs = []
    for f, s in zip(forward, swapped, strict=True):
        if f["scores"] and s["scores"]:
            diffs.append(((f["scores"][0] - f["scores"][1]) + (s["scores"][0] - s["scores"][1])) / 2)
    return {
        "relative_score": {k: v["relative"] for k, v in swap_scores.items()},
        "scores": swap_scores,
        "position1_advantage": statistics.fmean(diffs) if diffs else None,
        "n_both_parseable": len(diffs),
        "unparseable": sum(1 for row in swapped if row["scores"] is None and not row["error"]),
    }


# --- the benchmark (vitune.catalog.BENCHMARKS["llava_bench"]): run, report section, metrics, chart ---


def run_llava_bench(cfg: EvalJobConfig, out: str, answer_fn: fmt_io.AnswerFn,
                    judge: Judge | None = None) -> dict[str, Any]:
    """``eval.data`` (``eval.layout``) → answers → the judge's verdicts → relative scores; the verdicts go to
    ``reviews.jsonl`` under ``out``."""
    ev = cfg.eval
    if judge is None:
        raise ValueError("LLaVA-Bench needs a judge: set judge.base_url and judge.model")
    root = fmt_io.data_root(ev)
    items = load_bench(*file_uris(root, ev.layout, ev.questions, ev.context, ev.references), limit=ev.limit)
    texts, inference = answer_fn(build_requests(items, ev.images or storage.join(root, "images")))
    missing = [it.question_id for it in items if it.question_id not in texts]
    if missing:
        log.warning("%d questions have no answer (scored as empty answers), e.g. %s", len(missing), missing[:3])
    answers = {it.question_id: texts.get(it.question_id, "") for it in items}
    result, rows = judge_bench(items, answers, judge.ask_many, cfg.judge.repeats, cfg.judge.swap_order,
                               style=judge_style(ev.judge_prompt, ev.layout))
    result["layout"] = ev.layout
    storage.write_jsonl(storage.join(out, REVIEWS_FILE), rows)
    return {"result": result, "inference": inference}


def markdown(result: Mapping[str, Any]) -> str:
    keys = (*CATEGORIES, "all")
    header = ["", "Conversation", "Detail", "Complex", "All"]
    rel, std = result["relative_score"], result["relative_score_std"]
    rows = [["relative score", *[fmt(rel[k], 1) for k in keys]]]
    if result["repeats"] > 1:
        rows.append([f"std over {result['repeats']} repeats", *[fmt(std[k], 1) for k in keys]])
    scores = result["scores"]
    rows.append(["mean score: reference", *[fmt(scores[k]["reference"]) for k in keys]])
    rows.append(["mean score: ours", *[fmt(scores[k]["ours"]) for k in keys]])
    rows.append(["verdicts scored", *[str(scores[k]["n"]) for k in keys]])
    swapped = result.get("swapped")
    if swapped:
        rows.append(["relative score, answers swapped", *[fmt(swapped["relative_score"][k], 1) for k in keys]])
    counted = result.get("unparseable_counted_as")
    handled = f"counted as {counted} in the means, as LLaVA's summary does" if counted else "left out of the means"
    notes = [f"{result['n']} questions; judge prompt: {result.get('judge_prompt', 'vitune')}; "
             f"{result['unparseable']} unparseable verdicts ({handled}); {result['judge_errors']} failed judge "
             "requests (left out of the means)."]
    if swapped:
        notes.append(f"Position-1 advantage: {fmt(swapped['position1_advantage'])} points "
                     f"over {swapped['n_both_parseable']} questions scored in both orders.")
    return f"## LLaVA-Bench ({result['layout']}) relative score, %\n\n{table(header, rows)}\n\n" + \
        "\n".join(notes) + "\n"


def metrics(result: Mapping[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"relative.{k}": v for k, v in result["relative_score"].items()}
    out.update({f"relative_std.{k}": v for k, v in result["relative_score_std"].items()})
    out["unparseable"] = result["unparseable"]
    out["judge_errors"] = result["judge_errors"]
    if result.get("swapped"):
        out.update({f"swapped.relative.{k}": v for k, v in result["swapped"]["relative_score"].items()})
        out["position1_advantage"] = result["swapped"]["position1_advantage"]
    return out


def chart(result: Mapping[str, Any]) -> tuple[str, dict[str, float], dict[str, float]]:
    return "relative score, %", {c: result["relative_score"][c] for c in CATEGORIES}, {}
