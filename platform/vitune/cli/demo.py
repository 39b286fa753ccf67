"""``vitune demo``: synthetic data → features → align → finetune → eval → serve → one real HTTP request.

Runs on local Ray with the tiny preset, embedded storage (a local folder) and MLflow (SQLite) — or, with
``--root s3://...`` and ``--tracking-uri``, against an S3 endpoint and an MLflow server. Everything it needs
ships in the package, so it runs from any directory: the preset by name, and the Serve application
(``vitune.serve.app``, which ``serving/config.yaml`` deploys) with ``ServeConfig``'s defaults — the values
that config spells out — for the trained model folder, served under the run's registered model name.
The end prints where everything is and how to look at it.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import time
from typing import Any

import httpx
from ray import serve

from vitune import layout, storage
from vitune.cli import serve as serve_cli
from vitune.config import API_KEY_ENV, RUNS_SCHEME, SyntheticJobConfig, load_config
from vitune.data import synthetic
from vitune.evaluation.report import CHART_FILE
from vitune.pipeline import run_pipeline
from vitune.progress import ray_log_file, ray_session_logs
from vitune.runtime import init_ray
from vitune.tracking import ui_links

log = logging.getLogger(__name__)

APP_NAME = serve_cli.APP_NAME  # the Serve application's name, as in serving/config.yaml


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def serve_model(model_folder: str, model_name: str, port: int, host: str = "127.0.0.1") -> str:
    """Deploy the packaged Serve application for ``model_folder``, served as ``model_name``; its URL."""
    return serve_cli.serve_model({"model": model_folder, "served_model_name": model_name}, port, host)


def ask(url: str, model_name: str, image_png: bytes, question: str, api_key: str | None = None) -> dict[str, Any]:
    """One OpenAI-format chat request with an image, over HTTP; with the VITUNE_API_KEY key when one is set."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    data_url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    body = {"model": model_name, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": question}]}]}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    r.raise_for_status()
    return r.json()


def serve_and_ask(model_folder: str, model_name: str, data: dict[str, Any], port: int) -> tuple[str, dict[str, Any]]:
    """Serve the model, then ask it the colour of one held-out image over HTTP: (URL, the exchange)."""
    url = serve_model(model_folder, model_name, port)
    record = next(r for r in storage.read_json(data["records"]["eval"]) if r["kind"] == "color")
    image = storage.read_bytes(storage.join(data["image_root"], record["image"]))
    question = synthetic.QUESTIONS["color"]
    reply = ask(url, model_name, image, question)
    answer = reply["choices"][0]["message"]["content"]
    return url, {"question": question, "answer": answer, "expected": record["answer"], "usage": reply.get("usage")}


def run_demo(config: str, overrides: list[str], port: int = 8000, keep_serving: bool = False) -> dict[str, Any]:
    """The six steps; what each produced (data, pipeline results, the request and its answer, the URL)."""
    t0 = time.time()
    cfg = load_config(SyntheticJobConfig, config, overrides)
    # clients name the model as the run registers it in MLflow (models:/<name>/<version> serves the same name)
    model_name = cfg.tracking.registered_model or cfg.tracking.experiment
    root = cfg.storage.root
    if cfg.storage.s3_endpoint_url:
        storage.s3.configure_s3(cfg.storage.s3_endpoint_url)
    summary: dict[str, Any] = {"root": root}

    _out(f"[1/6] synthetic data → {layout.synthetic_data(cfg)}")
    s = cfg.synthetic
    data = synthetic.generate(layout.synthetic_data(cfg), seed=s.seed, num_images=s.num_images,
                              num_eval_images=s.num_eval_images, image_size=s.image_size)
    summary["data"] = data
    _out(f"      {s.num_images} training + {s.num_eval_images} held-out images, records: "
         + ", ".join(data["records"].values()))

    # "local": a fresh local Ray, never one that an earlier `ray start` left behind on this machine
    init_ray(cfg.ray.model_copy(update={"address": cfg.ray.address or "local"}), include_dashboard=False)
    steps = iter(["[2/6] feature store", "[3/6] align (stage 1)", "[4/6] finetune (stage 2)",
                  "[5/6] evaluation on held-out images"])
    _out(next(steps) + " ...")

    def progress(msg: str) -> None:
        _out(f"      {msg}")
        nxt = next(steps, None)
        if nxt:
            _out(nxt + " ...")

    results = run_pipeline(config, overrides, progress=progress)
    summary["pipeline"] = results
    ev = results["eval"]["result"]
    _out(f"      accuracy {ev['accuracy']:.3f} vs chance {ev['chance']['overall']:.3f} "
         f"(per kind: {', '.join(f'{k} {v:.2f}' for k, v in ev['per_kind'].items())})")

    _out("[6/6] serving the finetuned model (Ray Serve, OpenAI-compatible API) ...")
    url, request = serve_and_ask(results["finetune"]["model_folder"], model_name, data, port)
    summary.update(request=request, url=url, model_name=model_name)
    _out(f"      POST {url}/v1/chat/completions → {request['answer']!r} (expected {request['expected']!r})")

    summary["ray_logs"] = ray_session_logs()
    _print_summary(summary, results, url, time.time() - t0, keep_serving)
    if keep_serving:
        _out("serving until Ctrl-C ...")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    serve.shutdown()
    return summary


