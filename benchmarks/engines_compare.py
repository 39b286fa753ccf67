"""Engines compared: vitune's own engine and vLLM (Ray Serve LLM) on the same model, requests and GPU.

For a GPU machine: without a CUDA GPU, or without an interpreter that imports vLLM, it exits 2 saying which
is missing (it has not been run on this project's CPU machines).

Each engine is served as the repository deploys it, by `serve run` of a config derived from its deploy config:
vitune's from serving/config.yaml (`serving.app:build_app`, the VLMEngine on one GPU), vLLM's from
serving/vllm.yaml (`ray.serve.llm:build_openai_app`). One replica each (autoscaling off), one at a time, so
each has the GPU to itself. vLLM runs in its own environment (ray[llm]==2.60.0 pins vLLM 0.29.0 and torch
2.13.0; vitune pins torch 2.14.1): `--vllm-python` is its interpreter (the image of cluster/Dockerfile.vllm,
or a venv with `pip install "ray[llm]==2.60.0"`); this driver runs in vitune's environment.

The model: `--model` (a vitune model folder URI, `runs:/...` or `models:/NAME/VERSION`) serves on vitune's
engine, its llava-hf export (written here unless `--export` names one) on vLLM, both in `--dtype` (vLLM's
"auto" would halve a float32 folder that vitune's engine serves in float32). The requests: `--requests` chat
completions per concurrency level, request i = fixed prompt i mod 8 with seeded synthetic image i mod 8,
greedy, `--max-tokens`, streamed with usage, closed loop at each `--concurrency`. Prints one JSON object: per
engine and level requests/s, output tokens/s, latency and time-to-first-token percentiles; the vllm / vitune
ratios; and how many greedy answers the two engines agree on.

    python benchmarks/engines_compare.py --model ./runs/tiny/train/finetune/model --vllm-python /opt/vllm/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from vitune.cli import manifests
from vitune.config import ServeConfig
from vitune.model.export import EXPORT_META, export_llava_hf
from vitune.references import resolve_model

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks.serve_load` importable
    sys.path.insert(0, str(ROOT))
from benchmarks.serve_load import one_request  # noqa: E402 - after the path above; the same HTTP client

logger = logging.getLogger("engines_compare")
MODEL_ID = "bench"
PROMPTS = [
    "What is in the image?", "Describe the image in one sentence.", "What colours do you see?",
    "How many shapes are there?", "Where is the largest shape?", "Is there a circle in the picture?",
    "What is the background colour?", "Give the image a short title.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="vitune model folder URI, runs:/<run id> or models:/NAME/VERSION")
    p.add_argument("--export", help="its llava-hf export (default: exported into a temporary folder)")
    p.add_argument("--vllm-python", default=sys.executable,
                   help="interpreter of an environment with ray[llm]==2.60.0 (vLLM) (default: this one)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--startup-timeout-s", type=float, default=1800, help="for an engine to answer /v1/models")
    p.add_argument("--tracking-uri", default=None, help="MLflow, for runs:/ and models:/")
    return p.parse_args(argv)


def missing_prerequisites(vllm_python: str) -> list[str]:
    """What this machine lacks for the comparison: a CUDA GPU, an interpreter that imports vLLM."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    try:
        probe = subprocess.run([vllm_python, "-c", "import vllm, ray.serve.llm"], capture_output=True, text=True,
                               timeout=300)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            missing.append(f"vLLM: {vllm_python} cannot import vllm / ray.serve.llm ({last}); pass --vllm-python "
                           "of an environment with ray[llm]==2.60.0 (cluster/Dockerfile.vllm builds one)")
    except OSError as exc:
        missing.append(f"vLLM: cannot run {vllm_python} ({exc})")
    return missing


def image_url(seed: int) -> str:
    """A synthetic picture (a few coloured shapes on a plain ground) as a PNG data URL; the same for a seed."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (336, 336), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, 240, 2))
        size = int(rng.integers(30, 96))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + size, y0 + size), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def payloads(count: int, max_tokens: int) -> list[dict[str, Any]]:
    images = [image_url(seed) for seed in range(len(PROMPTS))]
    return [{"model": MODEL_ID, "max_tokens": max_tokens, "temperature": 0, "stream": True,
             "stream_options": {"include_usage": True},
             "messages": [{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                 {"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]}]} for i in range(count)]


def _one_app(config: dict[str, Any], import_path: str) -> dict[str, Any]:
    (app,) = [a for a in config["applications"] if a["import_path"] == import_path]
    config["applications"] = [app]
    return app


def vitune_serve_config(model: str, dtype: str, port: int) -> dict[str, Any]:
    """serving/config.yaml with the model, one GPU replica of each deployment, on ``port``."""
    config = yaml.safe_load((ROOT / manifests.SERVE_CONFIG).read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = _one_app(config, "serving.app:build_app")
    app["args"].update({"model": model, "served_model_name": MODEL_ID, "dtype": dtype, "device": "cuda"})
    ServeConfig.model_validate(app["args"])  # the engine's own check, before minutes of start-up
    app["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "platform")])}}
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        if deployment["name"] == manifests.ENGINE:
            deployment.setdefault("ray_actor_options", {})["num_gpus"] = 1
    return config


def vllm_serve_config(export: Path, dtype: str, port: int) -> dict[str, Any]:
    """serving/vllm.yaml over ``export``: one replica, any GPU type, the export's overrides and context length."""
    config = yaml.safe_load(manifests.render_vllm_serve_config(
        (ROOT / manifests.VLLM_SERVE_CONFIG).read_text(), str(export)))
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = _one_app(config, "ray.serve.llm:build_openai_app")
    meta = json.loads((export / EXPORT_META).read_text())
    text_config = json.loads((export / "config.json").read_text())["text_config"]
    (llm,) = app["args"]["llm_configs"]
    llm["model_loading_config"]["model_id"] = MODEL_ID
    llm.pop("accelerator_type", None)  # whichever GPU this machine has
    llm["deployment_config"].pop("autoscaling_config", None)
    llm["deployment_config"]["num_replicas"] = 1
    llm["engine_kwargs"].update({"dtype": dtype, "hf_overrides": meta["vllm_hf_overrides"],
                                 # vitune's engine: the model's max_length, capped by the LM's positions
                                 "max_model_len": min(meta["model"]["max_length"],
                                                      text_config["max_position_embeddings"])})
    ingress = app["args"]["ingress_deployment_config"]
    ingress.pop("autoscaling_config", None)
    ingress["num_replicas"] = 1
    app["runtime_env"] = {"env_vars": {"PYTHONPATH": str(ROOT)}}  # serving.vllm_ingress; no vitune there
    return config


