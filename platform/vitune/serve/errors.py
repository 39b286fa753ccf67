"""Why the serving engine did not answer a request: domain errors, free of HTTP and Ray.

The engine (`vitune.serve.engine`) raises these while preparing a request and carries them in its `error`
events (`{"type": "error", "error": <EngineError>}`); only the HTTP layer (`vitune.serve.openai.engine_error`)
turns them into status codes and OpenAI's error shape. `param` names the `ChatRequest` field at fault
(`turns`, `system`, `images`, `max_tokens`, `seed`, `temperature`, `top_p`), `code` is a short kind.
"""

from __future__ import annotations

from vitune.refusal import Refusal


class EngineError(Refusal):
    """A request the engine did not answer: a message the client may read, the field at fault (`param`), a code."""

    @property
    def param(self) -> str | None:
        return self.field


class RequestRejected(EngineError):
    """The request cannot be served as asked (the client's to fix): its prompt, its budget or its parameters."""


class QueueFull(EngineError):
    """The replica holds as many waiting requests as it may; retrying shortly may succeed."""

    @classmethod
    def waiting(cls, count: int) -> QueueFull:
        return cls(f"this replica already has {count} requests waiting; retry shortly", code="rate_limit_exceeded")


class ReplicaClosing(EngineError):
    """The engine is shutting down; another replica may answer."""

    @classmethod
    def now(cls) -> ReplicaClosing:
        return cls("the model replica is shutting down", code="overloaded")


class GenerationFailed(EngineError):
    """Generation failed on the server's side; the message names the request id (the cause is in the log)."""

    @classmethod
    def of(cls, request_id: str) -> GenerationFailed:
        return cls(f"generation failed on the server (request id {request_id}); the cause is in the server log",
                   code="internal_error")


def error_event(err: EngineError) -> dict[str, object]:
    """The engine's event for a request that ends without an answer."""
    return {"type": "error", "error": err}
