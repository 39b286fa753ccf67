"""Model references → a model folder: the one resolver, called once when a job starts.

A reference is what a config or a command names as a model:

    a folder URI            a vitune model folder, local (made absolute) or ``s3://``
    a stage name            ``align`` | ``finetune``: that stage's model folder under ``storage.root``
    ``runs:/<run id>``      the model folder a vitune training run wrote (its ``vitune.model.folder`` tag)
    ``models:/NAME/VERSION`` a registered version (also ``NAME@ALIAS``, ``NAME/latest``): its artifacts,
                            downloaded (``models:/`` URIs are an MLflow registry's, not storage)

``resolve_model`` turns any of them into a folder URI; ``model_folder`` does the same as a context, for
callers that load and let go (a ``models:/`` download lives as long as the block). Code after them sees
folders only. ``llava_hf_export_uri`` is the one other reference: the export a registered version carries.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitune import layout, storage
from vitune.config import MODELS_SCHEME, RUNS_SCHEME, STAGES
from vitune.tracking import LLAVA_HF_TAG, MODEL_FOLDER_TAG

log = logging.getLogger(__name__)


def resolve_model(ref: str, *, root: str | None = None, tracking_uri: str | None = None,
                  download_dir: str | None = None) -> str:
    """The model folder ``ref`` names (see the module docstring). A stage name needs ``root`` (the storage
    root); ``models:/`` needs ``download_dir`` (or use ``model_folder``, which makes one)."""
    if ref in STAGES:
        if root is None:
            raise ValueError(f"model {ref!r} names a training stage; which storage root it is under is not known")
        return layout.stage_model(root, ref)
    if ref.startswith(MODELS_SCHEME):
        if download_dir is None:
            raise ValueError(f"model {ref!r} is a registered version: it must be downloaded; give a model folder "
                             "URI or runs:/<run id> here")
        return resolve_model_source(ref, download_dir, tracking_uri)
    return run_model_folder(ref, tracking_uri)


@contextmanager
def model_folder(ref: str, *, root: str | None = None, tracking_uri: str | None = None) -> Iterator[str]:
    """``resolve_model`` as a context: a ``models:/`` version is downloaded into a folder removed afterwards."""
    if not ref.startswith(MODELS_SCHEME):
        yield resolve_model(ref, root=root, tracking_uri=tracking_uri)
        return
    with tempfile.TemporaryDirectory(prefix="vitune-registry-") as download:
        yield resolve_model(ref, root=root, tracking_uri=tracking_uri, download_dir=download)


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


def registry_version(uri: str, tracking_uri: str | None) -> tuple[Any, str, str]:
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
    client, name, version = registry_version(uri, tracking_uri)
    return client.get_model_version_download_uri(name, version)


def llava_hf_export_uri(uri: str, tracking_uri: str | None = None) -> str:
    """The storage URI of the llava-hf export a registered finetune carries (``LLAVA_HF_TAG``): what vLLM's
    Ray Serve LLM path serves for `models:/NAME/VERSION`."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    client, name, version = registry_version(uri, tracking_uri)
    ref = client.get_model_version(name, version).tags.get(LLAVA_HF_TAG, "")
    if not ref.startswith(RUNS_SCHEME):
        raise ValueError(f"version {version} of {name!r} carries no llava-hf export (tag {LLAVA_HF_TAG}: {ref!r}); "
                         "export it with `vitune export`")
    run_id, _, path = ref[len(RUNS_SCHEME):].partition("/")
    return f"{client.get_run(run_id).info.artifact_uri}/{path}"


def resolve_model_source(uri: str, dest: str, tracking_uri: str | None = None) -> str:
    """A model-folder URI for `uri`: `models:/...` is downloaded from the MLflow registry into `dest`."""
    if not uri.startswith(MODELS_SCHEME):
        return uri
    # deferred: mlflow is slow to import; a job that tracks nothing never pays for it
    import mlflow.artifacts

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    source = _registry_download_uri(uri, tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dest, tracking_uri=tracking_uri))
    for candidate in (local, *sorted(p.parent for p in local.glob(f"*/{layout.MODEL_META_FILE}"))):
        if (candidate / layout.MODEL_META_FILE).exists():
            log.info("registry model %s (%s) downloaded to %s", uri, source, candidate)
            return str(candidate)
    raise FileNotFoundError(f"{uri} holds no vitune model folder ({layout.MODEL_META_FILE} not found in its artifacts)")
