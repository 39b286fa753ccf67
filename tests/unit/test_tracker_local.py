"""The tracker on its embedded default (SQLite under the storage root): it leaves the process environment alone,
and a server that stops answering for a while neither turns tracking off nor loses what was logged meanwhile."""

from __future__ import annotations

import logging
import os
import threading
import time

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


class Outage:
    """The tracker's real MLflow client, except that every call fails while ``down`` (a server not answering)."""

    def __init__(self, client: object) -> None:
        self.client, self.down, self.refused = client, False, 0

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args: object, **kwargs: object) -> object:
            if self.down:
                self.refused += 1
                raise ConnectionError("[Errno 111] Connection refused")
            return attr(*args, **kwargs)

        return call


def test_an_outage_neither_turns_tracking_off_nor_loses_metrics(tmp_path, caplog):
    t = Tracker(TrackingConfig(experiment="outage"), str(tmp_path), run_name="r")
    real = t._client
    t._client = outage = Outage(real)
    t.log_metrics({"loss": 3.0}, step=1)
    outage.down = True
    with caplog.at_level(logging.WARNING, logger="vitune"):
        t.log_metrics({"loss": 2.0}, step=2)  # fails: held, not lost
        t.log_metrics({"loss": 1.5}, step=3)  # within the backoff: held without a try
    assert outage.refused == 1 and t.active
    assert sum("not answering" in r.message for r in caplog.records) == 1  # said once per outage
    outage.down = False
    time.sleep(1.1)  # the first backoff
    t.log_metrics({"loss": 1.0}, step=4)
    history = real.get_metric_history(t.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]

    # registration (at the end of finetune) waits the outage out instead of being skipped
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"0")
    t.log_artifacts(tmp_path / "model", "model")
    outage.down = True
    threading.Timer(1.5, lambda: setattr(outage, "down", False)).start()
    assert t.register_model("outage-model") == "1"
    assert t.register_model("outage-model") == "1"  # a retry after a lost answer adds no second version
    t.finish()
    assert real.get_run(t.run_id).info.status == "FINISHED"
