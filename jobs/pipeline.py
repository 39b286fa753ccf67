"""Run features → align → finetune → eval as one job; finished steps with a matching config are skipped.

    python jobs/pipeline.py --config tiny [steps=features,align] [key=value ...]

Each step is an MLflow run under one parent run; prints ``{steps, mlflow_parent_run_id}`` as JSON.
"""

from __future__ import annotations

import sys

from vitune.cli import jobs


def main(argv: list[str] | None = None) -> int:
    return jobs.main("pipeline", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
