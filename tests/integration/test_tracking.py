"""Tracking against a real MLflow tracking server (artifacts on the S3 server) and an unreachable one."""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from vitune.config import TrackingConfig
from vitune.tracking import Tracker


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
        t = Tracker(TrackingConfig(uri="http://127.0.0.1:9"), str(tmp_path), run_name="r")
        t.log_metrics({"loss": 1.0}, step=1)
        t.finish()
    assert not t.active
    assert sum("unavailable" in r.message for r in caplog.records) == 1
