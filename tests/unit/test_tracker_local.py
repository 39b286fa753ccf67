"""The tracker on its embedded default (SQLite under the storage root) leaves the process environment alone."""

from __future__ import annotations

import os

from vitune.config import TrackingConfig
from vitune.tracking import Tracker


def test_a_tracker_does_not_leak_its_store_into_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = Tracker(TrackingConfig(experiment="one"), str(tmp_path / "a"), run_name="r1")
    assert first.active and first.uri.endswith("/a/mlflow.db")
    # a later job of the same process (the pipeline, a test session) with another root tracks to its own store
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = Tracker(TrackingConfig(experiment="two"), str(tmp_path / "b"), run_name="r2")
    assert second.uri.endswith("/b/mlflow.db")
    first.finish()
    second.finish()
