"""A scripted OpenAI-compatible server on loopback, for tests of anything that calls an LLM endpoint.

Real HTTP (a threaded ``http.server`` in the test process), so Ray workers in other processes reach it
too. ``POST /v1/chat/completions`` answers from, in order: replies queued with ``queue()`` /
``fail_next()``, else the ``responder`` callable (given the parsed request, returns a ``Reply``, a string
or a full response dict), else ``default_content``. ``GET /v1/models`` lists the model. Every request is
logged (``requests``), and every 200 carries ``usage`` (word counts unless the reply says otherwise).

Usage::

    # importing the fixture function makes the `fake_openai` fixture available in the test module
    # (or list "tests.fake_openai" in the root conftest's pytest_plugins)
    from tests.fake_openai import FakeOpenAI, Reply, fake_openai_fixture  # noqa: F401

    def test_x(fake_openai):
        fake_openai.fail_next(2, status=429, retry_after=0)
        fake_openai.responder = lambda req: "Question:\\nWhy?\\n===\\nAnswer:\\nBecause."
        endpoint = EndpointConfig(base_url=fake_openai.base_url, model="fake")
        ...
        assert len(fake_openai.chat_requests) == 3
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Reply:
    """One scripted answer. ``status != 200`` sends an OpenAI-style error body (or ``body`` when given)."""

    content: str | None = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    finish_reason: str = "stop"
    usage: dict[str, int] | None = None  # default: whitespace-word counts of the messages and the content
    delay_s: float = 0.0  # sleep before answering (for timeout tests)
    body: dict | str | None = None  # sent verbatim instead of the generated body (malformed-body tests)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text if it was not JSON
    status: int = 0  # what the server answered
    time: float = 0.0
    usage: dict[str, int] | None = None  # the usage sent back (200s only)

    @property
    def messages(self) -> list[dict]:
        return list((self.body or {}).get("messages") or []) if isinstance(self.body, dict) else []

    @property
    def last_user_text(self) -> str:
        users = [m.get("content") for m in self.messages if m.get("role") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else ""


def count_words(messages: list[dict]) -> int:
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):  # content parts
            total += sum(len(str(p.get("text", "")).split()) for p in content if isinstance(p, dict))
    return total


class FakeOpenAI:
    """The server; ``start()``/``stop()`` or use as a context manager. ``base_url`` ends with ``/v1``."""

    def __init__(self, responder: Callable[[RecordedRequest], Reply | str | dict] | None = None,
                 model: str = "fake-model", default_content: str = "OK."):
        self.responder = responder
        self.model = model
        self.default_content = default_content
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Reply] = deque()
        self.in_flight = 0
        self.max_in_flight = 0  # most chat requests being answered at once (for concurrency-cap tests)
        self.responder_errors: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- scripting
    def queue(self, *replies: Reply | str) -> None:
        """Answer the next requests with these, in order, before the responder is asked."""
        with self._lock:
            self._queue.extend(r if isinstance(r, Reply) else Reply(content=r) for r in replies)

    def fail_next(self, n: int, status: int = 429, retry_after: float | str | None = None) -> None:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        self.queue(*[Reply(content=None, status=status, headers=headers) for _ in range(n)])

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._queue.clear()
            self.max_in_flight = 0

    # ---- what happened
    @property
    def chat_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def count(self, status: int | None = None) -> int:
        return sum(1 for r in self.chat_requests if status is None or r.status == status)

    def usage_totals(self) -> dict[str, int]:
        """Tokens reported back in 200 responses, summed."""
        out = {"prompt_tokens": 0, "completion_tokens": 0}
        for r in self.chat_requests:
            for k in out:
                out[k] += (r.usage or {}).get(k, 0)
        return out

    # ---- lifecycle
    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- answering
    def _next_reply(self, req: RecordedRequest) -> Reply:
        with self._lock:
            queued = self._queue.popleft() if self._queue else None
        if queued is not None:
            return queued
        if self.responder is None:
            return Reply(content=self.default_content)
        try:
            out = self.responder(req)
        except Exception as exc:  # noqa: BLE001 - a broken responder shows up as a 500 and in responder_errors
            with self._lock:
                self.responder_errors.append(repr(exc))
            return Reply(status=500, body={"error": {"message": f"responder raised {exc!r}"}})
        if isinstance(out, Reply):
            return out
        if isinstance(out, dict):
            return Reply(body=out)
        return Reply(content=str(out))

    def _completion(self, req: RecordedRequest, reply: Reply) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json", **reply.headers}
        if reply.status != 200:
            body = reply.body if reply.body is not None else {
                "error": {"message": f"scripted error {reply.status}", "type": "fake_error", "code": reply.status}}
            return reply.status, headers, _encode(body)
        if reply.body is not None:
            if isinstance(reply.body, dict) and isinstance(reply.body.get("usage"), dict):
                req.usage = dict(reply.body["usage"])
            return 200, headers, _encode(reply.body)
        content = reply.content or ""
        usage = reply.usage or {"prompt_tokens": count_words(req.messages), "completion_tokens": len(content.split())}
        usage = {**usage, "total_tokens": usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)}
        req.usage = usage
        body = {
            "id": f"chatcmpl-fake-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": (req.body or {}).get("model", self.model) if isinstance(req.body, dict) else self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content},
                         "finish_reason": reply.finish_reason}],
            "usage": usage,
        }
        return 200, headers, _encode(body)


def _encode(body: dict | str) -> bytes:
    return (body if isinstance(body, str) else json.dumps(body)).encode("utf-8")


def _make_handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
            pass

        def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"Content-Type": "application/json"},
                           _encode({"object": "list", "data": [{"id": fake.model, "object": "model"}]}))
            else:
                self._send(404, {"Content-Type": "application/json"}, _encode({"error": {"message": "not found"}}))

        def do_POST(self) -> None:  # noqa: N802
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw
            req = RecordedRequest(method="POST", path=self.path, headers=dict(self.headers.items()), body=body,
                                  time=time.time())
            with fake._lock:
                fake.requests.append(req)
            if not self.path.rstrip("/").endswith("/chat/completions"):
                req.status = 404
                self._send(404, {"Content-Type": "application/json"}, _encode({"error": {"message": "not found"}}))
                return
            with fake._lock:
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            try:
                reply = fake._next_reply(req)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                status, headers, data = fake._completion(req, reply)
            finally:
                with fake._lock:
                    fake.in_flight -= 1
            req.status = status
            try:
                self._send(status, headers, data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                pass

    return Handler


@pytest.fixture(name="fake_openai")
def fake_openai_fixture() -> Iterator[FakeOpenAI]:
    """A started ``FakeOpenAI`` for one test; set ``.responder`` / ``queue()`` / ``fail_next()`` to script it."""
    with FakeOpenAI() as server:
        yield server
