"""Instruction-data generation (LLaVA §3): captions + boxes → conversation / detail / complex records via any LLM.

``run_generate(cfg)`` is the library entry of ``jobs/generate_instructions.py``:

1. read images (COCO or JSONL, ``vitune.instruct.inputs``) and plan tasks: per kind, ``targets.<kind>``
   images drawn by a seeded shuffle (all of them when the target is larger), one task per (image, kind);
2. run the tasks with Ray Data ``map_batches`` on ``workers`` concurrent Ray tasks, each keeping
   ``threads_per_worker`` requests going through ``LLMClient``; one ``RayLimiter`` actor holds the job-wide
   caps (``endpoint.max_concurrency`` in flight, ``endpoint.requests_per_second``), so the caps hold however
   many workers Ray runs. A task that dies is retried by Ray; the answers it already got come from the
   response cache;
3. parse each output into a LLaVA record (``vitune.instruct.parse``), validate it with
   ``vitune.data.records.validate_record``, drop duplicates (same model text), and quarantine everything else
   with its reason and raw text;
4. write ``<output>/records/<kind>.json``, ``<output>/errors/errors.jsonl`` and ``<output>/summary.json``
   and log the summary, the resolved config and the prompt hashes to MLflow.

Accounting: tasks = records + quarantined + not run, per kind and in total. Tokens and cost count only
requests sent in this run (cache hits are free); ``requests_sent`` includes retries.

Budget (``generate.budget_tokens`` / ``budget_cost``): the job-wide limiter charges every answer; once the
budget is spent no request is sent, the tasks left are counted ``not_run`` (neither records nor quarantined),
the outputs are written with ``complete: false`` and the job ends normally. A rerun continues: every answer
already received comes from the cache, free, so only the tasks not run cost anything.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import ray.data

from vitune import layout, storage
from vitune.config import EndpointConfig, GenerateJobConfig, dump_config
from vitune.data.records import Record, RecordError, validate_record, write_records
from vitune.instruct.inputs import ImageContext, read_inputs
from vitune.instruct.parse import ParseError, build_record, fingerprint
from vitune.instruct.prompts import KINDS, PromptSpec, load_prompts
from vitune.lineage import log_inputs, records_inputs
from vitune.llm_client import LLMClient, LLMError
from vitune.progress import Progress
from vitune.rate_limit import Budget, BudgetExhausted, Limiter, RayLimiter
from vitune.runtime import connect, init_ray
from vitune.tracking import Tracker

log = logging.getLogger(__name__)


def plan_tasks(images: list[ImageContext], prompts: dict[str, PromptSpec], targets: dict[str, int],
               seed: int = 0, decimals: int = 3, max_boxes: int | None = None) -> list[dict[str, Any]]:
    """One task per (image, kind): ``min(target, len(images))`` images per kind, drawn by a seeded shuffle."""
    tasks: list[dict[str, Any]] = []
    for kind, spec in prompts.items():
        n = min(int(targets.get(kind, 0)), len(images))
        order = list(range(len(images)))
        random.Random(f"{seed}:{kind}").shuffle(order)
        for i in sorted(order[:n]):
            img = images[i]
            tasks.append({
                "task_id": f"{img.key}-{kind}",
                "kind": kind,
                "key": img.key,
                "image": img.image,
                "context": img.context(spec.uses_boxes, decimals, max_boxes),
                "question": spec.pick_question(seed, img.key) if kind == "detail" else None,
            })
    return tasks


def process_task(client: LLMClient, spec: PromptSpec, task: dict[str, Any]) -> dict[str, Any]:
    """Ask the LLM for one task and parse the answer; returns a result row (``status`` ok | quarantined)."""
    row: dict[str, Any] = {"task_id": task["task_id"], "kind": task["kind"], "image": task["image"],
                           "cached": False, "attempts": 0, "prompt_tokens": 0, "completion_tokens": 0}
    try:
        res = client.chat(spec.messages(task["context"]), cache_extra=f"{task['kind']}:{task['image']}")
    except BudgetExhausted as exc:  # not a failure of this task: a rerun with budget left does it
        return {**row, "status": "not_run", "reason": "budget", "detail": str(exc)}
    except LLMError as exc:
        return {**row, "status": "quarantined", "reason": "request_failed", "detail": str(exc), "raw": None,
                "attempts": exc.attempts}
    row.update(cached=res.cached, attempts=res.attempts)
    if not res.cached:  # tokens spent in this run
        row.update(prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens)
    try:
        raw = build_record(task["kind"], task["task_id"], task["image"], res.content, question=task["question"],
                           finish_reason=res.finish_reason, extra={"prompt_hash": spec.hash})
        validate_record(raw)
    except ParseError as exc:
        return {**row, "status": "quarantined", "reason": exc.reason, "detail": exc.detail, "raw": res.content}
    except RecordError as exc:
        return {**row, "status": "quarantined", "reason": "invalid_record", "detail": f"{exc.kind}: {exc.problem}",
                "raw": res.content}
    return {**row, "status": "ok", "record": raw}


def generate_batch(batch: dict[str, Any], endpoint: dict, prompts: dict[str, dict], cache_uri: str | None,
                   limiter: Limiter | None, threads: int) -> dict[str, list[str]]:
    """``map_batches`` function: one client per batch, the batch's tasks on ``threads`` threads.

    A plain function (Ray tasks) rather than an actor class: task workers are pooled and reused, and a
    client costs nothing to build next to the seconds each LLM call takes.
    """
    specs = {k: PromptSpec.from_dict(v, f"prompt {k}") for k, v in prompts.items()}
    tasks = [json.loads(t) for t in batch["task"]]
    with LLMClient.from_config(endpoint, cache_uri, limiter) as client, ThreadPoolExecutor(threads) as pool:
        rows = list(pool.map(lambda t: process_task(client, specs[t["kind"]], t), tasks))
    return {"result": [json.dumps(r, ensure_ascii=False) for r in rows]}


def run_tasks(tasks: list[dict[str, Any]], prompts: dict[str, PromptSpec], endpoint: EndpointConfig,
              cache_uri: str | None, workers: int = 2, threads_per_worker: int = 8,
              batch_size: int = 16, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Run the tasks on Ray Data under one job-wide ``RayLimiter`` (with ``budget``); result rows in task order."""
    if not tasks:
        return []
    limiter = RayLimiter.for_endpoint(endpoint, budget)
    try:
        ds = ray.data.from_items([{"task": json.dumps(t, ensure_ascii=False)} for t in tasks])
        ds = ds.map_batches(
            generate_batch,
            fn_kwargs={"endpoint": endpoint.model_dump(), "cache_uri": cache_uri, "limiter": limiter,
                       "prompts": {k: p.to_json() for k, p in prompts.items()}, "threads": threads_per_worker},
            batch_size=batch_size,
            compute=ray.data.TaskPoolStrategy(size=max(1, workers)),
            num_cpus=0.25,  # I/O bound: the tasks wait on the endpoint, not the CPU
        )
        with Progress("generate", len(tasks), "tasks") as bar:
            rows = []
            for r in ds.iter_rows():
                rows.append(json.loads(r["result"]))
                bar.update()
        log.info("limiter: %s", limiter.stats())
    finally:
        limiter.shutdown()
    order = {t["task_id"]: i for i, t in enumerate(tasks)}
    return sorted(rows, key=lambda r: order[r["task_id"]])


