"""Resuming a stream whose engine replica was lost mid-answer: the request runs again on another replica and the
text the client already has is checked against the replay, then skipped.

A non-streamed request that loses its replica is simply retried (nothing was sent yet). A stream has sent part of
its answer, so the retry must give the same tokens: the API replica gives every sampled stream a seed before its
first try (its draws then come from its own generator, whoever shares the batch, see `vitune.serve.engine`), and
greedy ones need none. The replay is still checked character by character: if it differs from what was sent (a
different model version came up in between, or numerics of another batch shape broke a near-tie), the stream
ends with an in-band error rather than a spliced answer.
"""

from __future__ import annotations

import secrets

from vitune.serve.openai import SEED_MAX
from vitune.serve.request import ChatRequest


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
