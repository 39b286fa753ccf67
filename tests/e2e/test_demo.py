"""End to end: `vitune demo` (what `make demo` runs) in its own process, started from a folder outside the
repository with nothing of it on the import path — synthetic data → features → align → finetune → eval → serve →
one HTTP request — then the learning check, what the terminal showed (each step's progress, no line of Ray's
internals), the lineage from `vitune serve models:/...`'s `/v1/models` back to the data, the feature store and
the scores (and `vitune models`), and a pipeline re-run that skips."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e import background
from vitune.lineage import MODEL_VERSION_TAG, run_inputs
from vitune.tracking import MODEL_FOLDER_TAG

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

# Learning check thresholds (chance: colour 1/4, shape 1/3, count 1/3, overall 0.31). Measured on the tiny
# preset: colour 1.00, count 0.84–0.94, shape 0.34–0.47, overall 0.73–0.78 (README, "Does it learn?").
MIN_ACCURACY = {"color": 0.8, "count": 0.6}
MIN_OVERALL = 0.55


@pytest.fixture(scope="module")
def demo():
    """The session's `vitune demo` (tests/e2e/background.py: started when collection finished, run from a
    folder outside the repository with nothing of it on the import path), joined."""
    run = background.joined()
    assert run.error is None and run.demo is not None, run.error
    outside = os.path.commonpath([ROOT, str(run.base / "elsewhere")]) != ROOT
    assert outside, "the demo must run from outside the repository"
    assert run.demo.returncode == 0, run.demo.stdout[-3000:] + run.demo.stderr[-5000:]
    return run.root, run.demo.stdout, run.env, run.demo.stderr


def test_demo_answers_over_http_and_prints_summary(demo):
    _, out, _, _ = demo
    assert "vitune demo finished" in out
    assert all(f"[{i}/6]" in out for i in range(1, 7)), out
    m = re.search(r"POST (http://127\.0\.0\.1:\d+)/v1/chat/completions → '(.*)' \(expected '(\w+)'\)", out)
    assert m, out
    assert m.group(2).strip(), "the served model returned an empty answer"
    for needle in ("features ", "align ", "finetune ", "export      vitune export ", "MLflow ", "mlflow ui", "curl ",
                   "loss curves: "):
        assert needle in out


def test_runs_exist_and_loss_falls(demo):
    root, _, _, _ = demo
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
    root, _, _, _ = demo
    report = json.loads((root / "eval" / "synthetic" / "model" / "report.json").read_text())
    result = report["result"]
    assert result["n"] == 96
    for kind, floor in MIN_ACCURACY.items():
        assert result["per_kind"][kind] >= floor, result
    assert result["accuracy"] >= MIN_OVERALL > 1.5 * result["chance"]["overall"], result


def test_pipeline_rerun_skips_finished_steps(demo):
    root, _, env, _ = demo
    proc = subprocess.run([sys.executable, "jobs/pipeline.py", "--config", "tiny",
                           f"storage.root={root}", "steps=features,align,finetune"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout.strip().splitlines()[-1])["steps"]
    assert [s["skipped"] for s in steps] == [True, True, True], steps


# Ray's own console formats: its Python loggers, its C++ core worker, and worker output forwarded to the driver
RAY_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+[A-Z]+ \S+\.py:\d+ -- "
                      r"|^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+\.cc:\d+"
                      r"|^(\x1b\[[\d;]*m)?\((raylet|autoscaler|[^\n]*? pid=\d+[^)]*)\)")


def test_terminal_shows_each_steps_progress_and_no_ray_internals(demo):
    _, out, _, err = demo
    ray_lines = [line for line in (out + err).splitlines() if RAY_LINE.search(line) or "streaming_executor" in line]
    assert not ray_lines, "\n".join(ray_lines[:20])
    for step, unit in (("features", "images"), ("align", "steps"), ("finetune", "steps"), ("answers", "answers")):
        assert re.search(rf"vitune\.progress: {step}: (\d+)/\1 {unit} \(100%\), [\d.]+ {unit}/s", err), (step, err)
    assert re.search(r"vitune\.progress: (align|finetune): \d+/\d+ steps .*loss=", err), err
    # where Ray's logs went instead, and the loss curves' page in the MLflow UI
    m = re.search(r"logs +Ray \(driver\): (\S+); Ray's workers, raylet, Ray Data: (\S+);", out)
    assert m and os.path.getsize(m.group(1)) > 0, out
    assert re.search(r"loss curves: http://127\.0\.0\.1:5000/#/experiments/\d+/runs/\w+/model-metrics", out), out
    assert re.search(r"eval chart: +\S+/chart\.png", out), out


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:32]


def test_served_version_leads_back_to_its_data_features_and_scores(demo):
    """`vitune serve models:/vitune-tiny/latest` → /v1/models names the version → the registry → the finetune
    run's inputs (records file and feature store, digests checked against the files) → the eval scores.
    (The serve command ran right after the demo, in the same background run: tests/e2e/background.py.)"""
    root, _, env, _ = demo
    db = f"sqlite:///{root}/mlflow.db"
    run = background.joined()
    assert run.served is not None and run.served.error is None, run.served
    banner, entry, port = run.served.banner, run.served.entry, run.served.port
    assert f"chat page  http://127.0.0.1:{port}/" in banner and "version 1 of vitune-tiny" in banner, banner

    served = entry["vitune"]
    assert entry["id"] == "vitune-tiny" and served["uri"] == "models:/vitune-tiny/1", entry
    client = MlflowClient(db, registry_uri=db)
    mv = client.get_model_version(served["registered_model"], served["version"])
    assert mv.run_id == served["run_id"] == mv.tags["vitune.finetune_run"]
    assert client.get_run(mv.run_id).data.tags[MODEL_FOLDER_TAG] == str(root / "train" / "finetune" / "model")

    inputs = {i["context"]: i for i in run_inputs(db, mv.run_id)}
    records = inputs["training"]
    assert records["uri"] == str(root / "data" / "instruct.json") and records["digest"] == _sha(records["uri"])
    store = inputs["features"]
    manifest = json.loads(open(os.path.join(store["uri"], "manifest.json")).read())
    assert store["digest"] == _sha(os.path.join(store["uri"], "manifest.json"))
    fingerprint = mv.tags["vitune.features.fingerprint"]
    assert store["tags"]["vitune.fingerprint_id"] == manifest["fingerprint_id"] == fingerprint
    assert inputs["model"]["uri"] == f"runs:/{mv.tags['vitune.align_run']}"

    report = json.loads((root / "eval" / "synthetic" / "model" / "report.json").read_text())
    assert float(mv.tags["vitune.eval.synthetic.accuracy"]) == pytest.approx(report["result"]["accuracy"], abs=1e-5)
    eval_run = client.get_run(mv.tags["vitune.eval.synthetic.run"])
    assert eval_run.data.tags[MODEL_VERSION_TAG] == "models:/vitune-tiny/1"
    assert (root / "eval" / "synthetic" / "model" / "chart.png").read_bytes().startswith(b"\x89PNG")
    assert "chart.png" in {os.path.basename(a.path) for a in client.list_artifacts(eval_run.info.run_id, "eval")}

    listed = subprocess.run([os.path.join(BIN, "vitune"), "models", "--tracking-uri", db], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "models:/vitune-tiny/1" in listed.stdout and "synthetic.accuracy=" in listed.stdout, listed.stdout
