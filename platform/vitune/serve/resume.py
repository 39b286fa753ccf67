"""Resuming a stream whose engine replica was lost mid-answer: the request runs again on another replica and the
text the client already has is checked against the replay, then skipped.

A non-streamed request that loses its replica is simply retried (nothing was sent yet). A stream has sent part of
its answer, so the retry must give the same tokens: the API replica gives every sampled stream a seed before its
first try (its uniforms then come from its own generator, whoever shares the batch, see
`vitune.model.decoding`), and greedy ones need none. The same draws give the same tokens where the logits do not
depend on the batch (on a GPU another batch shape can move a logit by an ulp), so the replay is checked
character by character: if it differs from what was sent, the stream ends with an in-band error rather than a
spliced answer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

from vitune.serve.openai import SEED_MAX
from vitune.serve.request import ChatRequest

logger = logging.getLogger(__name__)


class ReplayDiverged(RuntimeError):
    """The answer regenerated on another replica does not start with the text already sent."""


def pin_seed(chat: ChatRequest) -> None:
    """Give a sampled request without a seed one of its own, so a retry elsewhere draws the same tokens."""
    if chat.seed is None and chat.temperature > 0:
        chat.seed = secrets.randbelow(SEED_MAX + 1)


class Replay:
    """Tracks the text sent to the client; after a resume, strips the replayed part of each new delta."""

    def __init__(self) -> None:
        self.sent = ""
        self._skip = ""  # text of the current try still to be matched against what was sent

    def restart(self) -> None:
        """A new try begins: everything sent so far must come again first."""
        self._skip = self.sent

    def fresh(self, text: str) -> str:
        """The part of `text` (the next delta of the current try) the client does not have yet."""
        if self._skip:
            n = min(len(text), len(self._skip))
            if text[:n] != self._skip[:n]:
                raise ReplayDiverged(f"the regenerated answer differs from the {len(self.sent)} characters sent")
            self._skip, text = self._skip[n:], text[n:]
        self.sent += text
        return text

    def finished(self) -> None:
        """The current try finished: it must have replayed everything sent before."""
        if self._skip:
            raise ReplayDiverged(f"the regenerated answer ended {len(self._skip)} characters short of the text sent")


async def resumable(events: Any, again: Callable[[], Any], lost: tuple[type[BaseException], ...], retries: int,
                    timeout_s: float, request_id: str) -> AsyncIterator[dict[str, Any]]:
    """A streamed engine call's events after its `start`. When the replica is lost (`lost`) mid-answer, `again()`
    starts the request on another replica (at most `retries` times; its first event within `timeout_s`, else
    TimeoutError) and the text already yielded is skipped. The current call is cancelled if the caller stops
    early."""
    replay, done = Replay(), False
    try:
        for attempt in range(retries + 1):
            try:
                async for ev in events if attempt == 0 else _first_within(events, timeout_s):
                    if ev["type"] == "start":
                        continue
                    if ev["type"] == "delta":
                        if text := replay.fresh(ev["text"]):
                            yield {**ev, "text": text}
                        continue
                    if ev["type"] == "finish":
                        replay.finished()
                    done = True
                    yield ev
                    return
                raise RuntimeError("the engine stream ended without a finish event")
            except lost as exc:
                if attempt == retries:
                    raise
                logger.warning("stream %s: engine replica lost after %d characters sent (%s); resuming on another",
                               request_id, len(replay.sent), type(exc).__name__)
                events.cancel()  # unavailable is not always dead: no answer for nobody
                replay.restart()
                events = again()
    finally:
        if not done:
            events.cancel()


async def _first_within(events: Any, timeout_s: float) -> AsyncIterator[dict[str, Any]]:
    """A streamed call's events, the first within `timeout_s` (else the call is cancelled: TimeoutError)."""
    try:
        first = await asyncio.wait_for(events.__anext__(), timeout_s)
    except TimeoutError:
        events.cancel()
        raise
    yield first
    async for ev in events:
        yield ev
