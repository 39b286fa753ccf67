"""The text a request streams: incremental detokenisation with stop strings, and coalesced deltas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Incremental detokenisation with stop strings: emits only text that later tokens cannot change.

    Held back: a trailing partial UTF-8 character (decoded as U+FFFD) and a tail that could begin a stop
    string. The concatenated deltas plus `flush()` equal `tokenizer.decode(ids, skip_special_tokens=True).lstrip()`
    unless a stop string cut the text (which then ends just before the stop string).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = [s for s in stops if s]
        self._ids: list[int] = []
        self._sent = 0

    def _decode(self) -> str:
        # without the leading space: templates train a reply as " text" after the assistant cue (LLaVA strips too)
        return self._tokenizer.decode(self._ids, skip_special_tokens=True).lstrip()

    def _advance(self, text: str, end: int) -> str:
        delta = text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return delta

    def push(self, ids: Sequence[int]) -> tuple[str, bool]:
        """Add tokens; returns `(new text, stopped)` where `stopped` means a stop string was reached."""
        if not ids:
            return "", False
        self._ids.extend(ids)
        text = self._decode()
        longest = max((len(s) for s in self._stops), default=0)
        start = max(0, self._sent - longest)
        hits = [i for i in (text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            return self._advance(text, max(min(hits), self._sent)), True
        end = len(text.rstrip("\ufffd"))
        for stop in self._stops:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[end - k : end] == stop[:k]:
                    end -= k
                    break
        return self._advance(text, end), False

    def flush(self) -> str:
        """The text still held back (at the end of generation)."""
        text = self._decode()
        return self._advance(text, len(text))


def coalesce_deltas(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge consecutive text deltas so a slow consumer gets fewer, larger messages."""
    out: list[dict[str, Any]] = []
    for ev in events:
        if ev["type"] == "delta" and out and out[-1]["type"] == "delta":
            out[-1] = {"type": "delta", "text": out[-1]["text"] + ev["text"]}
        else:
            out.append(ev)
    return out
