"""The results table in published units, its files and MLflow table, and ``vitune evaluate --compare``."""

from __future__ import annotations

import json

import pytest

from vitune import storage
from vitune.cli.main import main as vitune_main
from vitune.evaluation import compare, results_table

POPE_RESULT = {"average": {"f1": 0.85874, "accuracy": 0.8712}, "splits": {
    "random": {"f1": 0.8801, "accuracy": 0.8934}, "adversarial": {"f1": 0.8412, "accuracy": 0.8521}}}
MME_RESULT = {"perception": 1510.7497, "cognition": 355.7143}
MMBENCH_RESULT = {"rule": "opencompass_2023", "circular_accuracy": 64.2611, "by_l2_category": {"logic": 30.5}}


def _report(benchmark, result):
    return {"benchmark": benchmark, "result": result, "model_folder": "runs/x/model", "mlflow_run_id": "abc"}


def test_rows_have_published_names_units_and_precision():
    pope = results_table.build(_report("pope", POPE_RESULT))
    assert pope["rows"][:2] == [{"name": "POPE", "value": 85.9, "unit": "%", "raw": pytest.approx(85.874)},
                                {"name": "POPE accuracy", "value": 87.1, "unit": "%", "raw": pytest.approx(87.12)}]
    assert [r["name"] for r in pope["rows"][2:]] == ["POPE random F1", "POPE random accuracy",
                                                     "POPE adversarial F1", "POPE adversarial accuracy"]
    mme = results_table.build(_report("mme", MME_RESULT))
    assert [(r["name"], r["value"], r["unit"]) for r in mme["rows"]] == [("MME", 1510.7, "points"),
                                                                         ("MME cognition", 355.7, "points")]
    mmb = results_table.build(_report("mmbench", MMBENCH_RESULT))
    assert mmb["rules"] == {"mmbench_rule": "opencompass_2023"} and mmb["rows"][0]["value"] == 64.3
    assert "Rules: mmbench_rule: opencompass_2023." in results_table.markdown(mmb)
    sqa = results_table.build(_report("scienceqa", {"ours": {"accuracy": 70.04, "by_category": {
        "IMG": {"accuracy": 66.83}}}, "extraction": "official"}))
    assert [(r["name"], r["value"]) for r in sqa["rows"]] == [("SQA", 66.8), ("SQA all", 70.0)]
    assert results_table.build(_report("vqav2", {}))["rows"] == [{"name": "VQAv2", "value": None, "unit": "%",
                                                                  "raw": None}]
    with pytest.raises(ValueError, match="unknown benchmark 'vizwiz'; valid benchmarks: scienceqa"):
        results_table.build(_report("vizwiz", {}))


class _Tracker:
    active = True

    def __init__(self):
        self.artifacts, self.texts, self.tags = [], {}, {}

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(f"{artifact_path}/{path.rsplit('/', 1)[-1]}")

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text

    def set_tags(self, tags):
        self.tags.update(tags)


def test_write_gives_json_markdown_chart_and_an_mlflow_table(tmp_path):
    tracker = _Tracker()
    tab = results_table.write(str(tmp_path), _report("mme", MME_RESULT), tracker)
    assert json.loads((tmp_path / results_table.JSON_FILE).read_text()) == tab
    assert "| MME | 1510.7 | points |" in (tmp_path / results_table.MARKDOWN_FILE).read_text()
    assert (tmp_path / results_table.CHART_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(tracker.artifacts) == {"eval/results_table.json", "eval/results_table.md", "eval/results_table.png"}
    mlflow_tab = json.loads(tracker.texts[results_table.MLFLOW_TABLE])  # pandas' split orientation
    assert mlflow_tab["columns"] == ["benchmark", "name", "value", "unit", "raw"]
    assert mlflow_tab["data"][0] == ["mme", "MME", 1510.7, "points", pytest.approx(1510.7497)]
    assert json.loads(tracker.tags[results_table.MLFLOW_LOGGED_ARTIFACTS]) == [
        {"path": results_table.MLFLOW_TABLE, "type": "table"}]


def _run_folder(root, benchmark, result):
    out = root / benchmark / "m"
    results_table.write(str(out), _report(benchmark, result), _Tracker())
    return out


def test_compare_a_pipelines_results_with_the_model_zoo(tmp_path, capsys):
    _run_folder(tmp_path / "eval", "pope", POPE_RESULT)
    _run_folder(tmp_path / "eval", "mme", MME_RESULT)
    assert vitune_main(["evaluate", "--compare", str(tmp_path / "eval"), "llava-v1.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "| POPE | % | 85.9 | 85.9 | +0.0 |" in out
    assert "| MME | points | 1510.7 | 1510.7 | +0.0 |" in out
    assert "| GQA | % | – | 62.0 | – |" in out  # only the published row has it
    assert "B: llava-v1.5-7b (published)" in out


def test_compare_two_runs_or_a_run_and_a_yaml_row(tmp_path):
    a = _run_folder(tmp_path / "a", "mmbench", MMBENCH_RESULT)
    b = _run_folder(tmp_path / "b", "mmbench", {**MMBENCH_RESULT, "circular_accuracy": 66.04})
    text = compare.compare_table(compare.load(str(a)), compare.load(str(b / results_table.JSON_FILE)))
    assert "| MM-Bench | % | 64.3 | 66.0 | -1.7 |" in text
    paper = tmp_path / "paper.yaml"
    paper.write_text("name: LLaVA-1.5-7B (paper, Table 4)\nresults:\n  MM-Bench: 64.3\n  MME: 1510.7\n")
    side = compare.load(str(paper))
    assert side.label == "LLaVA-1.5-7B (paper, Table 4)" and side.values == {"MM-Bench": 64.3, "MME": 1510.7}
    report = tmp_path / "report.json"
    storage.write_json(str(report), _report("mme", MME_RESULT))
    assert compare.load(str(report)).values == {"MME": 1510.7, "MME cognition": 355.7}


def test_compare_errors_say_what_a_side_can_be(tmp_path):
    _run_folder(tmp_path / "x", "mme", MME_RESULT)
    _run_folder(tmp_path / "y", "mme", MME_RESULT)
    with pytest.raises(ValueError, match="two results for 'MME'"):
        compare.load(str(tmp_path))
    with pytest.raises(ValueError, match="nor a shipped published row .*llava-v1.5-7b"):
        compare.load("llava-v9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("results:\n  MME: high\n")
    with pytest.raises(ValueError, match="results.MME must be a number"):
        compare.load(str(bad))
