"""Run by test_vllm_config.py in a subprocess: Serve configs through Ray Serve LLM's own models, without vLLM.

    python ray_llm_check.py SPEC.json OUT.json

`ray.serve.llm` imports `ray.llm._internal.serve.core.configs.openai_api_models`, which imports vLLM's OpenAI
protocol models at import time (else SGLang's) and raises without them. The config models (`LLMServingArgs`,
`LLMConfig`, `ModelLoadingConfig`) use none of them. So this process puts placeholders in `sys.modules` for
exactly the vLLM protocol modules that file imports — each an empty pydantic model under the name it takes —
and nothing else; everything that validates is Ray's installed code. The placeholders never leave this process.

SPEC: {"configs": [serve config dicts], "api_key": str}. OUT: for each config, what `ServeDeploySchema` and
`LLMServingArgs` made of it (or the error), and what the configured ingress class does with HTTP requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import types
import warnings
from typing import Any

from pydantic import BaseModel

# module → the names ray/llm/_internal/serve/core/configs/openai_api_models.py (Ray 2.60) imports from it
VLLM_PROTOCOL_MODULES = {
    "vllm.entrypoints.openai.chat_completion.protocol": [
        "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionStreamResponse"],
    "vllm.entrypoints.openai.completion.protocol": [
        "CompletionRequest", "CompletionResponse", "CompletionStreamResponse"],
    "vllm.entrypoints.pooling.embed.protocol": [
        "EmbeddingChatRequest", "EmbeddingCompletionRequest", "EmbeddingResponse"],
    "vllm.entrypoints.pooling.scoring.protocol": ["ScoreResponse", "ScoreTextRequest"],
    "vllm.entrypoints.serve.engine.protocol": ["ErrorInfo", "ErrorResponse"],
    "vllm.entrypoints.serve.tokenize.protocol": [
        "DetokenizeRequest", "DetokenizeResponse", "TokenizeChatRequest", "TokenizeCompletionRequest",
        "TokenizeResponse"],
    "vllm.entrypoints.speech_to_text.transcription.protocol": [
        "TranscriptionRequest", "TranscriptionResponse", "TranscriptionStreamResponse"],
}


def install_placeholders() -> None:
    for name, classes in VLLM_PROTOCOL_MODULES.items():
        module = types.ModuleType(name)
        for cls in classes:
            setattr(module, cls, type(cls, (BaseModel,), {"__module__": name}))
        sys.modules[name] = module


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """What Serve's deploy schema and, for each Ray Serve LLM application, `LLMServingArgs` make of ``config``."""
    from ray.serve.llm import LLMServingArgs
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
        apps = {}
        for app in config["applications"]:
            if app["import_path"] != "ray.serve.llm:build_openai_app":
                continue
            args = LLMServingArgs.model_validate(app["args"])  # what build_openai_app does first
            ingress = args.ingress_cls_config.ingress_cls
            apps[app["name"]] = {
                "llm_configs": [{
                    "class": f"{type(c).__module__}.{type(c).__qualname__}",
                    "model_id": c.model_id,
                    "model_source": c.model_loading_config.model_source,
                    "accelerator_type": c.accelerator_type,
                    "accelerator_kind": c.accelerator_config.kind,
                    "deployment_config": c.deployment_config,
                    "engine_kwargs": c.engine_kwargs,
                } for c in args.llm_configs],
                "ingress_cls": f"{ingress.__module__}.{ingress.__qualname__}",
                "ingress_deployment_config": args.ingress_deployment_config,
            }
    except Exception as exc:  # noqa: BLE001 - the test reads which error it was
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "apps": apps}


def ingress_app(ingress_cls: type) -> Any:
    """The ASGI app a replica of ``ingress_cls`` serves, built as `build_openai_app` builds it (no Serve running)."""
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, make_fastapi_ingress

    # the transcription route needs python-multipart (a vLLM dependency, absent here); the others are all kept
    endpoints = {k: v for k, v in DEFAULT_ENDPOINTS.items() if k != "transcriptions"}
    wrapped = make_fastapi_ingress(ingress_cls, endpoint_map=endpoints)
    replica = wrapped.__new__(wrapped)  # as Serve does: the wrapper's __init__ is async
    asyncio.run(replica.__init__(llm_deployments={}, model_cards={}))
    return replica._asgi_app


def check_ingress(ingress_path: str, key: str) -> dict[str, Any]:
    """Status codes the configured ingress answers, with and without the key in the environment."""
    from ray.llm._internal.common.utils.import_utils import load_class
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    ingress_cls = load_class(ingress_path)
    out: dict[str, Any] = {}
    os.environ["VITUNE_API_KEY"] = key
    with TestClient(ingress_app(ingress_cls), raise_server_exceptions=False) as client:
        for name, headers in (("no_key", {}), ("wrong_key", {"Authorization": "Bearer nope"}),
                              ("basic_scheme", {"Authorization": f"Basic {key}"})):
            r = client.get("/v1/models", headers=headers)
            out[name] = {"status": r.status_code, "body": r.json(), "www_authenticate": r.headers.get(
                "www-authenticate")}
        r = client.post("/v1/chat/completions", json={"model": "x", "messages": []})
        out["chat_no_key"] = r.status_code
    # behind the check, an authorized request reaches the app unchanged (a small app: Ray's routes need a replica)
    module = sys.modules[ingress_cls.__module__]
    inner = Starlette(routes=[Route("/v1/models", lambda request: PlainTextResponse("inner"))])
    with TestClient(module.BearerKeyMiddleware(inner, key)) as client:
        r = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        out["right_key"] = {"status": r.status_code, "text": r.text}
    os.environ.pop("VITUNE_API_KEY")
    out["unset_wraps"] = type(ingress_app(ingress_cls)).__name__
    return out


def main() -> None:
    # Serve's ingress wrapper has an async __del__ that only a replica awaits; unawaited here, and harmless
    warnings.filterwarnings("ignore", message="coroutine .*__del__.* was never awaited", category=RuntimeWarning)
    spec = json.loads(open(sys.argv[1]).read())
    install_placeholders()
    results = [validate(c) for c in spec["configs"]]
    ingress = results[0]["apps"]["vllm"]["ingress_cls"].rsplit(".", 1) if results[0]["ok"] else None
    from ray.llm._internal.serve.constants import DEFAULT_MAX_TARGET_ONGOING_REQUESTS

    report = {
        "ray_llm_default_target": DEFAULT_MAX_TARGET_ONGOING_REQUESTS,  # when autoscaling_config names none
        "results": results,
        "ingress": check_ingress(":".join(ingress), spec["api_key"]) if ingress else None,
        "vllm_modules": sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm.")),
        "vitune_modules": sorted(m for m in sys.modules if m == "vitune" or m.startswith("vitune.")),
    }
    with open(sys.argv[2], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
