"""Driver of ``jobs/evaluate.py``: answers (batch inference or a predictions file) → benchmark → report.

The benchmark is ``eval.benchmark``'s entry in ``vitune.catalog.BENCHMARKS``: its runner gets the answers
and, where it asks for one, the judge. Writes under the output URI: ``answers/`` (the resumable inference
shards), what the benchmark writes (``results.jsonl`` per question, ``reviews.jsonl`` judge verdicts, ...),
``report.json``, ``report.md``, ``chart.png``, ``results_table.*`` (published units), ``official/`` (the
benchmark's official files) and ``config.yaml``; logs the metrics and those files to an
MLflow run tagged with the model folder and its training run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

from vitune import catalog, layout, storage
from vitune.config import RUNS_SCHEME, EvalJobConfig, dump_config
from vitune.evaluation import llava_format, official_formats, results_table
from vitune.evaluation import report as report_lib
from vitune.evaluation.inference import GenerationSettings, run_batch_inference
from vitune.evaluation.judge import Judge
from vitune.lineage import log_evaluation_lineage
from vitune.references import resolve_model, run_id_of
from vitune.runtime import connect, ray_init_kwargs
from vitune.tracking import MODEL_FOLDER_TAG, Tracker, resolve_tracking_uri

log = logging.getLogger(__name__)


def model_and_run(cfg: EvalJobConfig) -> tuple[str | None, str | None]:
    """``(model folder URI, training run id)`` from ``eval.model_folder`` (a folder, ``runs:/<id>`` or a stage
    name) and ``eval.model_run_id``; local folders come back absolute (batch-inference actors run elsewhere)."""
    ref = cfg.eval.model_folder
    if not ref:
        return None, cfg.eval.model_run_id
    run_id = cfg.eval.model_run_id or run_id_of(ref)
    tracking_uri = resolve_tracking_uri(cfg.tracking, cfg.storage.root)
    folder = resolve_model(ref, root=cfg.storage.root, tracking_uri=tracking_uri)
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


def job_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The line ``jobs/evaluate.py`` prints: where the report is and its metrics."""
    return {"benchmark": report["benchmark"], "output": report["output"], "run_id": report["mlflow_run_id"],
            "metrics": report_lib.metrics(report)}


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
        # every file beside the answers' folder: the report's, and what the benchmark wrote (results, verdicts)
        for uri in storage.list_files(out, recursive=False):
            path = os.path.join(tmp, uri.rstrip("/").rsplit("/", 1)[-1])
            with open(path, "wb") as f:
                f.write(storage.read_bytes(uri))
            tracker.log_artifact(path, "eval")


def run_evaluation(cfg: EvalJobConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run ``cfg.eval.benchmark`` end to end; returns the report (also written under its output URI)."""
    ev = cfg.eval
    connect(cfg)  # Ray is joined or started by batch inference, only when answers are generated
    folder, run_id = model_and_run(cfg)
    out = layout.eval_output(cfg, folder)
    bench = catalog.benchmark(ev.benchmark)
    tags = {"vitune.benchmark": ev.benchmark, MODEL_FOLDER_TAG: folder or "", "vitune.eval_output": out}
    if run_id:
        tags.update({"vitune.model_run_id": run_id, "vitune.model_run": f"{RUNS_SCHEME}{run_id}"})
    tracker = Tracker(cfg.tracking, cfg.storage.root, run_name=f"eval-{ev.benchmark}", tags=tags,
                      parent_run_id=parent_run_id)
    tracker.log_params(cfg.model_dump(mode="json"))
    judge = Judge(cfg.judge, cfg.storage.root) if bench.wants_judge(ev) else None
    log.info("evaluating %s on %s → %s", folder or ev.predictions, ev.benchmark, out)
    try:
        report = {"benchmark": ev.benchmark, "model_folder": folder, "model_run_id": run_id,
                  "predictions": ev.predictions, "output": out, "mlflow_run_id": tracker.run_id,
                  **catalog.load(bench.run)(cfg, out, lambda reqs: get_answers(cfg, reqs, folder, out), judge)}
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
