"""Feature job: the images of LLaVA records → a fingerprinted fp16 feature store on storage (Ray Data).

    python jobs/extract_features.py --config tiny data.records='[s3://b/captions.json]' \
        data.image_root=s3://b/ features.shard_size=256

Runs on local Ray, or on a cluster with ``ray.address=...`` / as a Ray job. Re-running finishes an
interrupted store without recomputing finished shards; on a complete store it does nothing. The store's
URI (default ``<storage.root>/features/<fingerprint id>``, which training with the same config reads) is
in the JSON summary printed at the end.
"""

from __future__ import annotations

import sys

from vitune.cli import jobs


def main(argv: list[str] | None = None) -> int:
    return jobs.main("extract_features", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
