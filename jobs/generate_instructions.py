"""Ray job: generate LLaVA instruction data (conversation / detail / complex) through any OpenAI-compatible LLM.

    python jobs/generate_instructions.py --config tiny \\
        generate.input=[s3://data/coco/captions_train2017.json,s3://data/coco/instances_train2017.json] \\
        generate.endpoint.base_url=https://api.example.com/v1 generate.endpoint.model=some-model

The API key is read from the environment variable named by ``generate.endpoint.api_key_env`` on the Ray
workers (on a cluster, pass it in the job's runtime_env). Writes records, quarantined outputs and
``summary.json`` under ``generate.output``; the summary is also printed as JSON on stdout.
"""

from __future__ import annotations

import sys

from vitune.cli import jobs


def main(argv: list[str] | None = None) -> int:
    return jobs.main("generate_instructions", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
