"""One results table per evaluation run, in the names, units and precision of LLaVA-1.5's published tables.

Names are the column names of LLaVA's model zoo (``docs/MODEL_ZOO.md``, LLaVA-v1.5): ``VQAv2``, ``GQA``,
``SQA`` (ScienceQA-IMG: accuracy on the test problems with an image), ``TextVQA``, ``POPE`` (F1 averaged over
the three splits), ``MME`` (perception), ``MM-Bench`` (circular accuracy on dev), ``LLaVA-Bench-Wild``
(relative score), plus companions (``POPE accuracy``, ``MME cognition``, per-split and per-category rows).
Units: MME in points (perception of 2000, cognition of 800), everything else in %; values rounded to one
decimal as published (the unrounded value is kept as ``raw``). The rules that produced the numbers
(MMBench option extraction, ScienceQA answer extraction, LLaVA-Bench judge prompt) are recorded with them.

Written next to ``report.md`` as ``results_table.json``, ``results_table.md`` and ``results_table.png`` (a
bar chart), and to the evaluation's MLflow run as artifacts plus an MLflow table
(``eval/results_table.mlflow.json``, shown in the run's artifact view and loadable with
``mlflow.load_table``). ``vitune evaluate --compare`` (``compare``) prints two tables side by side.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from vitune import catalog, storage
from vitune.evaluation import mmbench_rules
from vitune.evaluation.tables import fmt, table
from vitune.tracking import Tracker

JSON_FILE = "results_table.json"
MARKDOWN_FILE = "results_table.md"
CHART_FILE = "results_table.png"
MLFLOW_TABLE = "eval/results_table.mlflow.json"
MLFLOW_LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # the tag MLflow's own log_table sets for its UI
POINTS = frozenset({"MME", "MME cognition"})
DIGITS = 1  # LLaVA-1.5's tables print one decimal


def unit_of(name: str) -> str:
    return "points" if name in POINTS else "%"


def _pct(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


Entry = tuple[str, float | None]  # (published name, value in the name's unit)


def pope_rows(res: Mapping[str, Any]) -> list[Entry]:
    rows = [("POPE", _pct(res["average"]["f1"])), ("POPE accuracy", _pct(res["average"]["accuracy"]))]
    for split, v in res["splits"].items():
        rows += [(f"POPE {split} F1", _pct(v["f1"])), (f"POPE {split} accuracy", _pct(v["accuracy"]))]
    return rows


def mmbench_rows(res: Mapping[str, Any]) -> list[Entry]:
    return [("MM-Bench", res["circular_accuracy"]),
            *[(f"MM-Bench {k}", v) for k, v in res["by_l2_category"].items()]]


def scienceqa_rows(res: Mapping[str, Any]) -> list[Entry]:
    rows = [("SQA", res["ours"]["by_category"]["IMG"]["accuracy"]), ("SQA all", res["ours"]["accuracy"])]
    if res.get("ensemble"):
        rows.append(("SQA judge ensemble all", res["ensemble"]["accuracy"]))
    return rows


def llava_bench_rows(res: Mapping[str, Any]) -> list[Entry]:
    name = "LLaVA-Bench-Wild" if res.get("layout", "in_the_wild") == "in_the_wild" else "LLaVA-Bench-COCO"
    rel = res["relative_score"]
    return [(name, rel["all"]), *[(f"{name} {k}", v) for k, v in rel.items() if k != "all"]]


def mme_rows(res: Mapping[str, Any]) -> list[Entry]:
    return [("MME", res["perception"]), ("MME cognition", res["cognition"])]


def textvqa_rows(res: Mapping[str, Any]) -> list[Entry]:
    return [("TextVQA", res["accuracy"])]


def gqa_rows(res: Mapping[str, Any]) -> list[Entry]:
    return [("GQA", res["accuracy"])]


def vqav2_rows(res: Mapping[str, Any]) -> list[Entry]:
    return [("VQAv2", None)]  # test-dev: the EvalAI server scores the submission


def synthetic_rows(res: Mapping[str, Any]) -> list[Entry]:
    return [("Synthetic exact match", _pct(res["accuracy"]))]


def mmbench_rule(res: Mapping[str, Any]) -> dict[str, str]:
    return {"mmbench_rule": res.get("rule", mmbench_rules.DEFAULT_RULE)}


def scienceqa_rule(res: Mapping[str, Any]) -> dict[str, str]:
    return {"scienceqa_extraction": res.get("extraction", "official")}


def llava_bench_rule(res: Mapping[str, Any]) -> dict[str, str]:
    return {"llava_bench_judge_prompt": res.get("judge_prompt", "official")}


def _metric_rows(bench: Any, res: Mapping[str, Any]) -> list[Entry]:
    """A benchmark without published names: its MLflow metrics as they are."""
    return list(catalog.load(bench.metrics)(res).items())


def build(report: Mapping[str, Any]) -> dict[str, Any]:
    """The table of one evaluation report: ``{benchmark, model_folder, mlflow_run_id, rules, rows}``."""
    bench, res = report["benchmark"], report["result"]
    entry = catalog.benchmark(bench)  # its `published` rows and `rules` are named by its catalog entry
    entries = catalog.load(entry.published)(res) if entry.published else _metric_rows(entry, res)
    rules = catalog.load(entry.rules)(res) if entry.rules else {}
    rows = [{"name": name, "value": None if v is None else round(float(v), DIGITS), "unit": unit_of(name),
             "raw": None if v is None else float(v)} for name, v in entries]
    return {"benchmark": bench, "model_folder": report.get("model_folder"),
            "mlflow_run_id": report.get("mlflow_run_id"), "rules": rules, "rows": rows}


def markdown(tab: Mapping[str, Any]) -> str:
    body = table(["", "value", "unit"], [[r["name"], fmt(r["value"], DIGITS), r["unit"]] for r in tab["rows"]])
    rules = "; ".join(f"{k}: {v}" for k, v in tab["rules"].items())
    return (f"## Results ({tab['benchmark']}), as LLaVA-1.5's tables print them\n\n{body}\n"
            + (f"\nRules: {rules}.\n" if rules else ""))


def mlflow_table(tab: Mapping[str, Any]) -> dict[str, Any]:
    """The table in the form ``mlflow.log_table`` writes (pandas' ``split`` orientation)."""
    columns = ["benchmark", "name", "value", "unit", "raw", *tab["rules"]]
    data = [[tab["benchmark"], r["name"], r["value"], r["unit"], r["raw"], *tab["rules"].values()]
            for r in tab["rows"]]
    return {"columns": columns, "data": data}


def chart_png(tab: Mapping[str, Any]) -> bytes | None:
    """Horizontal bars of the table's values, one panel per unit; None when nothing has a value."""
    by_unit: dict[str, list[tuple[str, float]]] = {}
    for r in tab["rows"]:
        if r["value"] is not None:
            by_unit.setdefault(r["unit"], []).append((r["name"], r["value"]))
    if not by_unit:
        return None
    # deferred: matplotlib is heavy and only a finished evaluation draws; the Agg canvas needs no display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = 0.9 + 0.32 * sum(len(v) for v in by_unit.values()) + 0.6 * len(by_unit)
    fig = Figure(figsize=(6.4, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(by_unit), 1, squeeze=False,
                        height_ratios=[len(v) for v in by_unit.values()])[:, 0]
    for ax, (unit, items) in zip(axes, by_unit.items(), strict=True):
        names, values = [n for n, _ in items][::-1], [v for _, v in items][::-1]
        bars = ax.barh(names, values, color="#4c72b0")
        ax.bar_label(bars, fmt=f"%.{DIGITS}f", fontsize=8, padding=2)
        ax.set_xlabel(unit)
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(x=0.15)
    axes[0].set_title(f"{tab['benchmark']}: results as published tables print them", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write(out: str, report: Mapping[str, Any], tracker: Tracker) -> dict[str, Any]:
    """Build the run's table, write it under ``out`` (JSON, Markdown, chart) and to the MLflow run (the same
    files as artifacts under ``eval/`` and the MLflow table); returns the table."""
    tab = build(report)
    files: dict[str, bytes] = {JSON_FILE: (json.dumps(tab, indent=2, ensure_ascii=False) + "\n").encode(),
                               MARKDOWN_FILE: markdown(tab).encode()}
    chart = chart_png(tab)
    if chart:
        files[CHART_FILE] = chart
    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data)
    if tracker.active:
        with tempfile.TemporaryDirectory(prefix="vitune-results-") as tmp:
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
                tracker.log_artifact(os.path.join(tmp, name), "eval")
            tracker.log_text(json.dumps(mlflow_table(tab)), MLFLOW_TABLE)
        tracker.set_tags({MLFLOW_LOGGED_ARTIFACTS: json.dumps([{"path": MLFLOW_TABLE, "type": "table"}])})
    return tab
