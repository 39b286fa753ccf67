"""Evaluate a model folder: ScienceQA accuracy, LLaVA-Bench relative score, or the synthetic held-out set.

    python jobs/evaluate.py --config tiny eval.benchmark=scienceqa \
        eval.model_folder=runs/tiny/train/finetune/model eval.data=/data/scienceqa
    python jobs/evaluate.py --config tiny eval.benchmark=llava_bench \
        eval.model_folder=runs:/<training run id> eval.data=/data/llava-bench-in-the-wild \
        judge.base_url=https://api.openai.com/v1 judge.model=gpt-4o judge.api_key_env=OPENAI_API_KEY
"""

from __future__ import annotations

import sys

from vitune.cli import jobs


def main(argv: list[str] | None = None) -> int:
    return jobs.main("evaluate", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
