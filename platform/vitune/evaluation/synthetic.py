"""The demo's held-out synthetic eval: exact-match accuracy on ``eval.json`` of the synthetic data set.

The questions go through batch inference (``vitune.evaluation.inference.run_batch_inference``) like any
benchmark's; answers and references are compared after ``normalize_answer``, overall and per question
kind, next to the accuracy of uniform guessing.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from typing import Any

from vitune import storage
from vitune.data.synthetic import CHECKABLE_KINDS, chance_accuracy
from vitune.evaluation.inference import GenerationSettings, run_batch_inference

log = logging.getLogger(__name__)

_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


def normalize_answer(text: str) -> str:
    """Lower case, outer punctuation and whitespace stripped, number words as digits."""
    words = re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:\"'").split(" ")
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words)


def evaluate_synthetic(
    model_folder: str,
    eval_records_uri: str,
    image_root: str,
    output_uri: str | None = None,
    settings: GenerationSettings | None = None,
    ray_init_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Exact-match accuracy on the synthetic held-out records (``eval.json``), overall and per kind.

    Returns ``{accuracy, per_kind, chance, n, n_per_kind, errors, inference}``; ``chance`` is uniform
    guessing per kind and over the whole set. Answers go under ``output_uri`` (a temp folder when None).
    """
    records = json.loads(storage.read_text(eval_records_uri))
    requests = []
    for rec in records:
        turns = rec["conversations"]
        human = [t for t in turns if t["from"] == "human"][:1]
        requests.append({"id": rec["id"], "image": storage.join(image_root, rec["image"]) if rec.get("image") else None,
                         "conversations": human})
    settings = settings or GenerationSettings(max_new_tokens=8)
    if output_uri is None:
        with tempfile.TemporaryDirectory(prefix="vitune-eval-") as tmp:
            result = run_batch_inference(requests, model_folder, tmp, settings, ray_init_kwargs)
    else:
        result = run_batch_inference(requests, model_folder, output_uri, settings, ray_init_kwargs)
    hits: dict[str, list[bool]] = {kind: [] for kind in CHECKABLE_KINDS}
    for rec in records:
        answer = result.answers[str(rec["id"])]["text"]
        hits.setdefault(rec["kind"], []).append(normalize_answer(answer) == normalize_answer(rec["answer"]))
    all_hits = [h for v in hits.values() for h in v]
    chance = chance_accuracy()
    counts = {k: len(v) for k, v in hits.items()}
    n = len(all_hits)
    chance_overall = sum(chance.get(k, 0.0) * c for k, c in counts.items()) / n if n else 0.0
    report = {
        "accuracy": sum(all_hits) / n if n else 0.0,
        "per_kind": {k: sum(v) / len(v) for k, v in hits.items() if v},
        "chance": {**chance, "overall": chance_overall},
        "n": n,
        "n_per_kind": counts,
        "errors": result.errors,
        "inference": result.summary(),
    }
    log.info("synthetic eval: accuracy %.3f (chance %.3f) over %d questions; per kind %s", report["accuracy"],
             chance_overall, n, report["per_kind"])
    return report
