"""The Ray Serve application: an OpenAI-compatible chat API and chat page in front of batched model replicas.

Two deployments:
- `ChatAPI` (FastAPI ingress, CPU): auth, request parsing and checks, image decoding, SSE; the chat page
  at `/`. Bad input is answered here (or by the engine's admission, whose domain errors
  `vitune.serve.openai.engine_error` maps) with a 4xx in OpenAI's error shape. Its calls to the engine
  replicas (bounded, retried, streamed as SSE) are `vitune.serve.relay`.
- `VLMEngine` (the model, one GPU each on a cluster): a `vitune.serve.engine.ServingEngine` that
  decodes the requests on its replica with continuous batching (see that module). Autoscaled on
  ongoing requests.

It lives in the package so that Serve's replicas import it from the installed `vitune` wherever they run
(`serving/app.py` re-exports it for the deploy configs' `import_path`). `ServeConfig`'s defaults are the
application's defaults: `build_app({"model": ...})` is a complete configuration.

Robustness: the body limit is enforced while reading; a request must be JSON; overload and timeouts answer
503/429 with `Retry-After` (the queue limits come from `ServeConfig`, from YAML and `build_app` alike); a
request whose engine replica dies is retried on another, and a stream cut mid-answer resumes on another with
the same draws (`vitune.serve.relay`, `vitune.serve.resume`); `/healthz` answers 503 when no engine replica can
answer; a 500 carries a request id and no exception text. Binding beyond loopback needs `VITUNE_API_KEY` in the
replicas' environment unless `allow_unauthenticated: true`.

Run: `serve run serving/config.yaml` (see the config's header), or from Python
`serve.run(build_app({"model": "<model folder URI or models:/NAME/VERSION>"}))` (`make_app` also takes
deployment options).
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and FastAPI must see
# real annotation objects (a string "Request" would not resolve in the replica and become a query param).
import hmac
import ipaddress
import logging
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from vitune.config import API_KEY_ENV, MODELS_SCHEME, ServeConfig
from vitune.serve import openai as oai
from vitune.serve import relay
from vitune.serve.adapters import engine_for, load_engines
from vitune.serve.health import EngineHealth
from vitune.serve.openai import APIError
from vitune.serve.request import ChatRequest, chat_request_from_openai
from vitune.serve.resume import pin_seed

logger = logging.getLogger(__name__)

JSON_TYPES = ("application/json",)
API_MIN_PENDING = 1024  # requests the proxy holds for the ingress at least (see `queue_options`)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _http_host() -> str | None:
    """The host Serve's HTTP proxies bind (None when it cannot be told)."""
    try:
        # deferred: a private module of Serve; the controller client knows the http_options in force
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - unknown is treated as beyond loopback
        logger.warning("could not read Serve's HTTP host", exc_info=True)
        return None


def check_auth_setup(cfg: ServeConfig, host: str | None) -> None:
    """Refuse to serve beyond loopback without a key, unless the config allows it explicitly."""
    if cfg.resolved_api_key() or cfg.allow_unauthenticated or (host is not None and _is_loopback(host)):
        return
    raise RuntimeError(f"Serve's HTTP proxy binds {host or 'an unknown host'} (beyond loopback) and no API key is "
                       f"set: set the {API_KEY_ENV} env var of the replicas (e.g. from a Kubernetes Secret), or "
                       "set allow_unauthenticated: true in the app's args to serve without auth")


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
class VLMEngine:
    """One model replica: the engine's worker thread batches every request this replica holds."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        # one engine per served name: the model, plus LoRA adapters over its base when `adapters` names some
        self.engines = load_engines(ServeConfig.model_validate(cfg))
        self.engine = next(iter(self.engines.values()))

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def stats(self) -> dict[str, Any]:
        # the replica's actor name too: which replica answered (fault-injection tests kill one by it)
        return {**self.engine.stats(), "actor": ray.get_runtime_context().get_actor_name()}

    async def complete(self, chat: ChatRequest) -> dict[str, Any]:
        return await engine_for(self.engines, chat.model).complete(chat)

    def health(self) -> str | None:
        """Why this replica cannot answer (any of its engines), or None."""
        return next((f"{name}: {reason}" for name, e in self.engines.items() if (reason := e.health())), None)

    async def stream(self, chat: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        async for event in engine_for(self.engines, chat.model).generate(chat):
            yield event

    def check_health(self) -> None:
        reason = self.health()
        if reason:  # Serve stops routing here and replaces the replica
            raise RuntimeError(reason)

    def __del__(self) -> None:
        for engine in getattr(self, "engines", {}).values():
            engine.close()


def _error_response(err: APIError, request_id: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _request_id(request: Request) -> str:
    """The id a client sees (header `X-Request-Id`, and in 500 messages) and the log carries."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = f"chatcmpl-{uuid.uuid4().hex}"
    return rid


