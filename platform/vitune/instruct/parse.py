"""Parse LLM outputs of instruction generation into LLaVA records, or reject them with a reason.

The prompts ask for labelled blocks::

    Question:
    <text>
    ===
    Answer:
    <text>

A block starts at a line ``Question:`` or ``Answer:`` (text may follow on the same line; case and markdown
bold are tolerated); lines of ``===`` separate blocks. Conversation outputs are alternating
question/answer pairs, complex outputs exactly one pair, detail outputs plain prose. Anything else raises
``ParseError`` with a short ``reason`` (counted in the summary, quarantined with the raw text).
The record puts ``<image>`` on the first human turn as ``<image>\\n`` + question.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from vitune import GPT, HUMAN, IMAGE_TOKEN

MIN_DETAIL_WORDS = 8  # a "detailed description" shorter than this is not one

_LABEL = re.compile(r"^\s*(?:\*\*|#+\s*)?(question|answer)\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*(.*)$", re.IGNORECASE)
_SEPARATOR = re.compile(r"^\s*={3,}\s*$")


class ParseError(ValueError):
    """An output that cannot become a record; ``reason`` is one of the short codes in this module."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _check_common(text: str, finish_reason: str | None) -> str:
    if finish_reason == "length":
        raise ParseError("truncated", "the model stopped at max_tokens")
    if text is None or not text.strip():
        raise ParseError("empty_output", "the model returned no text")
    if IMAGE_TOKEN in text:
        raise ParseError("image_token_in_output", f"output contains {IMAGE_TOKEN}, which would break the record")
    return text.strip()


def split_blocks(text: str) -> list[tuple[str, str]]:
    """``[(label, body)]`` with label ``question`` | ``answer``; raises on text outside a labelled block."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if _SEPARATOR.match(line):
            continue
        m = _LABEL.match(line)
        if m:
            blocks.append((m.group(1).lower(), [m.group(2)] if m.group(2).strip() else []))
        elif blocks:
            blocks[-1][1].append(line)
        elif line.strip():
            raise ParseError("missing_label", f"text before the first Question:/Answer: label: {line.strip()[:80]!r}")
    out = []
    for i, (label, lines) in enumerate(blocks):
        body = "\n".join(lines).strip()
        if not body:
            raise ParseError("empty_turn", f"block {i} ({label}) has no text")
        out.append((label, body))
    return out


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """Alternating question/answer blocks → ``[(question, answer)]``."""
    blocks = split_blocks(text)
    if not blocks:
        raise ParseError("missing_label", "no Question:/Answer: blocks found")
    pairs = []
    for i in range(0, len(blocks), 2):
        (label, q) = blocks[i]
        if label != "question":
            raise ParseError("turns_out_of_order", f"block {i} is an answer where a question was expected")
        if i + 1 >= len(blocks):
            raise ParseError("unanswered_question", f"the last question has no answer: {q[:80]!r}")
        (label2, a) = blocks[i + 1]
        if label2 != "answer":
            raise ParseError("turns_out_of_order", f"block {i + 1} is a question where an answer was expected")
        pairs.append((q, a))
    return pairs


def parse_conversation(text: str, finish_reason: str | None = None) -> list[tuple[str, str]]:
    return parse_pairs(_check_common(text, finish_reason))


def parse_complex(text: str, finish_reason: str | None = None) -> tuple[str, str]:
    pairs = parse_pairs(_check_common(text, finish_reason))
    if len(pairs) != 1:
        raise ParseError("wrong_turn_count", f"expected exactly one question and answer, got {len(pairs)}")
    return pairs[0]


def parse_detail(text: str, finish_reason: str | None = None) -> str:
    body = _check_common(text, finish_reason)
    first = body.splitlines()[0]
    if _LABEL.match(first):
        raise ParseError("unexpected_format", "a description was asked for, got Question:/Answer: blocks")
    if len(body.split()) < MIN_DETAIL_WORDS:
        raise ParseError("too_short", f"{len(body.split())} words; a detailed description needs {MIN_DETAIL_WORDS}+")
    return body


def to_conversations(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """LLaVA turns from ``(question, answer)`` pairs, ``<image>`` on the first human turn."""
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns.append({"from": HUMAN, "value": f"{IMAGE_TOKEN}\n{q}" if i == 0 else q})
        turns.append({"from": GPT, "value": a})
    return turns


def build_record(kind: str, record_id: str, image: str, text: str, *, question: str | None = None,
                 finish_reason: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One raw LLaVA record (``id``, ``image``, ``conversations``, ``kind``, extras) from one LLM output."""
    if kind == "conversation":
        pairs = parse_conversation(text, finish_reason)
    elif kind == "complex":
        pairs = [parse_complex(text, finish_reason)]
    elif kind == "detail":
        if not question:
            raise ValueError("the detail kind needs the record's question")
        pairs = [(question, parse_detail(text, finish_reason))]
    else:
        raise ValueError(f"unknown generation kind {kind!r}; valid kinds: conversation, detail, complex")
    return {"id": record_id, "image": image, "conversations": to_conversations(pairs), "kind": kind,
            **(extra or {})}


def fingerprint(record: dict[str, Any]) -> str:
    """What the model wrote, hashed: identical fingerprints are duplicate training data.

    For the detail kind the question is vitune's (drawn from a list), so only the description counts.
    """
    turns = record["conversations"]
    if record.get("kind") == "detail":
        parts = [t["value"] for t in turns if t["from"] == GPT]
    else:
        parts = [t["value"].replace(IMAGE_TOKEN, "").strip() for t in turns]
    norm = [" ".join(p.split()).lower() for p in parts]
    return hashlib.sha256(json.dumps(norm).encode("utf-8")).hexdigest()
