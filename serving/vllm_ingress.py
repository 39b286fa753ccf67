"""Ray Serve LLM's OpenAI ingress behind a bearer key: the `ingress_cls` of serving/vllm.yaml.

Ray Serve LLM 2.60's `OpenAiIngress` checks no API key, and vLLM's own `api_key` option guards only vLLM's
HTTP server, which Ray Serve LLM does not run. `KeyedOpenAiIngress` is that ingress with one difference: when
the replica has the `VITUNE_API_KEY` env var (from a Kubernetes Secret in cluster/kuberay/rayservice-vllm.yaml),
every HTTP request without `Authorization: Bearer <key>` is answered 401 in OpenAI's error shape, as vitune's
own engine answers it. Without the variable it serves without auth, as vitune's engine does.

The vLLM image (cluster/Dockerfile.vllm) does not install vitune, so this module imports only Ray and the
standard library.
"""

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ray.serve.llm.ingress import OpenAiIngress

logger = logging.getLogger(__name__)

API_KEY_ENV = "VITUNE_API_KEY"  # the variable vitune's engine reads too (vitune.config.API_KEY_ENV)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class BearerKeyMiddleware:
    """ASGI middleware: HTTP requests must carry `Authorization: Bearer <key>`; other scopes pass through."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    def authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self.key)

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.authorized(scope):  # lifespan events reach the app unchanged
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": {
            "message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class KeyedOpenAiIngress(OpenAiIngress):
    """`OpenAiIngress` whose ASGI app checks the `VITUNE_API_KEY` bearer key when the variable is set."""

    def _set_asgi_app(self, app: ASGIApp) -> None:
        # Serve's ASGI replica wrapper (ray.serve._private.http_util.ASGIAppReplicaWrapper in Ray 2.60) installs
        # the ingress's FastAPI app through this method, and this class precedes it in the replica class's MRO:
        # wrapping the app here puts the check in front of every route Ray Serve LLM registers.
        key = os.environ.get(API_KEY_ENV) or None
        logger.info("OpenAI ingress: API key %s", "required" if key else "not set, serving without auth")
        super()._set_asgi_app(BearerKeyMiddleware(app, key) if key else app)
