"""MLflow for every job: the tracker of a run, its tags, registration, and where the UI shows it.

``Tracker``: a run with the resolved config, metrics and artifacts. Embedded default: a SQLite store under
the storage root (or ``MLFLOW_TRACKING_URI``); a tracking server by config. When the server stops answering
the job goes on and says so once; calls are held or retried with backoff (``vitune.backoff``) until it is back.

``runs:/`` and ``models:/`` references are resolved by ``vitune.references``; what runs read and what a
registered version came from is ``vitune.lineage``'s. This module names the tags both read.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from vitune import layout
from vitune.backoff import Backoff
from vitune.config import TrackingConfig

# mlflow is imported where used: it takes about a second to import, and processes that never track (a
# Serve replica loading a folder, tracking.enabled=false) should not pay for it.
log = logging.getLogger(__name__)

MODEL_FOLDER_TAG = "vitune.model.folder"  # set on a training run: the model folder it wrote
LLAVA_HF_TAG = "vitune.llava_hf"  # on a finetune run and its registered version: runs:/<id>/llava-hf (the export)


def resolve_tracking_uri(cfg: TrackingConfig, storage_root: str) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = layout.mlflow_db(storage_root)
    os.makedirs(os.path.dirname(db), exist_ok=True)
    return f"sqlite:///{db}"


def artifact_location(tracking_uri: str, storage_root: str) -> str | None:
    """Where a new experiment keeps its artifacts: a server decides itself (None); a local store (SQLite) keeps
    them under the storage root — MLflow's own default would be ``./mlruns`` in whatever the working directory is."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    return layout.mlflow_artifacts(storage_root)


def mlflow_http_env() -> dict[str, str]:
    """This process's ``MLFLOW_HTTP_REQUEST_*`` settings (MLflow's own retries and timeout per request), for
    the processes that track on its behalf (rank 0 of training)."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_REQUEST_")}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """A thin, failure-tolerant wrapper over one MLflow run. Use on rank 0 only.

    Every call goes through a ``vitune.backoff.Backoff``: while the server is down, metrics and params are held
    and sent once it answers; opening the run, tags, artifacts, registration and closing are retried for up to
    ``tracking.retry_s``. One failed call never turns tracking off. (MLflow's client also retries each HTTP
    request: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, 7 by default, about 4 minutes; set it lower for calls that
    fail fast and are held here instead of blocking the caller.)
    """

    def __init__(self, cfg: TrackingConfig, storage_root: str, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict | None = None, run_id: str | None = None):
        self.enabled = cfg.enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri = resolve_tracking_uri(cfg, storage_root)
        self._warned = False
        self._client = None
        # tries at most 10 s apart: a try costs one refused connection, and held metrics go out soon after it is back
        self._retry = Backoff(f"MLflow at {self.uri}", cfg.retry_s, max_s=10.0)
        if not self.enabled:
            return
        try:
            # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
            from mlflow.tracking import MlflowClient

            # an explicit client, never mlflow.set_tracking_uri: that also sets MLFLOW_TRACKING_URI in os.environ,
            # so every later job of the process (and its children) would track to this run's store
            client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the job
            self._fail(str(exc))
            return

        def open_run() -> Any:
            exp = client.get_experiment_by_name(cfg.experiment)
            self.experiment_id = exp.experiment_id if exp else client.create_experiment(
                cfg.experiment, artifact_location=artifact_location(self.uri, storage_root))
            if run_id:
                return client.get_run(run_id)
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            return client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)

        run = self._retry.call("opening the run", open_run, critical=True)
        if run is None:
            self._fail(f"no run after {cfg.retry_s:.0f} s of retries")
            return
        self.run_id = run.info.run_id
        self._client = client
        log.info("MLflow run %s (%s) at %s", self.run_id, run_name, self.uri)

    def _fail(self, reason: str) -> None:
        if not self._warned:
            log.warning("MLflow tracking at %s unavailable (%s); the job goes on without tracking", self.uri, reason)
            self._warned = True
        self._client = None

    @property
    def active(self) -> bool:
        return self._client is not None

    def log_params(self, params: dict) -> None:
        if not self.active:
            return
        # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in _flatten(params).items()]
        for i in range(0, len(items), 100):
            batch = items[i:i + 100]
            self._retry.call("logging params", lambda b=batch: self._client.log_batch(self.run_id, params=b))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)  # taken now: a held batch keeps the time it was logged
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        self._retry.call(f"logging metrics (step {step or 0})",
                         lambda: self._client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return

        def send() -> None:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))

        self._retry.call(f"tagging {', '.join(tags)}", send, critical=True)

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            p.write_text(text)
            self.log_artifact(p, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        self._retry.call(f"logging artifact {Path(local_path).name}",
                         lambda: self._client.log_artifact(self.run_id, str(local_path), artifact_path), critical=True)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        self._retry.call(f"logging artifacts {artifact_path or ''}",
                         lambda: self._client.log_artifacts(self.run_id, str(local_dir), artifact_path), critical=True)

    def register_model(self, name: str, artifact_path: str = "model",
                       tags: dict[str, str] | None = None) -> str | None:
        """Register this run's ``artifact_path`` folder as a new version of ``name`` (with ``tags``), retried
        with backoff; returns the version (None, with a warning, when the registry never answered)."""
        if not self.active:
            return None
        from mlflow.exceptions import MlflowException  # deferred like every mlflow import here (import cost)

        def register() -> Any:
            try:
                self._client.create_registered_model(name)
            except MlflowException as exc:
                if exc.get_http_status_code() >= 500:
                    raise
                # already registered
            source = f"{self._client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
            # a retry after a lost answer must not add a second version of the same run
            for mv in self._client.search_model_versions(f"name='{name}' and run_id='{self.run_id}'"):
                if mv.source == source:
                    return mv
            return self._client.create_model_version(name, source=source, run_id=self.run_id, tags=tags)

        mv = self._retry.call(f"registering model {name}", register, critical=True)
        if mv is None:
            log.warning("model %s was not registered (the trained model is saved either way; register it with "
                        "the run's %s artifact)", name, artifact_path)
            return None
        log.info("registered model %s version %s", name, mv.version)
        return str(mv.version)

    def flush(self) -> bool:
        """Send what was held while the server was down, retrying up to ``tracking.retry_s``; True when sent."""
        return self._retry.flush() if self.active else True

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        self._retry.call(f"closing the run ({status})",
                         lambda: self._client.set_terminated(self.run_id, status), critical=True)
        if self._retry.held:
            log.warning("%d tracking calls held since MLflow stopped answering were not sent", self._retry.held)


# --- the MLflow UI: where a person looks at a run ---


def ui_links(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> dict[str, str | None]:
    """``{ui, start, run, loss_curves}``: the UI's URL (a server's own; for a local store, the one ``start``
    — an ``mlflow ui`` command — opens), a run's page and its model-metrics tab (the loss curves)."""
    if tracking_uri.startswith(("http://", "https://")):
        ui, start = tracking_uri.rstrip("/"), None
    else:
        ui, start = "http://127.0.0.1:5000", f"mlflow ui --backend-store-uri {tracking_uri}"
    run = f"{ui}/#/experiments/{experiment_id}/runs/{run_id}" if experiment_id and run_id else None
    return {"ui": ui, "start": start, "run": run, "loss_curves": f"{run}/model-metrics" if run else None}
