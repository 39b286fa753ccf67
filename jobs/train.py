"""Train one LLaVA stage (``stage=align|finetune``) with Ray Train × DeepSpeed from the feature store.

    python jobs/train.py --config tiny stage=align data.features=...
"""

from __future__ import annotations

import json
import sys

import _common


def main(argv: list[str] | None = None) -> int:
    args = _common.parse(__doc__.splitlines()[0], argv)
    from vitune.config import TrainJobConfig, load_config
    from vitune.train.driver import run_training

    cfg = load_config(TrainJobConfig, args.config, args.overrides)
    summary = run_training(cfg)
    sys.stdout.write(json.dumps({k: summary[k] for k in ("stage", "model_folder", "run_id", "total_steps")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
