"""Tracking against a real MLflow tracking server (artifacts on the S3 server) and an unreachable one;
``runs:/`` references resolved to the model folder a training run wrote."""

from __future__ import annotations

import logging
import os

import pytest
from mlflow.tracking import MlflowClient

from vitune.config import TrackingConfig
from vitune.references import run_id_of, run_model_folder
from vitune.tracking import MODEL_FOLDER_TAG, Tracker


def test_tracker_logs_to_server(mlflow_server, tmp_path):
    t = Tracker(TrackingConfig(uri=mlflow_server, experiment="t-tracking"), str(tmp_path), run_name="r1")
    assert t.active
    t.log_params({"train": {"lr": 0.1}, "stage": "align"})
    t.log_metrics({"loss": 2.5}, step=1)
    t.log_metrics({"loss": 1.5}, step=2)
    t.log_text("hello", "config/resolved.yaml")
    t.finish()
    client = MlflowClient(mlflow_server)
    run = client.get_run(t.run_id)
    assert run.data.params["train.lr"] == "0.1"
    assert [m.value for m in client.get_metric_history(t.run_id, "loss")] == [2.5, 1.5]
    assert [a.path for a in client.list_artifacts(t.run_id, "config")] == ["config/resolved.yaml"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")


def test_unreachable_server_warns_once_and_goes_on(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with caplog.at_level(logging.WARNING):
        t = Tracker(TrackingConfig(uri="http://127.0.0.1:9", retry_s=1), str(tmp_path), run_name="r")
        t.log_metrics({"loss": 1.0}, step=1)
        t.finish()
    assert not t.active
    assert sum("unavailable" in r.message for r in caplog.records) == 1


def test_runs_reference_resolves_to_the_model_folder(mlflow_server, tmp_path):
    cfg = TrackingConfig(uri=mlflow_server, experiment="t-refs")
    trained = Tracker(cfg, str(tmp_path), run_name="align")
    trained.set_tags({MODEL_FOLDER_TAG: str(tmp_path / "train" / "align" / "model")})
    trained.finish()
    ref = f"runs:/{trained.run_id}"
    assert run_id_of(ref) == run_id_of(f"{ref}/model") == trained.run_id and run_id_of(str(tmp_path)) is None
    assert run_model_folder(ref, mlflow_server) == str(tmp_path / "train" / "align" / "model")
    assert run_model_folder("some/folder") == os.path.abspath("some/folder")  # a folder passes, made absolute
    other = Tracker(cfg, str(tmp_path), run_name="not-training")
    other.finish()
    with pytest.raises(ValueError, match=f"no {MODEL_FOLDER_TAG} tag"):
        run_model_folder(f"runs:/{other.run_id}", mlflow_server)
