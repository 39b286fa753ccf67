"""MLflow for every job, and the one owner of MLflow references.

``Tracker``: a run with the resolved config, metrics and artifacts. Embedded default: a SQLite store under
the storage root (or ``MLFLOW_TRACKING_URI``); a tracking server by config. When the server cannot be
reached the job goes on, says so once, and the tracker becomes a no-op.

References: ``runs:/<run id>`` names the model folder a training run wrote (its ``vitune.model.folder``
tag; ``run_model_folder``), ``models:/NAME/VERSION`` a registered model (``resolve_model_source``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from vitune import layout, storage
from vitune.config import MODELS_SCHEME, TrackingConfig

# mlflow is imported where used: it takes about a second to import, and processes that never track (a
# Serve replica loading a folder, tracking.enabled=false) should not pay for it.
log = logging.getLogger(__name__)

RUNS_SCHEME = "runs:/"
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
    """A thin, failure-tolerant wrapper over one MLflow run. Use on rank 0 only."""

    def __init__(self, cfg: TrackingConfig, storage_root: str, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict | None = None, run_id: str | None = None):
        self.enabled = cfg.enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri = resolve_tracking_uri(cfg, storage_root)
        self._warned = False
        self._client = None
        if not self.enabled:
            return
        try:
            # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
            from mlflow.tracking import MlflowClient

            # an explicit client, never mlflow.set_tracking_uri: that also sets MLFLOW_TRACKING_URI in os.environ,
            # so every later job of the process (and its children) would track to this run's store
            client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            exp = client.get_experiment_by_name(cfg.experiment)
            self.experiment_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
            if run_id:
                run = client.get_run(run_id)
            else:
                all_tags = dict(tags or {})
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                run = client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
            self._client = client
            log.info("MLflow run %s (%s) at %s", self.run_id, run_name, self.uri)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the job
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if not self._warned:
            log.warning("MLflow tracking at %s unavailable (%s); the job goes on without tracking", self.uri, exc)
            self._warned = True
        self._client = None

    @property
    def active(self) -> bool:
        return self._client is not None

    def log_params(self, params: dict) -> None:
        if not self.active:
            return
        try:
            # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
            from mlflow.entities import Param

            flat = _flatten(params)
            items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[i:i + 100])
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        try:
            # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
            self._client.log_batch(self.run_id, metrics=items)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        try:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

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
        try:
            self._client.log_artifact(self.run_id, str(local_path), artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        try:
            self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def register_model(self, name: str, artifact_path: str = "model",
                       tags: dict[str, str] | None = None) -> str | None:
        """Register this run's ``artifact_path`` folder as a new version of ``name`` (with ``tags``); returns
        the version."""
        if not self.active:
            return None
        from mlflow.exceptions import MlflowException  # deferred like every mlflow import here (import cost)

        try:
            try:
                self._client.create_registered_model(name)
            except MlflowException:
                pass  # already registered
            run = self._client.get_run(self.run_id)
            mv = self._client.create_model_version(name, source=f"{run.info.artifact_uri}/{artifact_path}",
                                                   run_id=self.run_id, tags=tags)
        except Exception as exc:  # noqa: BLE001 - the trained model is saved either way
            log.warning("could not register model %s: %s", name, exc)
            return None
        log.info("registered model %s version %s", name, mv.version)
        return str(mv.version)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)


# --- training runs: runs:/<run id> → the model folder it wrote ---


def run_id_of(ref: str | None) -> str | None:
    """The run id of ``runs:/<run id>[/path]``; None for anything else."""
    if not ref or not ref.startswith(RUNS_SCHEME):
        return None
    return ref[len(RUNS_SCHEME):].strip("/").split("/")[0]


def run_model_folder(ref: str, tracking_uri: str | None = None) -> str:
    """A model-folder URI as it is, or ``runs:/<run id>`` → the folder that run wrote; local paths absolute."""
    run_id = run_id_of(ref)
    if run_id is None:
        return storage.absolute(ref)
    # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
    from mlflow.tracking import MlflowClient

    folder = MlflowClient(tracking_uri).get_run(run_id).data.tags.get(MODEL_FOLDER_TAG)
    if not folder:
        raise ValueError(f"MLflow run {ref} has no {MODEL_FOLDER_TAG} tag (is it a vitune training run?)")
    return storage.absolute(folder)


# --- registered models: models:/NAME/VERSION → a model folder ---


def _registry_version(uri: str, tracking_uri: str | None) -> tuple[Any, str, str]:
    """``(client, name, version)`` of `models:/NAME/VERSION` (or `NAME@ALIAS`, `NAME/latest`).

    Resolved with an explicit client: mlflow's own `models:/` download ignores a passed registry URI.
    """
    # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    ref = uri[len(MODELS_SCHEME) :].strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client, name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = ref.partition("/")
    if not name or not version:
        raise ValueError(f"model URI {uri!r} must be models:/NAME/VERSION or models:/NAME@ALIAS")
    if version == "latest":
        found = client.search_model_versions(f"name='{name}'")
        if not found:
            raise ValueError(f"registered model {name!r} has no versions")
        version = str(max(int(v.version) for v in found))
    return client, name, version


def _registry_download_uri(uri: str, tracking_uri: str | None) -> str:
    """Where the artifacts (the vitune model folder) of a registered version live."""
    client, name, version = _registry_version(uri, tracking_uri)
    return client.get_model_version_download_uri(name, version)


def llava_hf_export_uri(uri: str, tracking_uri: str | None = None) -> str:
    """The storage URI of the llava-hf export a registered finetune carries (``LLAVA_HF_TAG``): what vLLM's
    Ray Serve LLM path serves for `models:/NAME/VERSION`."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    client, name, version = _registry_version(uri, tracking_uri)
    ref = client.get_model_version(name, version).tags.get(LLAVA_HF_TAG, "")
    if not ref.startswith(RUNS_SCHEME):
        raise ValueError(f"version {version} of {name!r} carries no llava-hf export (tag {LLAVA_HF_TAG}: {ref!r}); "
                         "export it with `vitune export`")
    run_id, _, path = ref[len(RUNS_SCHEME):].partition("/")
    return f"{client.get_run(run_id).info.artifact_uri}/{path}"


def resolve_model_source(uri: str, dest: str, tracking_uri: str | None = None) -> str:
    """A model-folder URI for `uri`: `models:/...` is downloaded from the MLflow registry into `dest`."""
    from vitune.model.folder import META_FILE  # deferred: the model package imports torch

    if not uri.startswith(MODELS_SCHEME):
        return uri
    # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
    import mlflow.artifacts

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    source = _registry_download_uri(uri, tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dest, tracking_uri=tracking_uri))
    for candidate in (local, *sorted(p.parent for p in local.glob(f"*/{META_FILE}"))):
        if (candidate / META_FILE).exists():
            log.info("registry model %s (%s) downloaded to %s", uri, source, candidate)
            return str(candidate)
    raise FileNotFoundError(f"{uri} holds no vitune model folder ({META_FILE} not found in its artifacts)")
