"""Generation prompts: one version-controlled YAML file per kind, loaded, hashed and turned into chat messages.

A prompt file (``platform/vitune/prompts/<kind>.yaml``, or a folder named by ``generate.prompts``) holds
``kind``, ``uses_boxes``, a ``system`` message, few-shot ``examples`` (``context`` → ``response``) and, for the
detail kind, the ``questions`` a record may ask. The messages are the system message, each example as a
user/assistant pair, then the image's context as the last user message (the paper's Tables 14–15).
A prompt's hash is the sha256 of its canonical JSON content, so YAML comments and layout do not change it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from vitune import storage

KINDS = ("conversation", "detail", "complex")


class PromptError(ValueError):
    """A prompt file that is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class PromptSpec:
    kind: str
    system: str
    examples: tuple[tuple[str, str], ...]  # (context, response)
    uses_boxes: bool
    questions: tuple[str, ...] = ()

    def canonical(self) -> dict[str, Any]:
        return {"kind": self.kind, "system": self.system, "uses_boxes": self.uses_boxes,
                "examples": [{"context": c, "response": r} for c, r in self.examples],
                "questions": list(self.questions)}

    @property
    def hash(self) -> str:
        canon = json.dumps(self.canonical(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def messages(self, context: str) -> list[dict[str, str]]:
        """OpenAI chat messages: system, few-shot user/assistant pairs, then this image's context."""
        out = [{"role": "system", "content": self.system}]
        for ctx, resp in self.examples:
            out += [{"role": "user", "content": ctx}, {"role": "assistant", "content": resp}]
        out.append({"role": "user", "content": context})
        return out

    def pick_question(self, seed: int, image_key: str) -> str:
        """The record's question, drawn from ``questions`` by a stable per-image seed (not Python's ``hash``)."""
        if not self.questions:
            raise PromptError(f"prompt {self.kind!r} has no questions to pick from")
        digest = hashlib.sha256(f"{seed}:{self.kind}:{image_key}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big")).choice(self.questions)

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> PromptSpec:
        if not isinstance(raw, dict):
            raise PromptError(f"{source}: top level must be a mapping")
        kind = raw.get("kind")
        if kind not in KINDS:
            raise PromptError(f"{source}: kind {kind!r} is not one of {', '.join(KINDS)}")
        system = raw.get("system")
        if not isinstance(system, str) or not system.strip():
            raise PromptError(f"{source}: 'system' must be a non-empty string")
        examples = []
        for i, ex in enumerate(raw.get("examples") or []):
            if not (isinstance(ex, dict) and all(isinstance(ex.get(k), str) for k in ("context", "response"))):
                raise PromptError(f"{source}: examples[{i}] needs 'context' and 'response' strings")
            examples.append((ex["context"].strip(), ex["response"].strip()))
        questions = raw.get("questions") or []
        if not isinstance(questions, list) or not all(isinstance(q, str) and q.strip() for q in questions):
            raise PromptError(f"{source}: 'questions' must be a list of non-empty strings")
        if kind == "detail" and not questions:
            raise PromptError(f"{source}: the detail prompt needs a 'questions' list")
        return cls(kind=kind, system=system.strip(), examples=tuple(examples),
                   uses_boxes=bool(raw.get("uses_boxes", False)), questions=tuple(q.strip() for q in questions))

    def to_json(self) -> dict[str, Any]:
        return self.canonical()


def _read(folder: str | None, kind: str) -> tuple[str, str]:
    if folder is None:
        path = resources.files("vitune").joinpath("prompts", f"{kind}.yaml")
        return path.read_text(encoding="utf-8"), f"vitune/prompts/{kind}.yaml"
    uri = storage.join(folder, f"{kind}.yaml")
    if not storage.exists(uri):
        raise PromptError(f"prompt file for kind {kind!r} not found: {uri}")
    return storage.read_text(uri), uri


def load_prompt(kind: str, folder: str | None = None) -> PromptSpec:
    """The prompt of one kind from the packaged files, or ``<folder>/<kind>.yaml`` (any URI)."""
    if kind not in KINDS:
        raise PromptError(f"unknown generation kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    text, source = _read(folder, kind)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PromptError(f"{source}: not valid YAML: {exc}") from None
    spec = PromptSpec.from_dict(raw, source)
    if spec.kind != kind:
        raise PromptError(f"{source}: declares kind {spec.kind!r}, expected {kind!r}")
    return spec


def load_prompts(folder: str | None = None, kinds: tuple[str, ...] = KINDS) -> dict[str, PromptSpec]:
    return {kind: load_prompt(kind, folder) for kind in kinds}
