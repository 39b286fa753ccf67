"""Train one LLaVA stage (``stage=align|finetune``) with Ray Train × DeepSpeed from the feature store.

    python jobs/train.py --config tiny stage=align
    python jobs/train.py --config tiny stage=finetune      # starts from the align stage's model folder
    python jobs/train.py --config llava-v1.5-7b stage=align data.features=s3://b/features/<id> \
        'data.records=[s3://b/blip_laion_cc_sbu_558k.json]' data.image_root=s3://b/images

Prints ``{stage, model_folder, run_id, total_steps}`` as JSON.
"""

from __future__ import annotations

import sys

from vitune.cli import jobs


def main(argv: list[str] | None = None) -> int:
    return jobs.main("train", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
