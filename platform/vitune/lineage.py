"""Lineage in MLflow: the inputs each run logs, and the tags that tie a registered version to what made it.

Each run logs what it read as MLflow dataset inputs (``dataset_input``):

    features run      the records files (context ``features``; digest = sha256 of the file)
    training run      its records files (``training``), the feature store (``features``; digest = sha256 of
                      its manifest, tagged with the fingerprint id) and the model it starts from (``model``)
    evaluation run    its data (``evaluation``) and the model it evaluated (``model``: ``models:/NAME/VERSION``
                      when that training run was registered, else the folder)

A registered finetune version carries ``vitune.data.*``, ``vitune.features.*``, ``vitune.align_run`` and
``vitune.finetune_run``; each evaluation of it adds ``vitune.eval.<benchmark>.<metric>`` (and the run's id).
So from a served model (``/v1/models`` names its version) the registry leads back to the records and the
feature store that trained it, and to its scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from vitune import layout, storage
from vitune.config import MODELS_SCHEME
from vitune.references import registry_version
from vitune.tracking import MODEL_FOLDER_TAG, Tracker

log = logging.getLogger(__name__)

FINGERPRINT_TAG = "vitune.fingerprint_id"
DIGEST_LEN = 32  # hex characters of sha256 kept as a digest (MLflow stores at most 36)


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGEST_LEN]


def uri_digest(uri: str) -> str:
    """sha256 of a file's bytes; a folder (a benchmark's data root) is named by its URI instead."""
    try:
        return digest_bytes(storage.read_bytes(uri))
    except Exception:  # noqa: BLE001 - a folder or an unreadable URI: the URI is what identifies it here
        return digest_bytes(uri.encode())


def data_digest(uris: Sequence[str]) -> str:
    """One digest of several records files (of their digests, in order)."""
    return digest_bytes("\n".join(uri_digest(u) for u in uris).encode())


def records_inputs(uris: Sequence[str], context: str) -> list[Any]:
    return [dataset_input(u.rstrip("/").rsplit("/", 1)[-1], uri_digest(u), u, context) for u in uris]


def feature_store_info(store: str) -> dict[str, Any]:
    """The store's URI, fingerprint id, manifest digest and counts (from its manifest)."""
    raw = storage.read_bytes(storage.join(store, layout.FEATURE_MANIFEST))
    manifest = json.loads(raw)
    return {"store": store, "fingerprint_id": manifest.get("fingerprint_id"), "manifest_digest": digest_bytes(raw),
            "counts": manifest.get("counts", {})}


def feature_store_input(info: Mapping[str, Any]) -> Any:
    return dataset_input(f"features-{info['fingerprint_id']}", info["manifest_digest"], info["store"], "features",
                         profile=dict(info["counts"]), tags={FINGERPRINT_TAG: info["fingerprint_id"]})


def model_input(name: str, source: str, folder: str | None) -> Any:
    """The model a run starts from or evaluates; digest of its folder's metadata file when there is one."""
    digest = uri_digest(storage.join(folder, layout.MODEL_META_FILE)) if folder else digest_bytes(source.encode())
    return dataset_input(name, digest, source, "model", tags={"vitune.model.folder": folder or ""})


# --------------------------------------------------------------- MLflow dataset inputs and version tags

INPUT_CONTEXT_TAG = "mlflow.data.context"  # MLflow's own tag for the role of a dataset input (training, ...)
MODEL_VERSION_TAG = "vitune.model_version"  # on an evaluation run: models:/NAME/VERSION it evaluated


def dataset_input(name: str, digest: str, source: str, context: str, profile: dict[str, Any] | None = None,
                  tags: dict[str, str] | None = None) -> Any:
    """One MLflow dataset input: ``source`` (a URI) under ``name`` with ``digest``, in role ``context``."""
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
    client, name, version = registry_version(uri, tracking_uri)
    mv = client.get_model_version(name, version)
    return {"source": uri, "registered_model": name, "version": version, "uri": f"{MODELS_SCHEME}{name}/{version}",
            "run_id": mv.run_id, "tags": dict(mv.tags)}


# ---------------------------------------------------------------------------------------- per job


def log_features_inputs(tracker: Tracker, records: Sequence[str]) -> None:
    log_inputs(tracker, records_inputs(records, "features"))


def log_training_inputs(tracker: Tracker, records: Sequence[str], store: str,
                        init_folder: str | None) -> dict[str, Any]:
    """Log a training run's inputs; returns the lineage tags a registered version of it carries."""
    inputs = records_inputs(records, "training")
    tags: dict[str, Any] = {"vitune.data.records": json.dumps(list(records)),
                            "vitune.data.digest": data_digest(records)}
    try:
        info = feature_store_info(store)
    except Exception as exc:  # noqa: BLE001 - a store without a manifest still trains; lineage says less
        log.warning("feature store %s has no readable manifest (%s): not logged as an input", store, exc)
    else:
        inputs.append(feature_store_input(info))
        tags.update({"vitune.features.store": store, "vitune.features.fingerprint": info["fingerprint_id"],
                     "vitune.features.manifest_digest": info["manifest_digest"]})
    if init_folder:
        init_run = training_run_of(tracker, init_folder)
        source = f"runs:/{init_run}" if init_run else init_folder
        inputs.append(model_input(f"init-{init_folder.rstrip('/').rsplit('/', 2)[-2]}", source, init_folder))
        if init_run:
            tags["vitune.align_run"] = init_run
    log_inputs(tracker, inputs)
    return tags


def log_evaluation_lineage(tracker: Tracker, data: str | None, folder: str | None, model_run_id: str | None,
                           benchmark: str, scores: Mapping[str, float]) -> list[str]:
    """Log an evaluation run's inputs, link it to the versions it evaluated and put ``scores`` on them;
    returns those versions as ``models:/NAME/VERSION``."""
    model_run_id = model_run_id or training_run_of(tracker, folder or "")
    versions = versions_of_run(tracker, model_run_id)
    uris = [f"models:/{name}/{version}" for name, version in versions]
    inputs = records_inputs([data], "evaluation") if data else []
    if folder:
        source = uris[0] if uris else (f"runs:/{model_run_id}" if model_run_id else folder)
        inputs.append(model_input(source.split(":/", 1)[-1] if uris else "model", source, folder))
    log_inputs(tracker, inputs)
    if model_run_id:
        tracker.set_tags({"vitune.model_run_id": model_run_id})
    if uris:
        tracker.set_tags({MODEL_VERSION_TAG: ",".join(uris)})
    for name, version in versions:
        tag_version(tracker, name, version, {f"vitune.eval.{benchmark}.run": tracker.run_id,
                                             **{f"vitune.eval.{benchmark}.{k}": f"{v:.6g}" for k, v in scores.items()}})
    return uris
