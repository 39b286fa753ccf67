"""``vitune data inspect``: validate and tokenize a records file, show trained spans and report the stats.

Prints a few samples as the model will see them, with the trained text wrapped in ``[[...]]``, then
the counts a training job would get: records kept, tokens, share of tokens trained, truncations and
skipped records by reason (invalid records and records whose masks cannot be built).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vitune import IGNORE_INDEX
from vitune.data.masks import MaskError, TokenizedSample, tokenize_record
from vitune.data.records import read_records_with_errors
from vitune.data.templates import TEMPLATES
from vitune.data.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MAX_SKIP_EXAMPLES = 5


def mark_trained(sample: TokenizedSample, tokenizer: PreTrainedTokenizerBase) -> str:
    """Decode a sample with every trained run of tokens wrapped in ``[[...]]``."""
    parts = []
    pairs = zip(sample.input_ids, sample.labels, strict=True)
    for trained, run in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX):
        text = tokenizer.decode([i for i, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        parts.append(f"[[{text}]]" if trained else text)
    return "".join(parts)


def inspect_records(
    uri: str, template: str, tokenizer_name: str = "tiny", max_length: int = 2048, show: int = 3
) -> dict[str, Any]:
    """Validate and tokenize every record at ``uri``; return stats and ``show`` marked samples."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; valid: {', '.join(TEMPLATES)}")
    tokenizer = load_tokenizer(tokenizer_name)
    records, errors = read_records_with_errors(uri)
    reasons: Counter[str] = Counter(e.kind for e in errors)
    examples = [str(e) for e in errors[:MAX_SKIP_EXAMPLES]]
    lengths, trained, truncated, samples = [], 0, 0, []
    for record in records:
        try:
            sample = tokenize_record(record, template, tokenizer, max_length)
        except MaskError as e:
            reasons[e.kind] += 1
            if len(examples) < MAX_SKIP_EXAMPLES:
                examples.append(str(e))
            continue
        lengths.append(len(sample.input_ids))
        trained += sample.num_trained
        truncated += sample.truncated
        if len(samples) < show:
            image = record.to_json().get("image")  # as the record holds it: one path or the list
            samples.append({"id": record.id, "image": image, "text": mark_trained(sample, tokenizer)})
    total_tokens = sum(lengths)
    return {
        "uri": uri,
        "template": template,
        "tokenizer": tokenizer_name,
        "max_length": max_length,
        "records_in": len(records) + len(errors),
        "records_ok": len(lengths),
        "skipped": sum(reasons.values()),
        "skipped_by_reason": dict(reasons.most_common()),
        "skip_examples": examples,
        "tokens_mean": total_tokens / len(lengths) if lengths else 0.0,
        "tokens_max": max(lengths, default=0),
        "trained_share": trained / total_tokens if total_tokens else 0.0,
        "truncated": truncated,
        "samples": samples,
    }


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report printed by the CLI."""
    lines = []
    for s in report["samples"]:
        lines += [f"--- {s['id']}" + (f" (image {s['image']})" if s["image"] else ""), s["text"], ""]
    lines += [
        f"records:        {report['records_ok']} of {report['records_in']} usable ({report['uri']})",
        f"template:       {report['template']} (tokenizer {report['tokenizer']}, max length {report['max_length']})",
        f"tokens:         mean {report['tokens_mean']:.1f}, max {report['tokens_max']}",
        f"trained share:  {report['trained_share']:.1%} of tokens",
        f"truncated:      {report['truncated']}",
        f"skipped:        {report['skipped']}",
    ]
    lines += [f"  {kind}: {count}" for kind, count in report["skipped_by_reason"].items()]
    if report["skip_examples"]:
        lines.append("examples of skipped records:")
        lines += [f"  {e}" for e in report["skip_examples"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitune data inspect", description=__doc__.splitlines()[0])
    parser.add_argument("records_uri", help="LLaVA JSON / JSONL file (or folder of them), local path or s3://")
    parser.add_argument("--template", required=True, choices=list(TEMPLATES))
    parser.add_argument("--tokenizer", default="tiny", help="'tiny' or a Hugging Face tokenizer path")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--show", type=int, default=3, help="how many samples to print with trained spans marked")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``vitune data inspect``; returns 0, or 1 when no record is usable."""
    args = build_parser().parse_args(argv)
    report = inspect_records(args.records_uri, args.template, args.tokenizer, args.max_length, args.show)
    sys.stdout.write(format_report(report))
    return 0 if report["records_ok"] else 1
