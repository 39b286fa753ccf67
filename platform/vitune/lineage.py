"""Lineage in MLflow: the inputs each run logs, and the tags that tie a registered version to what made it.

Each run logs what it read as MLflow dataset inputs (``vitune.tracking.dataset_input``):

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
from collections.abc import Mapping, Sequence
from typing import Any

from vitune import storage
from vitune.features.store import MANIFEST
from vitune.tracking import (
    MODEL_VERSION_TAG,
    Tracker,
    dataset_input,
    log_inputs,
    tag_version,
    training_run_of,
    versions_of_run,
)

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
    raw = storage.read_bytes(storage.join(store, MANIFEST))
    manifest = json.loads(raw)
    return {"store": store, "fingerprint_id": manifest.get("fingerprint_id"), "manifest_digest": digest_bytes(raw),
            "counts": manifest.get("counts", {})}


def feature_store_input(info: Mapping[str, Any]) -> Any:
    return dataset_input(f"features-{info['fingerprint_id']}", info["manifest_digest"], info["store"], "features",
                         profile=dict(info["counts"]), tags={FINGERPRINT_TAG: info["fingerprint_id"]})


def model_input(name: str, source: str, folder: str | None) -> Any:
    """The model a run starts from or evaluates; digest of its folder's metadata file when there is one."""
    from vitune.model.folder import META_FILE  # deferred: the model package imports torch

    digest = uri_digest(storage.join(folder, META_FILE)) if folder else digest_bytes(source.encode())
    return dataset_input(name, digest, source, "model", tags={"vitune.model.folder": folder or ""})


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
