"""LLaVA-format instruction records: read, validate, normalise and write JSON / JSONL from any storage URI.

A record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...], ...}``.
Validation happens once, here, at the boundary: every problem raises a ``RecordError`` whose message
names the record (its id, else its position) and the problem, so a large job can quarantine the raw
record with its reason instead of dying (``read_records_with_errors``). Unknown keys are kept.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from vitune import GPT, HUMAN, IMAGE_TOKEN, storage

log = logging.getLogger(__name__)

ROLES = (HUMAN, GPT)
RECORD_SUFFIXES = (".json", ".jsonl")

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RecordError(ValueError):
    """A record that fails validation; ``kind`` is a short machine-readable reason for counting.

    The message always names the record: ``record 'abc' (#3): <problem>``.
    """

    def __init__(
        self,
        problem: str,
        *,
        kind: str,
        record_id: str | None = None,
        index: int | None = None,
        source: str | None = None,
        raw: Any = None,
    ) -> None:
        self.problem = problem
        self.kind = kind
        self.record_id = record_id
        self.index = index
        self.source = source
        self.raw = raw
        super().__init__(f"{describe_record(record_id, index, source)}: {problem}")

    def to_json(self) -> dict[str, Any]:
        """The quarantine row: where the record was, why it was rejected, and the raw record itself."""
        return {
            "id": self.record_id,
            "index": self.index,
            "source": self.source,
            "kind": self.kind,
            "reason": self.problem,
            "raw": self.raw,
        }


def describe_record(record_id: str | None, index: int | None = None, source: str | None = None) -> str:
    """``record 'abc' (#3 in s3://b/x.jsonl)`` — the name used in every record-level error message."""
    where = " ".join(([f"#{index}"] if index is not None else []) + ([f"in {source}"] if source else []))
    if record_id:
        return f"record {record_id!r} ({where})" if where else f"record {record_id!r}"
    return f"record {where}" if where else "record"


@dataclass(frozen=True)
class Turn:
    """One message: ``from_`` is ``"human"`` or ``"gpt"`` (``from`` in the JSON)."""

    from_: str
    value: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"from": self.from_, "value": self.value, **self.extra}


@dataclass
class Record:
    """A validated LLaVA record; ``image`` is relative to the image root, ``extra`` keeps unknown keys."""

    id: str
    image: str | None
    conversations: list[Turn]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def to_json(self) -> dict[str, Any]:
        """The LLaVA dict: ``id``, ``image`` (only if any), ``conversations``, then the extra keys."""
        out: dict[str, Any] = {"id": self.id}
        if self.image is not None:
            out["image"] = self.image
        out["conversations"] = [t.to_json() for t in self.conversations]
        out.update(self.extra)
        return out


def as_turns(conversations: Sequence[Turn | Mapping[str, Any]]) -> list[Turn]:
    """Accept ``Turn`` objects or LLaVA ``{"from", "value"}`` dicts (unchecked: validate records first)."""
    turns = []
    for t in conversations:
        if isinstance(t, Turn):
            turns.append(t)
        else:
            turns.append(Turn(from_=t["from"], value=t["value"]))
    return turns


def _check_image_path(image: Any, fail: Callable[[str, str], NoReturn]) -> str | None:
    if image is None:
        return None
    if not isinstance(image, str):
        fail(f"'image' must be a string path, got {type(image).__name__}", "bad_type")
    if not image.strip():
        fail("'image' is empty", "bad_image_path")
    if image.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(image) or _URI_SCHEME.match(image):
        fail(f"image path {image!r} is absolute; it must be relative to the image root", "bad_image_path")
    if ".." in image.replace("\\", "/").split("/"):
        fail(f"image path {image!r} escapes the image root ('..')", "bad_image_path")
    return image


def validate_record(raw: Any, index: int | None = None, source: str | None = None) -> Record:
    """Check one raw LLaVA dict and return a ``Record``; raise ``RecordError`` naming the record and problem."""
    record_id: str | None = None

    def fail(problem: str, kind: str) -> NoReturn:
        raise RecordError(problem, kind=kind, record_id=record_id, index=index, source=source, raw=raw)

    if not isinstance(raw, Mapping):
        fail(f"record is not a JSON object (got {type(raw).__name__})", "bad_type")
    if "id" not in raw:
        fail("missing 'id'", "missing_id")
    rid = raw["id"]
    if not isinstance(rid, str):
        fail(f"'id' must be a string, got {type(rid).__name__} {rid!r}", "bad_type")
    if not rid.strip():
        fail("'id' is empty", "missing_id")
    record_id = rid

    image = _check_image_path(raw.get("image"), fail)

    if "conversations" not in raw:
        fail("missing 'conversations'", "missing_conversations")
    convs = raw["conversations"]
    if not isinstance(convs, list):
        fail(f"'conversations' must be a list, got {type(convs).__name__}", "bad_type")
    if not convs:
        fail("'conversations' is empty", "missing_conversations")

    turns: list[Turn] = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, Mapping):
            fail(f"turn {i} is not an object (got {type(turn).__name__})", "bad_type")
        for key in ("from", "value"):
            if key not in turn:
                fail(f"turn {i} is missing {key!r}", "bad_turn")
        role, value = turn["from"], turn["value"]
        if not isinstance(role, str):
            fail(f"turn {i} 'from' must be a string, got {type(role).__name__}", "bad_type")
        if not isinstance(value, str):
            fail(f"turn {i} 'value' must be a string, got {type(value).__name__}", "bad_type")
        if role not in ROLES:
            fail(f"turn {i} has role {role!r}; valid roles: {', '.join(ROLES)}", "bad_role")
        if not value.strip():
            fail(f"turn {i} ({role}) has an empty value", "empty_turn")
        expected = ROLES[i % 2]
        if role != expected:
            fail(
                f"turn {i} is from {role!r}, expected {expected!r} (roles must alternate human→gpt, "
                "starting with human)",
                "roles_not_alternating",
            )
        extra_keys = {k: v for k, v in turn.items() if k not in ("from", "value")}
        turns.append(Turn(from_=role, value=value, extra=extra_keys))
    if len(turns) % 2:
        fail(
            f"conversation has {len(turns)} turns and ends with a human turn; it must end with gpt",
            "roles_not_alternating",
        )

    counts = [t.value.count(IMAGE_TOKEN) for t in turns]
    total = sum(counts)
    if image is not None and total != 1:
        fail(
            f"record has an image but {IMAGE_TOKEN} appears {total} times in its turns (expected exactly 1)",
            "image_token_count",
        )
    if image is None and total:
        fail(f"text-only record (no 'image') contains {IMAGE_TOKEN} {total} time(s)", "image_token_count")
    for i, (t, c) in enumerate(zip(turns, counts, strict=True)):
        if c and t.from_ != HUMAN:
            fail(f"{IMAGE_TOKEN} appears in turn {i}, a gpt reply; it must be in a human turn", "image_token_count")

    extra = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations")}
    return Record(id=rid, image=image, conversations=turns, extra=extra)


