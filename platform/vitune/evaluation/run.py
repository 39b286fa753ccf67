"""Driver of ``jobs/evaluate.py``: answers (batch inference or a predictions file) → benchmark → report.

Writes under the output URI: ``answers/`` (the resumable inference shards), ``results.jsonl`` (per
question), ``reviews.jsonl`` (judge verdicts), ``report.json``, ``report.md``, ``results_table.*`` (published
units), ``official/`` (the benchmark's official files) and ``config.yaml``; logs
the metrics and those files to an MLflow run tagged with the model folder and its training run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

from vitune import layout, storage
from vitune.config import EvalConfig, EvalJobConfig, connect, dump_config, ray_init_kwargs
from vitune.evaluation import llava_bench, llava_format, official_formats, results_table, scienceqa, suite
from vitune.evaluation import report as report_lib
from vitune.evaluation.inference import GenerationSettings, run_batch_inference
from vitune.evaluation.judge import Judge
from vitune.evaluation.synthetic import evaluate_synthetic
from vitune.lineage import log_evaluation_lineage
from vitune.tracking import (
    MODEL_FOLDER_TAG,
    RUNS_SCHEME,
    Tracker,
    resolve_tracking_uri,
    run_id_of,
    run_model_folder,
)

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"  # per question (ScienceQA)
REVIEWS = "reviews.jsonl"  # judge verdicts (LLaVA-Bench)


def resolve_model(cfg: EvalJobConfig) -> tuple[str | None, str | None]:
    """``(model folder URI, training run id)`` from ``eval.model_folder`` (a folder, ``runs:/<id>`` or a stage
    name) and ``eval.model_run_id``; local folders come back absolute (batch-inference actors run elsewhere)."""
    ref = cfg.eval.model_folder
    if not ref:
        return None, cfg.eval.model_run_id
    run_id = cfg.eval.model_run_id or run_id_of(ref)
    folder = run_model_folder(ref, resolve_tracking_uri(cfg.tracking, cfg.storage.root))
    if not run_id:
        from vitune.model.folder import read_meta  # deferred: the model package imports torch

        extra = read_meta(folder).get("extra") or {}
        run_id = extra.get("run_id") or extra.get("mlflow_run_id")
    return folder, run_id


def _ray_kwargs(cfg: EvalJobConfig) -> dict[str, Any]:
    return ray_init_kwargs(cfg.ray)


def get_answers(cfg: EvalJobConfig, requests: list[dict[str, Any]], folder: str | None,
                out: str) -> tuple[dict[str, str], dict[str, Any] | None]:
    """Answer texts by id: from ``eval.predictions`` (JSONL ``{question_id|id, text}``) or generated."""
    ev = cfg.eval
    if ev.predictions:  # LLaVA's answers file (or chunk folder) as its scripts leave it; errors name file and line
        texts = llava_format.answer_texts(ev.predictions, [r["id"] for r in requests], limited=ev.limit is not None)
        log.info("scoring %d predictions from %s", len(texts), ev.predictions)
        return texts, None
    if not folder:
        raise ValueError("eval.model_folder: give a model folder URI (or runs:/<run id>), or eval.predictions")
    result = run_batch_inference(requests, folder, out, GenerationSettings.of(ev), _ray_kwargs(cfg))
    return {k: v["text"] for k, v in result.answers.items()}, result.summary()


def _data_root(ev: EvalConfig) -> str:
    if not ev.data:
        raise ValueError(f"eval.data: the {ev.benchmark} data URI is required")
    return ev.data


def evaluate_scienceqa(cfg: EvalJobConfig, folder: str | None, out: str, judge: Judge | None) -> dict[str, Any]:
    ev = cfg.eval
    root = _data_root(ev)
    problems = scienceqa.load_problems(root, ev.split, ev.limit)
    images = ev.images or storage.join(root, "images", ev.split)
    requests = scienceqa.build_requests(problems, ev.prompt_format, images)
    texts, inference = get_answers(cfg, requests, folder, out)
    ours, rows = scienceqa.score(problems, texts, ev.extraction)
    result: dict[str, Any] = {"split": ev.split, "prompt_format": ev.prompt_format, "extraction": ev.extraction,
                              "ours": ours}
    if judge is not None:
        ens = scienceqa.ensemble(problems, texts, lambda msgs: judge.ask_many(msgs), ev.extraction)
        by_pid = {r["pid"]: r for r in ens.pop("rows")}
        for row in rows:
            row.update({k: by_pid[row["pid"]][k] for k in ("judge", "final", "judge_text")})
        result.update(ens)
    storage.write_jsonl(storage.join(out, RESULTS), rows)
    return {"result": result, "inference": inference}


def evaluate_llava_bench(cfg: EvalJobConfig, folder: str | None, out: str, judge: Judge | None) -> dict[str, Any]:
    ev = cfg.eval
    if judge is None:
        raise ValueError("LLaVA-Bench needs a judge: set judge.base_url and judge.model")
    root = _data_root(ev)
    items = llava_bench.load_bench(*llava_bench.file_uris(root, ev.layout, ev.questions, ev.context, ev.references),
                                   limit=ev.limit)
    requests = llava_bench.build_requests(items, ev.images or storage.join(root, "images"))
    texts, inference = get_answers(cfg, requests, folder, out)
    missing = [it.question_id for it in items if it.question_id not in texts]
    if missing:
        log.warning("%d questions have no answer (scored as empty answers), e.g. %s", len(missing), missing[:3])
    answers = {it.question_id: texts.get(it.question_id, "") for it in items}
    result, rows = llava_bench.judge_bench(items, answers, judge.ask_many, cfg.judge.repeats, cfg.judge.swap_order,
                                           style=llava_bench.judge_style(ev.judge_prompt, ev.layout))
    result["layout"] = ev.layout
    storage.write_jsonl(storage.join(out, REVIEWS), rows)
    return {"result": result, "inference": inference}


def evaluate_synthetic_set(cfg: EvalJobConfig, folder: str | None, out: str, judge: Judge | None) -> dict[str, Any]:
    ev = cfg.eval
    data = _data_root(ev)
    if not folder:
        raise ValueError("eval.model_folder: the synthetic eval generates answers; give a model folder")
    images = ev.images or data.rstrip("/").rsplit("/", 1)[0]
    result = evaluate_synthetic(folder, data, images, out, GenerationSettings.of(ev), _ray_kwargs(cfg))
    return {"result": result, "inference": result.pop("inference")}


def evaluate_suite(cfg: EvalJobConfig, folder: str | None, out: str, judge: Judge | None) -> dict[str, Any]:
    """POPE, MME, TextVQA, GQA, MMBench or VQAv2: LLaVA's question files → answers → the benchmark's scorer."""
    return suite.get(cfg.eval.benchmark).run(cfg, out, lambda reqs: get_answers(cfg, reqs, folder, out))


BENCHMARKS = {"scienceqa": evaluate_scienceqa, "llava_bench": evaluate_llava_bench,
              "synthetic": evaluate_synthetic_set, **{name: evaluate_suite for name in suite.BENCHMARKS}}


def write_report(out: str, report: dict[str, Any], tracker: Tracker, cfg: EvalJobConfig) -> None:
    md = report_lib.markdown(report)
    chart = report_lib.chart_png(report)
    if chart:  # the per-category chart, next to the Markdown that shows it
        storage.write_bytes(storage.join(out, report_lib.CHART_FILE), chart)
        md += f"\n![per-category scores]({report_lib.CHART_FILE})\n"
    files = {"report.json": json.dumps(report, indent=2, ensure_ascii=False) + "\n", "report.md": md,
             "config.yaml": dump_config(cfg)}
    for name, text in files.items():
        storage.write_text(storage.join(out, name), text)
    tracker.log_metrics(report_lib.metrics(report))
    results_table.write(out, report, tracker)  # the published-units table: JSON, Markdown, chart, MLflow table
    official_formats.log_to_mlflow(tracker, out, report["result"].get("official_files", []))
    with tempfile.TemporaryDirectory(prefix="vitune-eval-") as tmp:
        for name in (*files, report_lib.CHART_FILE, RESULTS, REVIEWS, llava_format.ANSWERS_FILE):
            uri = storage.join(out, name)
            if storage.exists(uri):
                path = os.path.join(tmp, name)
                with open(path, "wb") as f:
                    f.write(storage.read_bytes(uri))
                tracker.log_artifact(path, "eval")


def run_evaluation(cfg: EvalJobConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run ``cfg.eval.benchmark`` end to end; returns the report (also written under its output URI)."""
    ev = cfg.eval
    connect(cfg)  # Ray is joined or started by batch inference, only when answers are generated
    folder, run_id = resolve_model(cfg)
    out = layout.eval_output(cfg, folder)
    wants_judge = ev.benchmark == "llava_bench" or (ev.benchmark == "scienceqa" and ev.ensemble)
    tags = {"vitune.benchmark": ev.benchmark, MODEL_FOLDER_TAG: folder or "", "vitune.eval_output": out}
    if run_id:
        tags.update({"vitune.model_run_id": run_id, "vitune.model_run": f"{RUNS_SCHEME}{run_id}"})
    tracker = Tracker(cfg.tracking, cfg.storage.root, run_name=f"eval-{ev.benchmark}", tags=tags,
                      parent_run_id=parent_run_id)
    tracker.log_params(cfg.model_dump(mode="json"))
    judge = Judge(cfg.judge, cfg.storage.root) if wants_judge else None
    log.info("evaluating %s on %s → %s", folder or ev.predictions, ev.benchmark, out)
    try:
        report = {"benchmark": ev.benchmark, "model_folder": folder, "model_run_id": run_id,
                  "predictions": ev.predictions, "output": out, "mlflow_run_id": tracker.run_id,
                  **BENCHMARKS[ev.benchmark](cfg, folder, out, judge)}
        if judge is not None:
            report["judge"] = judge.stats()
        # the data and the model as the run's inputs; the scores onto the registered version it evaluated
        report["model_versions"] = log_evaluation_lineage(tracker, ev.data, folder, run_id, ev.benchmark,
                                                          report_lib.metrics(report))
        write_report(out, report, tracker, cfg)
    except Exception:
        tracker.finish("FAILED")
        raise
    finally:
        if judge is not None:
            judge.close()
    tracker.finish()
    return report
