"""The demo's held-out synthetic eval: exact-match accuracy on ``eval.json`` of the synthetic data set.

The questions go through batch inference (or come from ``eval.predictions``) like any benchmark's;
answers and references are compared after ``normalize_answer``, overall and per question kind, next to
the accuracy of uniform guessing.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vitune import storage
from vitune.data.synthetic import CHECKABLE_KINDS, chance_accuracy
from vitune.evaluation import llava_format as fmt_io
from vitune.evaluation.tables import fmt, table

if TYPE_CHECKING:
    from vitune.config import EvalJobConfig
    from vitune.evaluation.judge import Judge

log = logging.getLogger(__name__)

_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


def normalize_answer(text: str) -> str:
    """Lower case, outer punctuation and whitespace stripped, number words as digits."""
    words = re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:\"'").split(" ")
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words)


def build_requests(records: Sequence[Mapping[str, Any]], image_root: str) -> list[dict[str, Any]]:
    """One request per held-out record: its image (or images, a list as in the record) and its first human turn."""
    requests = []
    for rec in records:
        human = [t for t in rec["conversations"] if t["from"] == "human"][:1]
        image = rec.get("image")
        if isinstance(image, list):  # several images: one URI each, in the record's (placeholder) order
            image = [storage.join(image_root, name) for name in image] or None
        elif image:
            image = storage.join(image_root, image)
        requests.append({"id": rec["id"], "image": image or None, "conversations": human})
    return requests


def score(records: Sequence[Mapping[str, Any]], texts: Mapping[str, str], errors: int = 0) -> dict[str, Any]:
    """Exact-match accuracy overall and per kind, next to uniform guessing per kind and over the whole set:
    ``{accuracy, per_kind, chance, n, n_per_kind, errors}``."""
    hits: dict[str, list[bool]] = {kind: [] for kind in CHECKABLE_KINDS}
    for rec in records:
        answer = texts.get(str(rec["id"]), "")
        hits.setdefault(rec["kind"], []).append(normalize_answer(answer) == normalize_answer(rec["answer"]))
    all_hits = [h for v in hits.values() for h in v]
    chance = chance_accuracy()
    counts = {k: len(v) for k, v in hits.items()}
    n = len(all_hits)
    chance_overall = sum(chance.get(k, 0.0) * c for k, c in counts.items()) / n if n else 0.0
    result = {
        "accuracy": sum(all_hits) / n if n else 0.0,
        "per_kind": {k: sum(v) / len(v) for k, v in hits.items() if v},
        "chance": {**chance, "overall": chance_overall},
        "n": n,
        "n_per_kind": counts,
        "errors": errors,
    }
    log.info("synthetic eval: accuracy %.3f (chance %.3f) over %d questions; per kind %s", result["accuracy"],
             chance_overall, n, result["per_kind"])
    return result


# --- the benchmark (vitune.catalog.BENCHMARKS["synthetic"]): run, report section, metrics, chart ---


def run_synthetic(cfg: EvalJobConfig, out: str, answer_fn: fmt_io.AnswerFn,
                  judge: Judge | None = None) -> dict[str, Any]:
    """``eval.data`` (the held-out ``eval.json``; images beside it unless ``eval.images``) → answers → scores."""
    ev = cfg.eval
    data = fmt_io.data_root(ev)
    records = json.loads(storage.read_text(data))
    texts, inference = answer_fn(build_requests(records, ev.images or data.rstrip("/").rsplit("/", 1)[0]))
    return {"result": score(records, texts, (inference or {}).get("errors", 0)), "inference": inference}


def markdown(result: Mapping[str, Any]) -> str:
    kinds = list(result["per_kind"])
    header = ["", *kinds, "overall"]
    rows = [["accuracy", *[fmt(result["per_kind"][k], 3) for k in kinds], fmt(result["accuracy"], 3)],
            ["chance", *[fmt(result["chance"].get(k), 3) for k in kinds], fmt(result["chance"]["overall"], 3)],
            ["n", *[str(result["n_per_kind"][k]) for k in kinds], str(result["n"])]]
    return f"## Synthetic held-out exact match\n\n{table(header, rows)}\n"


def metrics(result: Mapping[str, Any]) -> dict[str, float | None]:
    return {"accuracy": result["accuracy"], **{f"accuracy.{k}": v for k, v in result["per_kind"].items()},
            "chance": result["chance"]["overall"]}


def chart(result: Mapping[str, Any]) -> tuple[str, dict[str, float], dict[str, float]]:
    chance = {k: v for k, v in result["chance"].items() if k in result["per_kind"] and v is not None}
    return "exact-match accuracy", dict(result["per_kind"]), chance
