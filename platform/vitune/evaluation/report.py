"""Evaluation reports: the Markdown table of each benchmark, its per-category chart (PNG) and the flat
metrics logged to MLflow."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from vitune.evaluation import llava_bench, scienceqa, suite
from vitune.evaluation.tables import fmt, table


def scienceqa_markdown(report: Mapping[str, Any]) -> str:
    header = ["", *scienceqa.CATEGORIES, "Avg", "n", "failed extraction"]
    rows = []
    for name in ("ours", "judge", "ensemble"):
        part = report.get(name)
        if part:
            cats = [fmt(part["by_category"][c]["accuracy"]) for c in scienceqa.CATEGORIES]
            rows.append([name, *cats, fmt(part["accuracy"]), str(part["n"]), str(part["failed_extraction"])])
    title = (f"ScienceQA ({report['split']}, {report['prompt_format']}, "
             f"{report.get('extraction', 'official')} answer extraction) accuracy, %")
    return f"## {title}\n\n{table(header, rows)}\n"


def llava_bench_markdown(report: Mapping[str, Any]) -> str:
    keys = (*llava_bench.CATEGORIES, "all")
    header = ["", "Conversation", "Detail", "Complex", "All"]
    rel, std = report["relative_score"], report["relative_score_std"]
    rows = [["relative score", *[fmt(rel[k], 1) for k in keys]]]
    if report["repeats"] > 1:
        rows.append([f"std over {report['repeats']} repeats", *[fmt(std[k], 1) for k in keys]])
    scores = report["scores"]
    rows.append(["mean score: reference", *[fmt(scores[k]["reference"]) for k in keys]])
    rows.append(["mean score: ours", *[fmt(scores[k]["ours"]) for k in keys]])
    rows.append(["verdicts scored", *[str(scores[k]["n"]) for k in keys]])
    swapped = report.get("swapped")
    if swapped:
        rows.append(["relative score, answers swapped", *[fmt(swapped["relative_score"][k], 1) for k in keys]])
    counted = report.get("unparseable_counted_as")
    handled = f"counted as {counted} in the means, as LLaVA's summary does" if counted else "left out of the means"
    notes = [f"{report['n']} questions; judge prompt: {report.get('judge_prompt', 'vitune')}; "
             f"{report['unparseable']} unparseable verdicts ({handled}); {report['judge_errors']} failed judge "
             "requests (left out of the means)."]
    if swapped:
        notes.append(f"Position-1 advantage: {fmt(swapped['position1_advantage'])} points "
                     f"over {swapped['n_both_parseable']} questions scored in both orders.")
    return f"## LLaVA-Bench ({report['layout']}) relative score, %\n\n{table(header, rows)}\n\n" + \
        "\n".join(notes) + "\n"


def synthetic_markdown(report: Mapping[str, Any]) -> str:
    kinds = list(report["per_kind"])
    header = ["", *kinds, "overall"]
    rows = [["accuracy", *[fmt(report["per_kind"][k], 3) for k in kinds], fmt(report["accuracy"], 3)],
            ["chance", *[fmt(report["chance"].get(k), 3) for k in kinds], fmt(report["chance"]["overall"], 3)],
            ["n", *[str(report["n_per_kind"][k]) for k in kinds], str(report["n"])]]
    return f"## Synthetic held-out exact match\n\n{table(header, rows)}\n"


MARKDOWN = {"scienceqa": scienceqa_markdown, "llava_bench": llava_bench_markdown, "synthetic": synthetic_markdown,
            **{name: b.markdown for name, b in suite.BENCHMARKS.items()}}


def markdown(report: Mapping[str, Any]) -> str:
    head = (f"# Evaluation: {report['benchmark']}\n\nmodel: `{report.get('model_folder')}`"
            f"{' (training run ' + report['model_run_id'] + ')' if report.get('model_run_id') else ''}\n\n")
    return head + MARKDOWN[report["benchmark"]](report["result"])


def metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The numbers worth plotting, flat, for MLflow."""
    res, bench = report["result"], report["benchmark"]
    out: dict[str, float | None] = {}
    if bench == "scienceqa":
        for name in ("ours", "judge", "ensemble"):
            if res.get(name):
                out[f"{name}.accuracy"] = res[name]["accuracy"]
                out[f"{name}.failed_extraction"] = res[name]["failed_extraction"]
                out.update({f"{name}.{c}": v["accuracy"] for c, v in res[name]["by_category"].items()})
    elif bench == "llava_bench":
        out.update({f"relative.{k}": v for k, v in res["relative_score"].items()})
        out.update({f"relative_std.{k}": v for k, v in res["relative_score_std"].items()})
        out["unparseable"] = res["unparseable"]
        out["judge_errors"] = res["judge_errors"]
        if res.get("swapped"):
            out.update({f"swapped.relative.{k}": v for k, v in res["swapped"]["relative_score"].items()})
            out["position1_advantage"] = res["swapped"]["position1_advantage"]
    elif bench in suite.BENCHMARKS:
        out.update(suite.BENCHMARKS[bench].metrics(res))
    else:
        out["accuracy"] = res["accuracy"]
        out.update({f"accuracy.{k}": v for k, v in res["per_kind"].items()})
        out["chance"] = res["chance"]["overall"]
    inference = report.get("inference") or {}
    for key in ("generated", "resumed", "errors", "new_tokens", "tokens_per_s", "wall_seconds"):
        if key in inference:
            out[f"inference.{key}"] = inference[key]
    return {k: float(v) for k, v in out.items() if v is not None}


CHART_FILE = "chart.png"


def categories(report: Mapping[str, Any]) -> tuple[str, dict[str, float], dict[str, float]]:
    """``(what is plotted, score per category, chance per category)`` for the chart; empty when none."""
    res, bench = report["result"], report["benchmark"]
    if bench == "synthetic":
        chance = {k: v for k, v in res["chance"].items() if k in res["per_kind"] and v is not None}
        return "exact-match accuracy", dict(res["per_kind"]), chance
    if bench == "scienceqa":
        part = res.get("ensemble") or res.get("judge") or res["ours"]
        return "accuracy, %", {c: part["by_category"][c]["accuracy"] for c in scienceqa.CATEGORIES}, {}
    if bench == "llava_bench":
        return "relative score, %", {c: res["relative_score"][c] for c in llava_bench.CATEGORIES}, {}
    if bench in suite.BENCHMARKS:
        return "score", {k: v for k, v in suite.BENCHMARKS[bench].metrics(res).items() if v is not None}, {}
    return "", {}, {}


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
