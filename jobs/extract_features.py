"""Feature job: the images of LLaVA records → a fingerprinted fp16 feature store on storage (Ray Data).

    python jobs/extract_features.py --config tiny data.records='[s3://b/captions.json]' \
        data.image_root=s3://b/ features.shard_size=256

Runs on local Ray, or on a cluster with ``ray.address=...`` / as a Ray job. Re-running finishes an
interrupted store without recomputing finished shards; on a complete store it does nothing. The store's
URI (default ``<storage.root>/features/<fingerprint id>``) is what ``data.features`` of training names.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import _common  # noqa: F401 - puts platform/ on sys.path when run as a plain Ray job

from vitune import storage
from vitune.config import FeaturesJobConfig, dump_config, load_config
from vitune.features.extract import extract_features
from vitune.features.store import MANIFEST
from vitune.tracking import Tracker

log = logging.getLogger("vitune.jobs.extract_features")

METRICS = ("images_in", "features_out", "quarantined", "shards", "computed_shards", "reused_shards", "wall_s",
           "images_per_s", "steady_images_per_s", "startup_s", "actor_wait_s", "bytes_per_image", "total_bytes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="preset YAML (local path or URI)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = load_config(FeaturesJobConfig, args.config, args.overrides)
    tracker = Tracker(cfg.tracking, cfg.storage.root, run_name="extract_features",
                      tags={"vitune.job": "extract_features"})
    tracker.log_params(cfg.model_dump(mode="json"))
    tracker.log_text(dump_config(cfg), "config/resolved.yaml")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
