"""Ray job: generate LLaVA instruction data (conversation / detail / complex) through any OpenAI-compatible LLM.

    python jobs/generate_instructions.py --config tiny \\
        generate.input=[s3://data/coco/captions_train2017.json,s3://data/coco/instances_train2017.json] \\
        generate.endpoint.base_url=https://api.example.com/v1 generate.endpoint.model=some-model

The API key is read from the environment variable named by ``generate.endpoint.api_key_env`` on the Ray
workers (on a cluster, pass it in the job's runtime_env). Writes records, quarantined outputs and
``summary.json`` under ``generate.output``; the summary is also printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import _common  # noqa: F401 - puts platform/ on sys.path when run as a plain Ray job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="preset YAML (local path or URI)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    from vitune import storage
    from vitune.config import GenerateJobConfig, init_ray, load_config
    from vitune.instruct.run import run_generate

    cfg = load_config(GenerateJobConfig, args.config, args.overrides)
    if cfg.storage.s3_endpoint_url:
        storage.configure_s3(cfg.storage.s3_endpoint_url)
    init_ray(cfg.ray)
    summary = run_generate(cfg)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
