"""The ingress's calls to the engine replicas: bounded in time, retried on a lost replica, streamed as SSE.

Used by `vitune.serve.app.ChatAPI`. A call's answer comes within `request_timeout_s` or the client gets a 503
`timeout`; a replica lost before the answer (killed, crashed) is retried on another; a stream cut mid-answer
resumes on another with the same draws (`vitune.serve.resume`). The engine's domain errors become HTTP errors
here through `vitune.serve.openai.engine_error`; every failure of the relay itself is worded once below
(`timed_out`, `overloaded`, `replica_lost`, `stream_failed`). Once a stream's status line is sent, an error
goes in-band as a last SSE event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

from vitune.serve import openai as oai
from vitune.serve.openai import APIError, engine_error
from vitune.serve.resume import ReplayDiverged, resumable

logger = logging.getLogger(__name__)

UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError, RayActorError,
               ActorUnavailableError)
REPLICA_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)  # worth one more try elsewhere
RETRIES = 2


def overloaded(exc: BaseException) -> APIError:
    return APIError(503, f"the model is overloaded or unavailable ({type(exc).__name__}); retry shortly",
                    code="overloaded")


def timed_out(timeout_s: float) -> APIError:
    """The 503 for a model that did not answer in time: a whole answer, a stream's first event, a resumed stream."""
    return APIError(503, f"the model did not answer within {timeout_s:.0f} s; retry shortly", code="timeout")


def replica_lost() -> APIError:
    return APIError(503, "the model replica answering was lost and the answer could not be resumed; retry shortly",
                    code="replica_lost")


def stream_failed(request_id: str) -> APIError:
    return APIError(500, f"generation failed (request id {request_id}); the cause is in the server log",
                    code="internal_error")


async def _result(response: DeploymentResponse) -> Any:
    return await response


async def bounded(response: DeploymentResponse, timeout_s: float) -> Any:
    """A handle call's result within `timeout_s`, else 503 (the call is cancelled)."""
    try:
        return await asyncio.wait_for(_result(response), timeout_s)
    except TimeoutError:
        response.cancel()
        raise timed_out(timeout_s) from None


async def ask(response: DeploymentResponse, timeout_s: float) -> Any:
    """`bounded`, with an unavailable engine answered as 503 `overloaded` (no retry: for small questions)."""
    try:
        return await bounded(response, timeout_s)
    except UNAVAILABLE as exc:
        raise overloaded(exc) from None


async def _first_answer(call: Callable[[], Any], first_of: Callable[[Any], Any], timeout_s: float, request_id: str,
                        what: str) -> tuple[Any, dict[str, Any]]:
    """``(the call, its first answer)`` within `timeout_s`: `call()` starts it on a replica, `first_of` awaits its
    answer (a whole one, or a stream's first event); a replica lost before it is retried on another (`RETRIES`
    times); an engine error answer is raised."""
    for attempt in range(RETRIES + 1):
        handle = call()
        try:
            first = await asyncio.wait_for(first_of(handle), timeout_s)
            break
        except TimeoutError:
            handle.cancel()
            raise timed_out(timeout_s) from None
        except REPLICA_LOST as exc:
            handle.cancel()  # unavailable is not always dead: no answer for nobody
            if attempt == RETRIES:
                raise overloaded(exc) from None
            logger.warning("%s %s: engine replica lost (%s); retrying", what, request_id, type(exc).__name__)
        except UNAVAILABLE as exc:
            raise overloaded(exc) from None
    if first["type"] == "error":
        raise engine_error(first["error"])
    return handle, first


async def complete(call: Callable[[], DeploymentResponse], timeout_s: float, request_id: str) -> dict[str, Any]:
    """The engine's whole answer (`call()` starts it); a lost replica is retried on another; its error raised."""
    _, result = await _first_answer(call, _result, timeout_s, request_id, "request")
    return result


async def open_stream(call: Callable[[], DeploymentResponseGenerator], timeout_s: float,
                      request_id: str) -> tuple[DeploymentResponseGenerator, dict[str, Any]]:
    """A streamed engine call and its `start` event; errors before it are raised (plain 4xx/5xx replies)."""
    return await _first_answer(call, lambda events: events.__anext__(), timeout_s, request_id, "stream")


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_answer(events: DeploymentResponseGenerator, again: Callable[[], DeploymentResponseGenerator],
                     start: dict[str, Any], request_id: str, created: int, model: str, include_usage: bool,
                     timeout_s: float) -> AsyncIterator[str]:
    """The stream after its `start` event in OpenAI's chunk format: one write per engine event (the role chunk
    rides with the first text, `[DONE]` with the finish); a lost replica's answer resumes through `again()`."""
    rid = request_id
    head = sse(oai.chunk_body(rid, created, model, {"role": "assistant", "content": ""}))
    answer = resumable(events, again, REPLICA_LOST, RETRIES, timeout_s, rid)
    try:
        async for ev in answer:
            if ev["type"] == "delta":
                yield head + sse(oai.chunk_body(rid, created, model, {"content": ev["text"]}))
                head = ""
                continue
            if ev["type"] == "finish":
                tail = sse(oai.chunk_body(rid, created, model, {}, ev["finish_reason"]))
                if include_usage:
                    usage = oai.usage(start["prompt_tokens"], ev["completion_tokens"])
                    tail += sse(oai.chunk_body(rid, created, model, None, usage_=usage))
            else:
                tail = sse(engine_error(ev["error"]).body())
            yield head + tail + "data: [DONE]\n\n"
            return
    except TimeoutError:  # resuming on another replica: none answered in time
        yield head + sse(timed_out(timeout_s).body()) + "data: [DONE]\n\n"
    except (*UNAVAILABLE, ReplayDiverged) as exc:  # the replica was lost and the answer not resumed
        logger.warning("stream %s: not resumed after its replica was lost: %r", rid, exc)
        yield head + sse(replica_lost().body()) + "data: [DONE]\n\n"
    except Exception:  # noqa: BLE001 - the status line is sent; report in-band
        logger.exception("stream %s failed", rid)
        yield head + sse(stream_failed(rid).body()) + "data: [DONE]\n\n"
    finally:
        await answer.aclose()  # the caller went away: stop generating for it