def _print_summary(summary: dict, results: dict, url: str, seconds: float, keep_serving: bool) -> None:
    ev, fine, align = results["eval"]["result"], results["finetune"], results["align"]
    tracking = results["tracking_uri"]
    _out("")
    _out("=" * 78)
    _out(f"vitune demo finished in {seconds:.0f}s")
    _out(f"  data        {summary['data']['root']}")
    _out(f"  features    {results['features']['output']} ({results['features']['features_out']} images, "
         f"{results['features']['quarantined']} quarantined)")
    _out(f"  align       {align['model_folder']}  (MLflow run {align['run_id']}, {align['total_steps']} steps)")
    _out(f"  finetune    {fine['model_folder']}  (MLflow run {fine['run_id']}, {fine['total_steps']} steps)")
    registered = (f"; registered version {fine['registered_version']} carries it as {RUNS_SCHEME}{fine['run_id']}"
                  "/llava-hf" if fine.get("registered_version") else "")
    _out(f"  export      vitune export {fine['model_folder']} ./llava-hf --format llava-hf{registered}")
    _out(f"  eval        accuracy {ev['accuracy']:.3f} vs chance {ev['chance']['overall']:.3f} on {ev['n']} "
         f"held-out questions → {results['eval']['output']}")
    _out(f"  MLflow      {tracking}  (parent run {results['mlflow_parent_run_id']})")
    links = ui_links(tracking, fine.get("experiment_id") or _experiment_of(tracking, fine["run_id"]), fine["run_id"])
    if links["start"]:
        _out(f"              open the UI: {links['start']}  (then {links['ui']})")
    _out(f"              loss curves: {links['loss_curves'] or links['ui']}")
    chart = storage.join(results["eval"]["output"], CHART_FILE)
    if storage.exists(chart):
        _out(f"              eval chart:  {chart}")
    req = summary["request"]
    _out(f"  served      {url}  answered {req['answer']!r} to {req['question']!r}")
    curl_body = json.dumps({"model": summary["model_name"], "messages": [{"role": "user", "content": "Hello"}],
                            "max_tokens": 8})
    state = "up until Ctrl-C" if keep_serving else "stopped now; `vitune demo --keep-serving` keeps it up"
    _out(f"  try it      ({state})")
    auth = f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if os.environ.get(API_KEY_ENV) else ""
    _out(f"              curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{curl_body}'")
    _out(f"              chat page: {url}/")
    ray_log = ray_log_file()
    _out(f"  logs        {'Ray (driver): ' + ray_log + '; ' if ray_log else ''}Ray's workers, raylet, Ray Data: "
         f"{summary.get('ray_logs') or ray_session_logs()}; `vitune -v demo` shows them here")
    _out("=" * 78)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vitune demo", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="a preset name, or a YAML path or URI (default: tiny)")
    p.add_argument("--root", default=None, help="storage root: a local folder or s3://bucket/prefix")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server (else SQLite under the root)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keep-serving", action="store_true", help="keep the model served until Ctrl-C")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.root:
        overrides.append(f"storage.root={args.root}")
    if args.s3_endpoint:
        overrides.append(f"storage.s3_endpoint_url={args.s3_endpoint}")
        os.environ.setdefault("AWS_ENDPOINT_URL", args.s3_endpoint)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    run_demo(args.config, overrides, port=args.port, keep_serving=args.keep_serving)
    return 0


def _experiment_of(tracking_uri: str, run_id: str | None) -> str | None:
    """The experiment id of ``run_id`` (for its UI page); None when the store cannot say."""
    if not run_id:
        return None
    from mlflow.tracking import MlflowClient  # deferred: mlflow is slow to import

    try:
        return MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link less in the summary, nothing more
        return None