def normalize_turn_image_token(value: str) -> str:
    """LLaVA's ``preprocess_multimodal`` for one message: ``<image>`` moved to the front on its own line.

    ``"Q <image>"`` → ``"<image>\\nQ"``; a message that is only ``<image>`` stays ``"<image>"`` (the result is
    stripped, as LLaVA does). A message of several images keeps one placeholder for each, every one on its own
    line in front (LLaVA keeps one, as its records hold one image; serving's several images per message need
    each: ``vitune.data.prompt.image_first`` writes the same). Messages without the token are returned
    unchanged; idempotent.
    """
    count = value.count(IMAGE_TOKEN)
    if not count:
        return value
    rest = value.replace(IMAGE_TOKEN, "").strip()
    return "\n".join([IMAGE_TOKEN] * count + ([rest] if rest else []))


def normalize_image_token(record: Record) -> Record:
    """A copy of ``record`` whose turn holding ``<image>`` is rewritten as LLaVA's ``preprocess_multimodal`` does.

    Only records with an image are touched, as in LLaVA (text-only records never hold the token).
    """
    if not record.has_image:
        return record
    turns = [replace(t, value=normalize_turn_image_token(t.value)) for t in record.conversations]
    return replace(record, conversations=turns)


def _parse(text: str, source: str) -> Iterable[tuple[int, Any] | RecordError]:
    """Yield ``(index, raw)`` per record, or a ``RecordError`` for a JSONL line that is not JSON."""
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from e
        yield from enumerate(data)
        return
    # JSON Lines (also a single object per file)
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as e:
            yield RecordError(
                f"line {lineno} is not valid JSON: {e}", kind="invalid_json", index=index, source=source, raw=line
            )
        index += 1


def _record_files(uri: str) -> list[str]:
    if storage.is_dir(uri):
        files = [f for f in storage.list_files(uri) if f.endswith(RECORD_SUFFIXES)]
        if not files:
            raise FileNotFoundError(f"no {' or '.join(RECORD_SUFFIXES)} files under {uri}")
        return files
    if not storage.exists(uri):
        raise FileNotFoundError(f"records file not found: {uri}")
    return [uri]


def read_records_with_errors(uri: str) -> tuple[list[Record], list[RecordError]]:
    """Read a LLaVA JSON list / JSONL file (or a folder of them); invalid records are returned, not raised.

    Every input record ends up in exactly one of the two lists (rows in = records + errors). Only an
    unreadable file (missing, or a JSON list that does not parse) raises.
    """
    records: list[Record] = []
    errors: list[RecordError] = []
    for file_uri in _record_files(uri):
        source = file_uri if file_uri != uri else None
        for item in _parse(storage.read_text(file_uri), file_uri):
            if isinstance(item, RecordError):
                errors.append(item)
                continue
            index, raw = item
            try:
                records.append(validate_record(raw, index=index, source=source))
            except RecordError as e:
                errors.append(e)
    if errors:
        log.warning("%s: %d valid records, %d invalid (first: %s)", uri, len(records), len(errors), errors[0])
    return records, errors


def read_records(uri: str) -> list[Record]:
    """Read and validate every record; the first invalid one raises ``RecordError`` (small, curated data)."""
    records, errors = read_records_with_errors(uri)
    if errors:
        raise errors[0]
    return records


def write_records(records: Iterable[Record], uri: str) -> None:
    """Write records as a JSON list, or as JSON Lines when ``uri`` ends with ``.jsonl``."""
    rows = [r.to_json() for r in records]
    if str(uri).endswith(".jsonl"):
        storage.write_jsonl(uri, rows)
    else:
        storage.write_text(uri, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