@contextlib.contextmanager
def served(python: str, config: dict[str, Any], timeout_s: float) -> Iterator[str]:
    """`serve run` of ``config`` under ``python`` until /v1/models answers; yields the base URL, then stops it."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f, sort_keys=False)
    env = {k: v for k, v in os.environ.items() if k != "VITUNE_API_KEY"}  # both engines without auth
    env.update(RAY_AUTH_MODE="token", PYTHONPATH=config["applications"][0]["runtime_env"]["env_vars"]["PYTHONPATH"])
    base = f"http://127.0.0.1:{config['http_options']['port']}"
    proc = None
    try:
        # its own session: stopping it reaches the local Ray it starts, and nothing else
        proc = subprocess.Popen([python, "-m", "ray.serve.scripts", "run", f.name], cwd=ROOT, env=env,
                                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {proc.returncode} before {base}/v1/models answered")
            with contextlib.suppress(httpx.HTTPError):
                if MODEL_ID in httpx.get(f"{base}/v1/models", timeout=5).text:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base}/v1/models did not answer within {timeout_s:.0f} s")
            time.sleep(5)
        yield base
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve and its local Ray down on Ctrl-C
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        os.unlink(f.name)


async def run_level(base: str, requests: list[dict[str, Any]], concurrency: int) -> tuple[dict, list[str]]:
    """Closed loop: ``concurrency`` clients send ``requests`` back to back; the summary and the texts in order."""
    results: list[dict[str, Any] | None] = [None] * len(requests)

    async def client(worker: int, http: Any) -> None:
        for i in range(worker, len(requests), concurrency):
            results[i] = await one_request(http, requests[i])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=1200, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(w, http) for w in range(concurrency)])
        wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    latencies = np.array([r["latency"] for r in done]) * 1000
    ttfts = np.array([r["ttft"] for r in done]) * 1000
    tokens = sum(r["tokens"] for r in done)
    summary = {"requests": len(done), "wall_s": round(wall, 2), "requests_per_s": round(len(done) / wall, 3),
               "output_tokens_per_s": round(tokens / wall, 1), "mean_output_tokens": round(tokens / len(done), 1),
               **{f"latency_ms_p{q}": round(float(np.percentile(latencies, q)), 1) for q in (50, 90, 99)},
               **{f"ttft_ms_p{q}": round(float(np.percentile(ttfts, q)), 1) for q in (50, 99)}}
    return summary, [r["text"] for r in done]


def measure(base: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    asyncio.run(run_level(base, payloads(8, args.max_tokens), 4))  # warm up: compile, caches, connections
    cells, texts = {}, []
    for c in args.concurrency:
        cells[f"c{c}"], level_texts = asyncio.run(run_level(base, payloads(args.requests, args.max_tokens), c))
        texts = texts or level_texts
        logger.info("c=%d: %s", c, cells[f"c{c}"])
    return cells, texts


def compare(args: argparse.Namespace, export: Path) -> dict[str, Any]:
    engines = {"vitune": (sys.executable, vitune_serve_config(args.model, args.dtype, args.port)),
               "vllm": (args.vllm_python, vllm_serve_config(export, args.dtype, args.port))}
    report: dict[str, Any] = {"benchmark": "engines_compare", "model": args.model, "export": str(export),
                              "dtype": args.dtype, "max_tokens": args.max_tokens, "requests": args.requests}
    texts = {}
    for name, (python, config) in engines.items():
        logger.info("serving %s", name)
        with served(python, config, args.startup_timeout_s) as base:
            report[name], texts[name] = measure(base, args)
    report["vllm_over_vitune"] = {
        level: {k: round(report["vllm"][level][k] / report["vitune"][level][k], 2)
                for k in ("requests_per_s", "output_tokens_per_s", "latency_ms_p50", "ttft_ms_p50")}
        for level in report["vitune"]}
    same = sum(a == b for a, b in zip(texts["vitune"], texts["vllm"], strict=True))
    report["greedy_answers_equal"] = f"{same}/{len(texts['vitune'])}"  # same weights, same prompt; dtype may differ
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    missing = missing_prerequisites(args.vllm_python)
    if missing:
        logger.error("engines_compare needs a GPU machine with vLLM; missing: %s", "; ".join(missing))
        return 2
    with tempfile.TemporaryDirectory(prefix="vitune-engines-") as tmp:
        model = resolve_model(args.model, tracking_uri=args.tracking_uri, download_dir=str(Path(tmp) / "model"))
        args.model = model  # both engines read the same folder (a models:/ source is downloaded once)
        export = Path(args.export) if args.export else Path(export_llava_hf(model, str(Path(tmp) / "llava-hf")))
        report = compare(args, export)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