def collect(rows: list[dict[str, Any]]) -> tuple[dict[str, list[Record]], list[dict[str, Any]]]:
    """Split result rows into records per kind and quarantine rows; the later of two identical outputs is dropped."""
    records: dict[str, list[Record]] = {k: [] for k in KINDS}
    errors: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for row in rows:
        if row["status"] == "not_run":
            continue
        if row["status"] == "ok":
            fp = fingerprint(row["record"])
            if fp in seen:
                row = {**row, "status": "quarantined", "reason": "duplicate_conversation",
                       "detail": f"same model output as {seen[fp]}", "raw": row["record"]}
            else:
                seen[fp] = row["task_id"]
                records[row["kind"]].append(validate_record(row["record"]))
                continue
        errors.append({"stage": "generate", **{k: row.get(k) for k in
                                                ("task_id", "kind", "image", "reason", "detail", "raw")}})
    return records, errors


def summarize(cfg: GenerateJobConfig, prompts: dict[str, PromptSpec], n_images: int, input_errors: list,
              tasks: list[dict], rows: list[dict], records: dict[str, list[Record]],
              errors: list[dict], wall_s: float) -> dict[str, Any]:
    g = cfg.generate
    prompt_tokens = sum(r["prompt_tokens"] for r in rows)
    completion_tokens = sum(r["completion_tokens"] for r in rows)
    cost = prompt_tokens / 1000 * g.price_per_1k_prompt + completion_tokens / 1000 * g.price_per_1k_completion
    sent = sum(r["attempts"] for r in rows)
    return {
        "model": g.endpoint.model,
        "base_url": g.endpoint.base_url,
        "prompt_hashes": {k: p.hash for k, p in prompts.items()},
        "images": n_images,
        "input_errors": dict(Counter(e.reason for e in input_errors)),
        "tasks": len(tasks),
        "tasks_per_kind": dict(Counter(t["kind"] for t in tasks)),
        "records": sum(len(v) for v in records.values()),
        "records_per_kind": {k: len(v) for k, v in records.items()},
        "quarantined": len(errors),
        "quarantined_by_reason": dict(Counter(e["reason"] for e in errors)),
        "quarantined_per_kind": dict(Counter(e["kind"] for e in errors)),
        "not_run": sum(1 for r in rows if r["status"] == "not_run"),
        "complete": not any(r["status"] == "not_run" for r in rows),
        "budget": {"tokens": g.budget_tokens, "cost": g.budget_cost},
        "requests_sent": sent,
        "retries": sum(max(0, r["attempts"] - 1) for r in rows),
        "cache_hits": sum(1 for r in rows if r["cached"]),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "estimated_cost": round(cost, 6),
        "price_per_1k": {"prompt": g.price_per_1k_prompt, "completion": g.price_per_1k_completion},
        "wall_s": round(wall_s, 3),
        "tasks_per_s": round(len(tasks) / wall_s, 3) if wall_s > 0 else None,
    }


