"""Lineage on the embedded MLflow store (SQLite, no Ray): a training run's inputs (records with their digest,
the feature store with its fingerprint and manifest digest, the model it starts from), the registered
version's tags, an evaluation's link to that version and its scores on it, `vitune models`, and artifacts
kept under the storage root rather than in the working directory."""

from __future__ import annotations

import hashlib
import json
import os

from mlflow.tracking import MlflowClient

from vitune import lineage
from vitune.cli import models as models_cli
from vitune.config import TrackingConfig
from vitune.lineage import MODEL_VERSION_TAG, registry_lineage, run_inputs
from vitune.model.folder import META_FILE
from vitune.tracking import MODEL_FOLDER_TAG, Tracker, ui_links


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:lineage.DIGEST_LEN]


def test_registered_version_leads_back_to_data_features_and_scores(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = str(tmp_path / "root")
    records = tmp_path / "instruct.json"
    records.write_text(json.dumps([{"id": "1", "image": "a.png", "conversations": []}]))
    store = tmp_path / "features"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"fingerprint_id": "abc123", "counts": {"features_out": 1}}))
    align_folder, fine_folder = tmp_path / "align" / "model", tmp_path / "finetune" / "model"
    for folder in (align_folder, fine_folder):
        folder.mkdir(parents=True)
        (folder / META_FILE).write_text("{}")
    cfg = TrackingConfig(experiment="lineage", registered_model="lin")

    align = Tracker(cfg, root, run_name="align", tags={"vitune.stage": "align"})
    align.set_tags({MODEL_FOLDER_TAG: str(align_folder)})
    align.finish()
    fine = Tracker(cfg, root, run_name="finetune", tags={"vitune.stage": "finetune"})
    tags = lineage.log_training_inputs(fine, [str(records)], str(store), str(align_folder))
    fine.set_tags({MODEL_FOLDER_TAG: str(fine_folder)})
    version = fine.register_model("lin", tags={**tags, "vitune.finetune_run": fine.run_id})
    fine.finish()
    assert version == "1"

    # as evaluation/run.py opens it: tagged with the folder it evaluates, like the run that wrote the folder
    evaluation = Tracker(cfg, root, run_name="eval-synthetic", tags={MODEL_FOLDER_TAG: str(fine_folder)})
    uris = lineage.log_evaluation_lineage(evaluation, str(records), str(fine_folder), None, "synthetic",
                                          {"accuracy": 0.8125})
    evaluation.finish()
    assert uris == ["models:/lin/1"]

    client = MlflowClient(fine.uri, registry_uri=fine.uri)
    mv = client.get_model_version("lin", "1")
    assert mv.tags["vitune.data.digest"] == lineage.digest_bytes(_sha(records).encode())
    assert mv.tags["vitune.features.fingerprint"] == "abc123"
    assert mv.tags["vitune.features.manifest_digest"] == _sha(store / "manifest.json")
    assert (mv.tags["vitune.align_run"], mv.tags["vitune.finetune_run"]) == (align.run_id, fine.run_id)
    assert mv.tags["vitune.eval.synthetic.accuracy"] == "0.8125"
    assert mv.tags["vitune.eval.synthetic.run"] == evaluation.run_id

    inputs = {i["context"]: i for i in run_inputs(fine.uri, mv.run_id)}
    assert inputs["training"]["uri"] == str(records) and inputs["training"]["digest"] == _sha(records)
    assert inputs["features"]["uri"] == str(store)
    assert inputs["features"]["digest"] == mv.tags["vitune.features.manifest_digest"]
    assert inputs["features"]["tags"][lineage.FINGERPRINT_TAG] == "abc123"
    assert inputs["model"]["uri"] == f"runs:/{align.run_id}"
    ev_inputs = {i["context"]: i for i in run_inputs(fine.uri, evaluation.run_id)}
    assert ev_inputs["model"]["uri"] == "models:/lin/1" and ev_inputs["evaluation"]["digest"] == _sha(records)
    assert client.get_run(evaluation.run_id).data.tags[MODEL_VERSION_TAG] == "models:/lin/1"

    # artifacts of the embedded store live under the storage root, not in ./mlruns of the working directory
    assert client.get_run(fine.run_id).info.artifact_uri.startswith(os.path.join(root, "mlflow-artifacts"))
    assert not (cwd / "mlruns").exists()

    # what `vitune serve models:/lin/latest` names in /v1/models
    served = registry_lineage("models:/lin/latest", fine.uri)
    assert (served["uri"], served["run_id"], served["version"]) == ("models:/lin/1", fine.run_id, "1")

    rows = models_cli.list_versions(fine.uri)
    assert [(r["name"], r["version"]) for r in rows] == [("lin", "1")]
    assert rows[0]["scores"] == {"synthetic.accuracy": "0.8125"}
    text = models_cli.render(rows, fine.uri)
    assert "models:/lin/1" in text and "synthetic.accuracy=0.8125" in text and "features abc123" in text


def test_ui_links_open_a_servers_own_ui_or_say_how_to_start_one():
    server = ui_links("http://mlflow:5000/", "3", "abc")
    assert server == {"ui": "http://mlflow:5000", "start": None, "run": "http://mlflow:5000/#/experiments/3/runs/abc",
                      "loss_curves": "http://mlflow:5000/#/experiments/3/runs/abc/model-metrics"}
    local = ui_links("sqlite:////r/mlflow.db", "1", "x")
    assert local["start"] == "mlflow ui --backend-store-uri sqlite:////r/mlflow.db"
    assert local["loss_curves"] == "http://127.0.0.1:5000/#/experiments/1/runs/x/model-metrics"
