"""Fault injection (f): the MLflow server goes down for ``OUTAGE_S`` seconds while a finetune trains.

The server is this test's own (the session's is shared): SQLite store, artifacts on the session's S3 server,
stopped once training has logged its first step and started again on the same port and store. MLflow's own
HTTP retries are off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, which the driver hands to rank 0): every call in
the outage fails at once, as every call does once an outage outlasts those retries (about 4 minutes by
default). Training must finish, the steps logged during the outage must arrive with the time they were logged
at, and the model must be registered.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from tests import services
from vitune import storage
from vitune.config import FeaturesJobConfig, TrainJobConfig, load_config
from vitune.data import synthetic

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # `make test-slow`
OUTAGE_S = 30.0  # how long the server is down (the README's Reliability row (f) states this figure)
MODEL = "vitune-outage-test"


@pytest.fixture(scope="module")
def features(ray_local, s3_bucket):
    from vitune.features.extract import extract_features

    root = f"{s3_bucket}/outage-test"
    data = synthetic.generate(storage.join(root, "data"), seed=11, num_images=16, num_eval_images=0, image_size=32)
    cfg = load_config(FeaturesJobConfig, "tiny", [f"storage.root={root}", f"data.image_root={data['image_root']}",
                                                  f"data.records=[{data['records']['instruct']}]"])
    return {"root": root, "records": data["records"]["instruct"], "features": extract_features(cfg)["output"]}


def _first_step_logged(client: MlflowClient, experiment: str, out: dict, timeout: float = 300.0) -> str:
    """The finetune run's id once its first step's loss is in, polled from the server."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "error" in out or "summary" in out:
            raise AssertionError(f"training ended before its first step was seen: {out}")
        exp = client.get_experiment_by_name(experiment)
        for run in client.search_runs([exp.experiment_id]) if exp else []:
            if client.get_metric_history(run.info.run_id, "loss"):
                return run.info.run_id
        time.sleep(0.2)
    raise TimeoutError("training logged no step")


def test_training_rides_out_an_mlflow_outage(features, s3_server, tmp_path, monkeypatch):
    from vitune.train.driver import run_training

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = services.start_mlflow(tmp_path, s3_server, "vitune-mlflow")
    port = int(server.url.rsplit(":", 1)[1])
    cfg = load_config(TrainJobConfig, "tiny", [
        "stage=finetune", "train.init_from=null", f"storage.root={features['root']}",
        f"data.features={features['features']}",
        f"data.records={json.dumps([features['records']])}", f"tracking.uri={server.url}",
        "tracking.experiment=outage", f"tracking.registered_model={MODEL}", "tracking.retry_s=180",
        "train.num_workers=1", "train.micro_batch_size=4", "train.global_batch_size=4", "train.epochs=15",
        "train.checkpoint_every=1000", "train.log_every=1"])
    out: dict = {}

    def train() -> None:
        try:
            out["summary"] = run_training(cfg)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test below
            out["error"] = exc

    trainer = threading.Thread(target=train, daemon=True)
    try:
        started = time.time()
        trainer.start()
        run_id = _first_step_logged(MlflowClient(server.url), "outage", out)
        server.stop()
        down_at = time.time()
        time.sleep(OUTAGE_S)
        server = services.start_mlflow(tmp_path, s3_server, "vitune-mlflow", port=port)
        up_at = time.time()
        trainer.join(timeout=600)
        assert not trainer.is_alive(), "training did not finish after the outage"
        ended = time.time()
        if "error" in out:
            raise out["error"]
        summary = out["summary"]
        client = MlflowClient(server.url)
        assert summary["run_id"] == run_id
        history = client.get_metric_history(run_id, "loss")
        assert sorted({m.step for m in history}) == list(range(1, summary["total_steps"] + 1))  # no step lost
        during = [m.step for m in history if down_at * 1000 <= m.timestamp <= up_at * 1000]
        assert during, "no step was logged while the server was down (training finished before the outage?)"
        assert client.get_run(run_id).info.status == "FINISHED"
        assert client.get_run(run_id).data.tags["vitune.model.folder"] == summary["model_folder"]
        versions = client.search_model_versions(f"name='{MODEL}'")
        assert [v.run_id for v in versions] == [run_id] and summary["registered_version"] == str(versions[0].version)
        logging.getLogger(__name__).info(
            "MLflow outage: down %.1f s (stop to healthy again), %d of %d steps logged meanwhile and delivered; "
            "training + end of run %.1f s, %.1f s after the server was back; registered version %s",
            up_at - down_at, len(during), summary["total_steps"], ended - started, ended - up_at,
            summary["registered_version"])
    finally:
        server.stop()
