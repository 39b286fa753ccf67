"""The Ray Serve application: an OpenAI-compatible chat API and chat page in front of batched model replicas.

Two deployments:
- `ChatAPI` (FastAPI ingress, CPU): auth, request parsing and checks, image decoding, SSE; the chat page
  at `/`. Bad input is answered here (or by the engine's prompt check) with a 4xx in OpenAI's error shape.
- `VLMEngine` (the model, one GPU each on a cluster): a `vitune.serve.engine.ServingEngine` that
  decodes the requests on its replica with continuous batching (see that module). Autoscaled on
  ongoing requests.

It lives in the package so that Serve's replicas import it from the installed `vitune` wherever they run
(`serving/app.py` re-exports it for the deploy configs' `import_path`). `ServeConfig`'s defaults are the
application's defaults: `build_app({"model": ...})` is a complete configuration.

Run: `serve run serving/config.yaml` (see the config's header), or from Python
`serve.run(build_app({"model": "<model folder URI or models:/NAME/VERSION>"}))` (`make_app` also takes
deployment options).
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and FastAPI must see
# real annotation objects (a string "Request" would not resolve in the replica and become a query param).
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from vitune.config import ServeConfig
from vitune.serve import openai as oai
from vitune.serve.engine import ServingEngine
from vitune.serve.openai import APIError
from vitune.serve.request import ChatRequest, chat_request_from_openai

logger = logging.getLogger(__name__)

_UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
class VLMEngine:
    """One model replica: the engine's worker thread batches every request this replica holds."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.engine = ServingEngine.from_config(ServeConfig.model_validate(cfg))

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def complete(self, chat: ChatRequest) -> dict[str, Any]:
        return await self.engine.complete(chat)

    async def stream(self, chat: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        async for event in self.engine.generate(chat):
            yield event

    def check_health(self) -> None:
        if not self.engine.stats()["alive"]:
            raise RuntimeError("the engine's worker thread has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class ChatAPI:
    """The HTTP face: `/v1/chat/completions`, `/v1/models`, `/healthz`, and the chat page at `/`."""

    def __init__(self, engine: DeploymentHandle, cfg: dict[str, Any]) -> None:
        self.engine = engine
        self.cfg = ServeConfig.model_validate(cfg)
        self.model_name = self.cfg.model_name()
        self.api_key = self.cfg.resolved_api_key()
        self.created = int(time.time())
        # an image as base64 plus generous room for the conversation text
        self.max_body = self.cfg.max_image_bytes * 4 // 3 + 1_000_000
        self.page = resources.files("vitune").joinpath("static/chat.html").read_text(encoding="utf-8")
        logger.info("chat API for %s (auth %s)", self.model_name, "on" if self.api_key else "off")

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="vitune", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(APIError)
        async def _api_error(_: Request, exc: APIError) -> JSONResponse:
            return _error_response(exc)

        @app.exception_handler(RequestValidationError)
        async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()))
            return _error_response(APIError(400, f"{where}: {first.get('msg', 'invalid request')}", where or None))

        @app.exception_handler(StarletteHTTPException)
        async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

        @app.exception_handler(Exception)
        async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
            logger.exception("unhandled error")
            return _error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

        @app.get("/", include_in_schema=False)
        async def page() -> HTMLResponse:
            return HTMLResponse(self.page)

        @app.get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok", "model": self.model_name}

        @app.get("/v1/models")
        async def models(request: Request) -> dict[str, Any]:
            self._check_auth(request)
            return oai.models_body(self.model_name, self.created)

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str, request: Request) -> dict[str, Any]:
            self._check_auth(request)
            if model_id != self.model_name:
                raise APIError(404, f"the model {model_id!r} does not exist; this server serves "
                               f"{self.model_name!r}", "model", "model_not_found")
            return oai.models_body(self.model_name, self.created)["data"][0]

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Any:
            self._check_auth(request)
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body:
                raise APIError(413, f"the request body is {declared} bytes, over the limit of {self.max_body}",
                               code="request_too_large")
            raw = await request.body()
            if len(raw) > self.max_body:
                raise APIError(413, f"the request body is {len(raw)} bytes, over the limit of {self.max_body}",
                               code="request_too_large")
            try:
                payload = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
            req = oai.parse_request(payload)
            if req.model is not None and req.model != self.model_name:
                raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                               f"{self.model_name!r}", "model", "model_not_found")
            chat = await chat_request_from_openai(req, self.cfg)
            if req.stream:
                return await self._stream(chat, req.include_usage)
            try:
                result = await self.engine.complete.remote(chat)
            except _UNAVAILABLE as exc:
                raise APIError(503, f"the model is overloaded or unavailable ({type(exc).__name__}); retry shortly",
                               code="overloaded") from None
            if result["type"] == "error":
                raise APIError.from_body(result["status"], result)
            return oai.completion_body(chat.request_id, int(time.time()), self.model_name, result["text"],
                                       result["finish_reason"], result["prompt_tokens"], result["completion_tokens"])

        return app

    def _check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _stream(self, chat: ChatRequest, include_usage: bool) -> StreamingResponse:
        """SSE in OpenAI's chunk format; errors found before the first token are still plain 4xx replies."""
        events = self.engine.options(stream=True).stream.remote(chat)
        try:
            first = await events.__anext__()
        except _UNAVAILABLE as exc:
            raise APIError(503, f"the model is overloaded or unavailable ({type(exc).__name__}); retry shortly",
                           code="overloaded") from None
        if first["type"] == "error":
            raise APIError.from_body(first["status"], first)
        prompt_tokens = first["prompt_tokens"]
        rid, created, model = chat.request_id, int(time.time()), self.model_name

        async def body() -> AsyncIterator[str]:
            # One write per engine event: the role chunk rides with the first text, [DONE] with the finish.
            head = _sse(oai.chunk_body(rid, created, model, {"role": "assistant", "content": ""}))
            finished = False
            try:
                async for ev in events:
                    if ev["type"] == "delta":
                        yield head + _sse(oai.chunk_body(rid, created, model, {"content": ev["text"]}))
                        head = ""
                        continue
                    if ev["type"] == "finish":
                        tail = _sse(oai.chunk_body(rid, created, model, {}, ev["finish_reason"]))
                        if include_usage:
                            usage = oai.usage(prompt_tokens, ev["completion_tokens"])
                            tail += _sse(oai.chunk_body(rid, created, model, None, usage_=usage))
                    else:
                        tail = _sse({"error": ev["error"]})
                    finished = True
                    yield head + tail + "data: [DONE]\n\n"
                    return
                raise RuntimeError("the engine stream ended without a finish event")
            except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
                logger.exception("stream %s failed", rid)
                finished = True
                err = APIError(500, f"generation failed: {type(exc).__name__}", code="internal_error")
                yield head + _sse(err.body()) + "data: [DONE]\n\n"
            finally:
                if not finished:  # the caller went away: stop generating for it
                    events.cancel()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def build_app(args: dict[str, Any]) -> Application:
    """The application a deploy config names by `import_path`; `args` are `ServeConfig` fields."""
    return make_app(args)


def make_app(args: dict[str, Any], engine_options: dict[str, Any] | None = None,
             api_options: dict[str, Any] | None = None) -> Application:
    """`build_app` with deployment options from Python (tests, benchmarks); a config file's
    `deployments:` section does the same for `serve run` / `serve deploy`."""
    cfg = ServeConfig.model_validate(args)
    raw = cfg.model_dump(mode="json")
    engine = VLMEngine.options(**engine_options) if engine_options else VLMEngine
    api = ChatAPI.options(**api_options) if api_options else ChatAPI
    return api.bind(engine.bind(raw), raw)
