"""Serving load benchmark: continuous batching vs one request at a time, over real HTTP on local Ray Serve.

Deploys `serving.app` twice on a random-weight model folder (the tiny preset by default; `--lm-hidden`
and `--lm-layers` make a bigger random LM), once with batches of up to `max_batch_size` and once with
`max_batch_size=1`, and drives each with closed-loop streaming clients at concurrency 1, 8 and 32.
Prints one JSON object: requests/s, output tokens/s, p50/p99 latency and time to first token per cell
(the two apps are measured in turn, best of `--repeats` runs, since the host may carry other load),
and the batched / unbatched throughput ratio per concurrency (goal: >= 6x at 32). The same load is then
sent straight into a `ServingEngine` in-process (no HTTP, no Serve) to show what batching alone buys: on
a small CPU host the HTTP path (proxy, API replica, client) competes with the model for the same cores
and caps the end-to-end ratio.

    python benchmarks/serve_load.py [--max-tokens 32] [--max-batch-size 32] [--lm-hidden 256 --lm-layers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("serve_load")


def build_model_folder(out: str, lm_hidden: int | None, lm_layers: int) -> dict[str, Any]:
    """Save a random-weight model folder: the tiny preset, or the tiny preset with a bigger random Llama."""
    from vitune.config import ModelConfig
    from vitune.data.tokenizer import load_tokenizer
    from vitune.model.folder import save_model_folder
    from vitune.model.vision import load_vision_tower
    from vitune.model.vlm import build_model

    cfg = ModelConfig()
    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(cfg.vision)
    lm = None
    if lm_hidden:
        from transformers import LlamaConfig, LlamaForCausalLM

        lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=lm_hidden, intermediate_size=4 * lm_hidden,
            num_hidden_layers=lm_layers, num_attention_heads=max(1, lm_hidden // 64),
            num_key_value_heads=max(1, lm_hidden // 64), max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    model = build_model(cfg, tokenizer, tower.hidden_size, lm=lm)
    save_model_folder(model, tokenizer, cfg, tower.fingerprint(), out)
    n_params = sum(p.numel() for p in model.lm.parameters())
    return {"lm_hidden": model.lm.config.hidden_size, "lm_layers": model.lm.config.num_hidden_layers,
            "lm_parameters": n_params, "tower": cfg.vision.name, "image_positions": tower.num_patches}


def image_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def one_request(http: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Stream one completion: latency and time to first content (s), output tokens and the text."""
    start = time.perf_counter()
    first, tokens, text = None, 0, []
    async with http.stream("POST", "/v1/chat/completions", json=payload) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if content := choice["delta"].get("content"):
                    first = first if first is not None else time.perf_counter() - start
                    text.append(content)
    latency = time.perf_counter() - start
    return {"latency": latency, "ttft": first if first is not None else latency, "tokens": tokens,
            "text": "".join(text)}


async def load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """Closed loop: `concurrency` clients each send their share of `requests` back to back."""
    import httpx

    img = image_url()
    results: list[tuple[float, float, int]] = []

    async def client(worker: int, http: Any) -> None:
        for i in range(worker, requests, concurrency):
            payload = {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": img}},
                {"type": "text", "text": f"Question {i}: what is in the image?"}]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
            results.append(await one_request(http, payload))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(w, http) for w in range(concurrency)])
        wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)

    def pct(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    return {
        "requests": len(results),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "mean_output_tokens": round(tokens / len(results), 1),
        "latency_ms_p50": round(statistics.median(latencies) * 1000, 1),
        "latency_ms_p99": pct(latencies, 0.99),
        "ttft_ms_p50": round(statistics.median(ttfts) * 1000, 1),
        "ttft_ms_p99": pct(ttfts, 0.99),
    }


def engine_only(folder: str, sizes: dict[str, int], concurrency: int, requests: int, max_tokens: int,
                repeats: int) -> dict[str, dict[str, Any]]:
    """The same load straight into `ServingEngine`s in this process (no HTTP, no Serve): batching alone."""
    import torch

    from vitune.config import ServeConfig
    from vitune.serve.engine import ServingEngine
    from vitune.serve.openai import parse_request
    from vitune.serve.request import chat_request_from_openai

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a replica with num_cpus=1
    engines = {mode: ServingEngine.from_config(ServeConfig(model=folder, max_batch_size=size))
               for mode, size in sizes.items()}
    img = image_url()

    async def run(engine: ServingEngine) -> float:
        async def client(worker: int) -> None:
            for i in range(worker, requests, concurrency):
                req = parse_request({"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": img}},
                    {"type": "text", "text": f"Question {i}: what is in the image?"}]}],
                    "max_tokens": max_tokens, "temperature": 0})
                result = await engine.complete(await chat_request_from_openai(req, engine.cfg))
                if result["type"] != "result":
                    raise RuntimeError(result)

        start = time.perf_counter()
        await asyncio.gather(*[client(w) for w in range(concurrency)])
        return time.perf_counter() - start

    out: dict[str, dict[str, Any]] = {}
    try:
        for engine in engines.values():
            asyncio.run(run(engine))  # warm up
        for _ in range(repeats):
            for mode, engine in engines.items():
                before = engine.stats()
                wall = asyncio.run(run(engine))
                after = engine.stats()
                steps = max(1, after["steps"] - before["steps"])
                cell = {"requests_per_s": round(requests / wall, 2),
                        "output_tokens_per_s": round((after["tokens"] - before["tokens"]) / wall, 1),
                        "mean_batch_size": round((after["row_steps"] - before["row_steps"]) / steps, 1),
                        "ms_per_step": round(1000 * (after["busy_s"] - before["busy_s"]) / steps, 2)}
                if mode not in out or cell["requests_per_s"] > out[mode]["requests_per_s"]:
                    out[mode] = cell
    finally:
        for engine in engines.values():
            engine.close()
        torch.set_num_threads(threads)
    return out


