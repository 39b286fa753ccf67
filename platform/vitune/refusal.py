"""A refused request, in one shape for every layer that refuses one: words the caller can act on (`message`),
the part of the request at fault (`field`) and a short machine-readable kind (`code`).

The prompt policy's `vitune.data.prompt.PromptRejected` and the serving engine's `vitune.serve.errors`
are refusals; only the HTTP layer maps them to status codes. All three parts ride in `args`, so a refusal
pickles across processes (a Serve replica to the ingress) and comes back equal.
"""

from __future__ import annotations


class Refusal(Exception):
    """A request refused: `message` for the caller, `field` at fault (None: the request as a whole), `code`."""

    default_field: str | None = None

    def __init__(self, message: str, field: str | None = None, code: str | None = None) -> None:
        field = self.default_field if field is None else field
        super().__init__(message, field, code)
        self.message = message
        self.field = field
        self.code = code

    def __str__(self) -> str:
        return self.message
