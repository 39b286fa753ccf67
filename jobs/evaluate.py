"""Evaluate a model folder: ScienceQA accuracy, LLaVA-Bench relative score, or the synthetic held-out set.

    python jobs/evaluate.py --config tiny eval.benchmark=scienceqa \
        eval.model_folder=runs/tiny/train/finetune/model eval.data=/data/scienceqa
    python jobs/evaluate.py --config tiny eval.benchmark=llava_bench \
        eval.model_folder=runs:/<training run id> eval.data=/data/llava-bench-in-the-wild \
        judge.base_url=https://api.openai.com/v1 judge.model=gpt-4o judge.api_key_env=OPENAI_API_KEY
"""

from __future__ import annotations

import json
import sys

import _common


def main(argv: list[str] | None = None) -> int:
    args = _common.parse(__doc__.splitlines()[0], argv)
    from vitune.config import EvalJobConfig, load_config
    from vitune.evaluation.report import metrics
    from vitune.evaluation.run import run_evaluation

    cfg = load_config(EvalJobConfig, args.config, args.overrides)
    report = run_evaluation(cfg)
    summary = {"benchmark": report["benchmark"], "output": report["output"], "run_id": report["mlflow_run_id"],
               "metrics": metrics(report)}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
