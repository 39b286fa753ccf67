"""Evaluation reports: the Markdown of each benchmark, its per-category chart (PNG) and the flat metrics
logged to MLflow; each benchmark's own part comes from its entry in ``vitune.catalog.BENCHMARKS``."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from vitune import catalog


def markdown(report: Mapping[str, Any]) -> str:
    head = (f"# Evaluation: {report['benchmark']}\n\nmodel: `{report.get('model_folder')}`"
            f"{' (training run ' + report['model_run_id'] + ')' if report.get('model_run_id') else ''}\n\n")
    return head + catalog.load(catalog.benchmark(report["benchmark"]).markdown)(report["result"])


def metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The numbers worth plotting, flat, for MLflow: the benchmark's, then the inference's."""
    out: dict[str, float | None] = dict(catalog.load(catalog.benchmark(report["benchmark"]).metrics)(report["result"]))
    inference = report.get("inference") or {}
    for key in ("generated", "resumed", "errors", "new_tokens", "tokens_per_s", "wall_seconds"):
        if key in inference:
            out[f"inference.{key}"] = inference[key]
    return {k: float(v) for k, v in out.items() if v is not None}


CHART_FILE = "chart.png"


def categories(report: Mapping[str, Any]) -> tuple[str, dict[str, float], dict[str, float]]:
    """``(what is plotted, score per category, chance per category)`` for the chart; empty when none."""
    bench = catalog.BENCHMARKS.get(report["benchmark"])
    if bench is None:
        return "", {}, {}
    if bench.chart:
        return catalog.load(bench.chart)(report["result"])
    scores = catalog.load(bench.metrics)(report["result"])
    return "score", {k: v for k, v in scores.items() if v is not None}, {}


def chart_png(report: Mapping[str, Any]) -> bytes | None:
    """A bar chart of the per-category scores (chance marked where known) as PNG bytes; None without categories."""
    label, scores, chance = categories(report)
    scores = {k: float(v) for k, v in scores.items() if v is not None}
    if not scores:
        return None
    # deferred: matplotlib is a heavy import that only a finished evaluation needs; the Agg canvas draws
    # without a display (no pyplot, so no global backend or figure state)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(scores)
    fig = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(names, [scores[n] for n in names], color="#4c72b0", label=report["benchmark"])
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    marked = [n for n in names if n in chance]
    if marked:
        ax.scatter(marked, [chance[n] for n in marked], marker="_", s=600, color="#c44e52", zorder=3,
                   label="chance")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylabel(label)
    ax.set_title(f"{report['benchmark']}: per category")
    ax.tick_params(axis="x", labelrotation=30 if len(names) > 6 else 0, labelsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