async def read_json_body(request: Request, max_body: int) -> bytes:
    """The body, refused (415/413) unless it is JSON and within `max_body`, counted as it arrives (chunked too)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES:
        raise APIError(415, f"the request body must be JSON (Content-Type: application/json), got "
                       f"{media or 'no Content-Type'}", code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise APIError(413, f"the request body is {declared} bytes, over the limit of {max_body}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:  # stop reading: a chunked body announces no length
            raise APIError(413, f"the request body is over the limit of {max_body} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class ChatAPI:
    """The HTTP face: `/v1/chat/completions`, `/v1/models`, `/healthz`, and the chat page at `/`."""

    def __init__(self, engine: DeploymentHandle, cfg: dict[str, Any]) -> None:
        self.engine = engine
        self.cfg = ServeConfig.model_validate(cfg)
        self.model_name = self.cfg.model_name()
        self.api_key = self.cfg.resolved_api_key()
        check_auth_setup(self.cfg, _http_host())
        self.created = int(time.time())
        self.lineage = served_lineage(self.cfg)  # what /v1/models says is served: the folder or registry version
        # each image a request may hold as base64, the text (up to 6 bytes a character as a JSON escape) and room
        # for the structure
        images = max(1, self.cfg.max_images_per_request)
        self.max_body = images * (self.cfg.max_image_bytes * 4 // 3) + 6 * self.cfg.max_text_chars + 65_536
        self.geometry: dict[str, Any] | None = None  # the tower's input, asked of the engine once
        self.health = EngineHealth(engine)
        self.page = resources.files("vitune").joinpath("static/chat.html").read_text(encoding="utf-8")
        logger.info("chat API for %s (auth %s)", self.model_name, "on" if self.api_key else "off")

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="vitune", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(APIError)
        async def _api_error(request: Request, exc: APIError) -> JSONResponse:
            return _error_response(exc, _request_id(request))

        @app.exception_handler(RequestValidationError)
        async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()))
            return _error_response(APIError(400, f"{where}: {first.get('msg', 'invalid request')}", where or None),
                                   _request_id(request))

        @app.exception_handler(StarletteHTTPException)
        async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return _error_response(APIError(exc.status_code, str(exc.detail), code=code), _request_id(request))

        @app.exception_handler(Exception)
        async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
            rid = _request_id(request)
            logger.exception("unhandled error in request %s", rid)
            return _error_response(APIError(500, f"internal error (request id {rid}); the cause is in the server "
                                            "log", code="internal_error"), rid)

        @app.get("/", include_in_schema=False)
        async def page() -> HTMLResponse:
            return HTMLResponse(self.page)

        @app.get("/healthz")
        async def healthz() -> JSONResponse:
            problem = await self.health.problem()
            if problem:
                return JSONResponse({"status": "unavailable", "model": self.model_name, "reason": problem},
                                    status_code=503, headers={"Retry-After": "5"})
            return JSONResponse({"status": "ok", "model": self.model_name})

        @app.get("/v1/models")
        async def models(request: Request) -> dict[str, Any]:
            self._check_auth(request)
            body = oai.models_body(self.model_name, self.created)
            body["data"][0]["vitune"] = self.lineage
            body["data"] += [oai.models_body(name, self.created)["data"][0] for name in self.cfg.adapters]
            return body

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str, request: Request) -> dict[str, Any]:
            self._check_auth(request)
            if model_id != self.model_name:
                raise APIError(404, f"the model {model_id!r} does not exist; this server serves "
                               f"{self.model_name!r}", "model", "model_not_found")
            return {**oai.models_body(self.model_name, self.created)["data"][0], "vitune": self.lineage}

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Any:
            self._check_auth(request)
            payload = oai.parse_json(await read_json_body(request, self.max_body))
            req = oai.parse_request(payload)
            if req.model is not None and req.model not in self.cfg.model_names():
                raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                               f"{', '.join(map(repr, self.cfg.model_names()))}", "model", "model_not_found")
            chat = await chat_request_from_openai(req, self.cfg, await self._geometry())
            chat.model = req.model
            request.state.request_id = chat.request_id
            if req.stream:
                return await self._stream(chat, req.include_usage)
            result = await relay.complete(lambda: self.engine.complete.remote(chat), self.cfg.request_timeout_s,
                                          chat.request_id)
            return oai.completion_body(chat.request_id, int(time.time()), chat.model or self.model_name, result["text"],
                                       result["finish_reason"], result["prompt_tokens"], result["completion_tokens"])

        return app

    async def _geometry(self) -> dict[str, Any] | None:
        if self.geometry is None:
            self.geometry = await relay.ask(self.engine.info.remote(), self.cfg.request_timeout_s)
        return self.geometry

    def _check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _stream(self, chat: ChatRequest, include_usage: bool) -> StreamingResponse:
        """SSE in OpenAI's chunk format; errors found before the first token are still plain 4xx replies."""
        pin_seed(chat)  # a stream cut by a lost replica resumes elsewhere with the same draws

        def call() -> Any:
            return self.engine.options(stream=True).stream.remote(chat)

        timeout_s, rid = self.cfg.request_timeout_s, chat.request_id
        events, start = await relay.open_stream(call, timeout_s, rid)
        body = relay.sse_answer(events, call, start, rid, int(time.time()), chat.model or self.model_name,
                                include_usage, timeout_s)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": rid})