def run_generate(cfg: GenerateJobConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """The whole job: Ray joined (``ray.address``) or started when there is work; returns the summary."""
    g = cfg.generate
    connect(cfg)
    out = layout.generate_output(cfg)
    cache_uri = layout.llm_cache(cfg)
    prompts = load_prompts(g.prompts)
    tracker = Tracker(cfg.tracking, cfg.storage.root, run_name="generate", parent_run_id=parent_run_id,
                      tags={"vitune.job": "generate_instructions"})
    tracker.log_params({"config": cfg.model_dump(mode="json"),
                        "prompt_hash": {k: p.hash for k, p in prompts.items()}})
    tracker.log_text(dump_config(cfg), "config/resolved.yaml")
    # the caption/box files it generates from, with their digests, as the run's MLflow inputs (vitune.lineage)
    log_inputs(tracker, records_inputs([g.input] if isinstance(g.input, str) else list(g.input), "generation"))
    t0 = time.monotonic()
    status = "FAILED"
    try:
        images, input_errors = read_inputs(g.input, g.format, g.image_prefix, g.max_images)
        tasks = plan_tasks(images, prompts, g.targets.model_dump(), g.seed, g.coord_decimals, g.max_boxes)
        log.info("generate: %d images (%d input errors) → %d tasks %s via %s at %s", len(images),
                 len(input_errors), len(tasks), dict(Counter(t["kind"] for t in tasks)), g.endpoint.model,
                 g.endpoint.base_url)
        if tasks:
            init_ray(cfg.ray)
        budget = None
        if g.budget_tokens is not None or g.budget_cost is not None:
            budget = Budget(g.budget_tokens, g.budget_cost, g.price_per_1k_prompt, g.price_per_1k_completion)
        rows = run_tasks(tasks, prompts, g.endpoint, cache_uri, g.workers, g.threads_per_worker, g.batch_size,
                         budget)
        records, errors = collect(rows)
        summary = summarize(cfg, prompts, len(images), input_errors, tasks, rows, records, errors,
                            time.monotonic() - t0)
        if summary["records"] + summary["quarantined"] + summary["not_run"] != summary["tasks"]:  # the accounting
            raise RuntimeError(f"accounting mismatch: {summary}")
        files = {kind: layout.generate_records(out, kind) for kind in records}
        for kind, recs in records.items():
            write_records(recs, files[kind])
        errors_uri = layout.generate_errors(out)
        storage.write_jsonl(errors_uri, [e.to_json() for e in input_errors] + errors)
        summary.update(output=out, record_files=files, errors_file=errors_uri, cache=cache_uri,
                       mlflow_run_id=tracker.run_id)
        storage.write_json(layout.generate_summary(out), summary)
        if not summary["complete"]:
            log.warning("generate: budget spent (%s); %d of %d tasks not run. Rerun to continue: the answers so far "
                        "come from the cache at no cost", summary["budget"], summary["not_run"], summary["tasks"])
        tracker.log_metrics({k: summary[k] for k in ("images", "tasks", "records", "quarantined", "not_run",
                                                     "requests_sent",
                                                     "retries", "cache_hits", "prompt_tokens", "completion_tokens",
                                                     "estimated_cost", "wall_s", "tasks_per_s")})
        tracker.log_metrics({f"records.{k}": v for k, v in summary["records_per_kind"].items()})
        tracker.log_metrics({f"quarantined.{k}": v for k, v in summary["quarantined_by_reason"].items()})
        tracker.log_text(json.dumps(summary, indent=2), "summary.json")
        log.info("generate: %d records %s, %d quarantined %s, %d requests, %d cache hits, %d+%d tokens → %s",
                 summary["records"], summary["records_per_kind"], summary["quarantined"],
                 summary["quarantined_by_reason"], summary["requests_sent"], summary["cache_hits"],
                 summary["prompt_tokens"], summary["completion_tokens"], out)
        status = "FINISHED"
        return summary
    finally:
        tracker.finish(status)
