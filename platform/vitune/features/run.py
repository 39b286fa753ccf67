"""The feature job as a tracked run: ``extract_features`` inside an MLflow run (``jobs/extract_features.py``
and the pipeline's features step both call ``run_features``).

The run holds the resolved config, the throughput metrics, the summary and the store's manifest, and is
tagged with the store's URI and fingerprint id; under a pipeline it is a child of the pipeline's run.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from vitune import storage
from vitune.config import FeaturesJobConfig, dump_config
from vitune.features.extract import extract_features
from vitune.features.store import MANIFEST
from vitune.lineage import log_features_inputs
from vitune.tracking import Tracker

log = logging.getLogger(__name__)

RUN_NAME = "extract_features"
METRICS = ("images_in", "features_out", "quarantined", "shards", "computed_shards", "reused_shards", "wall_s",
           "images_per_s", "steady_images_per_s", "startup_s", "actor_wait_s", "bytes_per_image", "total_bytes")


def run_features(cfg: FeaturesJobConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Build (or finish) the feature store of ``cfg`` in its own MLflow run; returns the summary + run id."""
    tracker = Tracker(cfg.tracking, cfg.storage.root, run_name=RUN_NAME, parent_run_id=parent_run_id,
                      tags={"vitune.job": RUN_NAME})
    tracker.log_params(cfg.model_dump(mode="json"))
    tracker.log_text(dump_config(cfg), "config/resolved.yaml")
    log_features_inputs(tracker, cfg.data.records)  # the records files (with digests) as MLflow inputs
    try:
        summary = extract_features(cfg)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.log_metrics({k: summary[k] for k in METRICS if summary.get(k) is not None})
    tracker.set_tags({"vitune.features.extract": summary["output"], "vitune.fingerprint_id": summary["fingerprint_id"]})
    tracker.log_text(json.dumps(summary, indent=2), "features/summary.json")
    tracker.log_text(storage.read_text(storage.join(summary["output"], MANIFEST)), "features/manifest.json")
    tracker.finish()
    log.info("feature store ready: %s", json.dumps(summary))
    return {**summary, "run_id": tracker.run_id}