def served_lineage(cfg: ServeConfig) -> dict[str, Any]:
    """The served model's source; for ``models:/`` also the registered version it resolved to and its run."""
    if not cfg.model.startswith(MODELS_SCHEME):
        return {"source": cfg.model}
    from vitune.lineage import registry_lineage

    try:
        info = registry_lineage(cfg.model, cfg.tracking_uri)
    except Exception as exc:  # noqa: BLE001 - the engine loads (or fails on) the model itself; this is a label
        logger.warning("could not look up %s in the registry: %s", cfg.model, exc)
        return {"source": cfg.model}
    return {k: info[k] for k in ("source", "registered_model", "version", "uri", "run_id")}


def build_app(args: dict[str, Any]) -> Application:
    """The application a deploy config names by `import_path`; `args` are `ServeConfig` fields."""
    return make_app(args)


def queue_options(cfg: ServeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The deployments' queue limits implied by `cfg`, one set end to end: an engine replica holds a full batch
    plus `max_queued` waiting (so its own 429 is the last guard, never reached first); beyond that each caller
    holds `max_pending_requests`, then answers 503 with Retry-After."""
    engine = {"max_ongoing_requests": cfg.max_batch_size + cfg.max_queued,
              "max_queued_requests": cfg.max_pending_requests}
    # the proxy's own refusal has no Retry-After and no OpenAI shape: its queue in front of the (cheap) ingress is
    # kept well above the engine's, so overload is answered by the ingress, as a 503 with Retry-After
    api = {"max_queued_requests": max(4 * cfg.max_pending_requests, API_MIN_PENDING)}
    return engine, api


def make_app(args: dict[str, Any], engine_options: dict[str, Any] | None = None,
             api_options: dict[str, Any] | None = None) -> Application:
    """`build_app` with deployment options from Python (tests, benchmarks); a config file's
    `deployments:` section overrides them for `serve run` / `serve deploy`. Queue limits default to
    `queue_options(cfg)`."""
    cfg = ServeConfig.model_validate(args)
    raw = cfg.model_dump(mode="json")
    engine_queue, api_queue = queue_options(cfg)
    engine = VLMEngine.options(**{**engine_queue, **(engine_options or {})})
    api = ChatAPI.options(**{**api_queue, **(api_options or {})})
    return api.bind(engine.bind(raw), raw)
