"""MLflow for every job, and the one owner of MLflow references.

``Tracker``: a run with the resolved config, metrics and artifacts. Embedded default: a SQLite store under
the storage root (or ``MLFLOW_TRACKING_URI``); a tracking server by config. When the server stops answering
the job goes on and says so once; calls are held or retried with backoff (``vitune.backoff``) until it is back.

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
from vitune.backoff import Backoff
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


# --- lineage: what a run read (MLflow dataset inputs), and what a registered version came from ---

INPUT_CONTEXT_TAG = "mlflow.data.context"  # MLflow's own tag for the role of a dataset input (training, ...)
MODEL_VERSION_TAG = "vitune.model_version"  # on an evaluation run: models:/NAME/VERSION it evaluated


def dataset_input(name: str, digest: str, source: str, context: str, profile: dict[str, Any] | None = None,
                  tags: dict[str, str] | None = None) -> Any:
    """One MLflow dataset input: ``source`` (a URI) under ``name`` with ``digest``, in role ``context``."""
    import json  # deferred with mlflow below: only runs that track get here

    # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type = "s3" if source.startswith("s3://") else source.split(":/", 1)[0] if ":/" in source else "local"
    dataset = Dataset(name=name, digest=digest[:36], source_type=source_type,
                      source=json.dumps({"uri": source}), profile=json.dumps(profile) if profile else None)
    return DatasetInput(dataset, tags=[InputTag(k, str(v)) for k, v in {INPUT_CONTEXT_TAG: context,
                                                                         **(tags or {})}.items()])


def log_inputs(tracker: Tracker, inputs: list[Any]) -> None:
    """Log ``inputs`` (``dataset_input``s) on the tracker's run; tracking trouble never stops the job."""
    if not tracker.active or not inputs:
        return
    try:
        tracker._client.log_inputs(tracker.run_id, datasets=inputs)
    except Exception as exc:  # noqa: BLE001 - lineage is worth a warning, not a failed job
        log.warning("could not log the run's inputs to MLflow: %s", exc)


def run_inputs(tracking_uri: str, run_id: str) -> list[dict[str, Any]]:
    """A run's dataset inputs as plain dicts: name, digest, uri, context, profile and the input's tags."""
    import json  # deferred with mlflow below

    from mlflow.tracking import MlflowClient  # deferred: mlflow is slow to import

    out = []
    for d in MlflowClient(tracking_uri).get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in d.tags}
        out.append({"name": d.dataset.name, "digest": d.dataset.digest,
                    "uri": json.loads(d.dataset.source).get("uri"), "context": tags.get(INPUT_CONTEXT_TAG),
                    "profile": json.loads(d.dataset.profile) if d.dataset.profile else {}, "tags": tags})
    return out


def training_run_of(tracker: Tracker, folder: str) -> str | None:
    """The newest training run (``vitune.stage`` tag) of the tracker's experiment that wrote model folder
    ``folder`` (evaluations of it carry the folder's tag too)."""
    if not tracker.active or not folder:
        return None
    try:
        runs = tracker._client.search_runs([tracker.experiment_id], max_results=50, order_by=["start_time DESC"],
                                           filter_string=f"tags.`{MODEL_FOLDER_TAG}` = '{folder}'")
    except Exception as exc:  # noqa: BLE001 - lineage is worth a warning, not a failed job
        log.warning("could not look up the run that wrote %s: %s", folder, exc)
        return None
    return next((r.info.run_id for r in runs if r.data.tags.get("vitune.stage")), None)


def versions_of_run(tracker: Tracker, run_id: str | None) -> list[tuple[str, str]]:
    """``(name, version)`` of every registered version made from run ``run_id``."""
    if not tracker.active or not run_id:
        return []
    try:
        return [(v.name, str(v.version)) for v in tracker._client.search_model_versions(f"run_id='{run_id}'")]
    except Exception as exc:  # noqa: BLE001 - lineage is worth a warning, not a failed job
        log.warning("could not look up the registered versions of run %s: %s", run_id, exc)
        return []


def tag_version(tracker: Tracker, name: str, version: str, tags: dict[str, Any]) -> None:
    if not tracker.active:
        return
    try:
        for k, v in tags.items():
            tracker._client.set_model_version_tag(name, version, k, str(v))
    except Exception as exc:  # noqa: BLE001 - lineage is worth a warning, not a failed job
        log.warning("could not tag version %s of %s: %s", version, name, exc)


def registry_lineage(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """What a served model is: for ``models:/NAME/VERSION|@ALIAS|/latest`` the version it resolves to, its
    run and its lineage tags; for a folder just the folder."""
    if not uri.startswith(MODELS_SCHEME):
        return {"source": uri}
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    client, name, version = _registry_version(uri, tracking_uri)
    mv = client.get_model_version(name, version)
    return {"source": uri, "registered_model": name, "version": version, "uri": f"{MODELS_SCHEME}{name}/{version}",
            "run_id": mv.run_id, "tags": dict(mv.tags)}


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