def deploy(serve: Any, name: str, folder: str, max_batch_size: int, args: argparse.Namespace) -> None:
    from vitune.serve.app import make_app

    app_args = {"model": folder, "served_model_name": "bench", "max_batch_size": max_batch_size,
                "stream_interval_s": args.stream_interval_s}
    engine = {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": max(64, 2 * max(args.concurrency))}
    serve.run(make_app(app_args, engine, {"ray_actor_options": {"num_cpus": 0.5}}), name=name,
              route_prefix=f"/{name}", logging_config={"log_level": "WARNING", "enable_access_log": False})


def measure(serve: Any, base: str, modes: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each concurrency on each app in turn, `--repeats` times; the best (least disturbed) run is kept.

    Interleaving the modes keeps a change in the host's other load from favouring one of them.
    """
    handles = {m: serve.get_deployment_handle("VLMEngine", app_name=m) for m in modes}
    for mode in modes:
        asyncio.run(load(f"{base}/{mode}", 8, 16, args.max_tokens))  # warm up connections and code paths
    out: dict[str, dict[str, Any]] = {m: {} for m in modes}
    for c in args.concurrency:
        for _ in range(args.repeats):
            for mode in modes:
                before = handles[mode].stats.remote().result()
                cell = asyncio.run(load(f"{base}/{mode}", c, max(args.min_requests, args.rounds * c), args.max_tokens))
                after = handles[mode].stats.remote().result()
                cell["mean_batch_size"] = round((after["row_steps"] - before["row_steps"]) /
                                                max(1, after["steps"] - before["steps"]), 1)
                cell["engine_busy_fraction"] = round((after["busy_s"] - before["busy_s"]) / cell["wall_s"], 2)
                logger.info("%s c=%d: %s", mode, c, cell)
                best = out[mode].get(f"c{c}")
                if best is None or cell["requests_per_s"] > best["requests_per_s"]:
                    out[mode][f"c{c}"] = cell
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=4, help="requests per client at each concurrency")
    parser.add_argument("--min-requests", type=int, default=32)
    parser.add_argument("--lm-hidden", type=int, default=None, help="a bigger random LM (hidden size)")
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell; the best is reported")
    parser.add_argument("--stream-interval-s", type=float, default=0.05)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    # stdout carries only the JSON report: Ray's own messages (some written by its threads) go to stderr
    sys.stdout.flush()
    report_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    import ray
    from ray import serve

    from tests.services import free_port

    pythonpath = os.pathsep.join([str(ROOT / "platform"), str(ROOT)])
    started = time.perf_counter()
    top_c = max(args.concurrency)
    with tempfile.TemporaryDirectory(prefix="vitune-bench-") as tmp:
        folder = str(Path(tmp) / "model")
        model_info = build_model_folder(folder, args.lm_hidden, args.lm_layers)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
            base = f"http://127.0.0.1:{port}"
            for mode, size in (("batched", args.max_batch_size), ("unbatched", 1)):
                deploy(serve, mode, folder, size, args)
            http = measure(serve, base, ["batched", "unbatched"], args)
        finally:
            serve.shutdown()
            ray.shutdown()
        requests = max(args.min_requests, args.rounds * top_c)
        engine = engine_only(folder, {"batched": args.max_batch_size, "unbatched": 1}, top_c, requests,
                             args.max_tokens, args.repeats)

    def ratio(cells: dict[str, dict[str, Any]], key: str) -> float:
        return round(cells["batched"][key] / cells["unbatched"][key], 2)

    report = {
        "benchmark": "serve_load",
        "model": model_info,
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "host_cpus": os.cpu_count(),
        "http": {**http, "batched_over_unbatched": {
            f"c{c}": {k: ratio({m: http[m][f"c{c}"] for m in http}, k)
                      for k in ("requests_per_s", "output_tokens_per_s")} for c in args.concurrency}},
        f"engine_only_c{top_c}": {**engine, "batched_over_unbatched": {
            k: ratio(engine, k) for k in ("requests_per_s", "output_tokens_per_s")}},
        "total_s": round(time.perf_counter() - started, 1),
    }
    report[f"goal_6x_at_c{top_c}"] = {
        "http": report["http"]["batched_over_unbatched"][f"c{top_c}"]["requests_per_s"] >= 6.0,
        "engine_only": report[f"engine_only_c{top_c}"]["batched_over_unbatched"]["requests_per_s"] >= 6.0,
    }
    report_out.write(json.dumps(report, indent=2) + "\n")
    report_out.flush()
    return report


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]
    main()
