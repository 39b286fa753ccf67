"""End to end: `vitune demo` (what `make demo` runs) in its own process, started from a folder outside the
repository with nothing of it on the import path — synthetic data → features → align → finetune → eval → serve →
one HTTP request — then the learning check and a pipeline re-run that skips."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.services import free_port

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

# Learning check thresholds (chance: colour 1/4, shape 1/3, count 1/3, overall 0.31). Measured on the tiny
# preset: colour 1.00, count 0.84–0.94, shape 0.34–0.47, overall 0.73–0.78 (README, "Does it learn?").
MIN_ACCURACY = {"color": 0.8, "count": 0.6}
MIN_OVERALL = 0.55


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    root, cwd = base / "run", base / "elsewhere"
    cwd.mkdir()
    assert os.path.commonpath([ROOT, str(cwd)]) != ROOT, "the demo must run from outside the repository"
    # the installed command alone: no PYTHONPATH, so neither the driver nor a Serve replica can see the repository
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    proc = subprocess.run([os.path.join(BIN, "vitune"), "demo", "--root", str(root), "--port", str(free_port())],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, proc.stdout, env


def test_demo_answers_over_http_and_prints_summary(demo):
    _, out, _ = demo
    assert "vitune demo finished" in out
    assert all(f"[{i}/6]" in out for i in range(1, 7)), out
    m = re.search(r"POST (http://127\.0\.0\.1:\d+)/v1/chat/completions → '(.*)' \(expected '(\w+)'\)", out)
    assert m, out
    assert m.group(2).strip(), "the served model returned an empty answer"
    for needle in ("features ", "align ", "finetune ", "export      vitune export ", "MLflow ", "mlflow ui", "curl "):
        assert needle in out


def test_runs_exist_and_loss_falls(demo):
    root, _, _ = demo
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vitune-tiny").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"pipeline", "extract_features", "align", "finetune", "eval-synthetic"} <= set(by_name)
    parent = by_name["pipeline"].info.run_id
    for name in ("extract_features", "align", "finetune", "eval-synthetic"):
        assert by_name[name].data.tags.get("mlflow.parentRunId") == parent
        assert by_name[name].info.status == "FINISHED"
    loss = [m.value for m in client.get_metric_history(by_name["finetune"].info.run_id, "loss")]
    assert len(loss) >= 10
    assert sum(loss[-3:]) / 3 < 0.3 * sum(loss[:3]) / 3, loss


def test_learning_check_beats_chance(demo):
    root, _, _ = demo
    report = json.loads((root / "eval" / "synthetic" / "model" / "report.json").read_text())
    result = report["result"]
    assert result["n"] == 96
    for kind, floor in MIN_ACCURACY.items():
        assert result["per_kind"][kind] >= floor, result
    assert result["accuracy"] >= MIN_OVERALL > 1.5 * result["chance"]["overall"], result


def test_pipeline_rerun_skips_finished_steps(demo):
    root, _, env = demo
    proc = subprocess.run([sys.executable, "jobs/pipeline.py", "--config", "tiny",
                           f"storage.root={root}", "steps=features,align,finetune"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout.strip().splitlines()[-1])["steps"]
    assert [s["skipped"] for s in steps] == [True, True, True], steps
