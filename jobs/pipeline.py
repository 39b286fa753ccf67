"""Run features → align → finetune → eval as one job; finished steps with a matching config are skipped.

    python jobs/pipeline.py --config tiny [steps=features,align] [key=value ...]
"""

from __future__ import annotations

import json
import sys

import _common


def main(argv: list[str] | None = None) -> int:
    args = _common.parse(__doc__.splitlines()[0], argv)
    from vitune.pipeline import STEPS, run_pipeline

    steps, overrides = list(STEPS), []
    for item in args.overrides:
        if item.startswith("steps="):
            steps = [s for s in item.split("=", 1)[1].split(",") if s]
        else:
            overrides.append(item)
    results = run_pipeline(args.config, overrides, steps)
    summary = {"steps": results.get("steps"), "mlflow_parent_run_id": results["mlflow_parent_run_id"]}
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
