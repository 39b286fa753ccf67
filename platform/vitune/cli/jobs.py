"""The one shape of every job entrypoint: parse → load the config → run → print a JSON summary.

``jobs/<name>.py`` is ``sys.exit(main("<name>"))``: ``--config PRESET [key.sub=value ...]`` (a preset name
or a YAML path/URI), logging to stderr, the run through the library (which sets up storage and Ray the
same way for every job, ``vitune.config.connect``), and one JSON line on stdout. What each job loads and
runs is its entry in ``vitune.catalog.JOBS`` (``vitune submit`` validates a submission with the same table).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from vitune import catalog
from vitune.config import load_config
from vitune.pipeline import STEPS_KEY, split_steps


def run_job(job: str, config: str, args: Sequence[str]) -> Any:
    """Run job ``job`` on preset/YAML ``config`` with ``args`` (its overrides); returns what its run returns."""
    spec = catalog.job(job)
    # imported when the job runs: each job loads only its own stack (Ray Train and DeepSpeed, the tower, ...)
    run = catalog.load(spec.run)
    if spec.config is None:  # the pipeline: one config per step, loaded by the pipeline itself
        steps, overrides = split_steps(args)
        return run(config, overrides, steps)
    return run(load_config(catalog.load(spec.config), config, args))


def parse_args(job: str, description: str | None, argv: Sequence[str] | None,
               prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog or f"jobs/{job}.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a preset name (tiny, llava-v1.5-7b, ...) or a YAML path/URI")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides" + (
        f"; {STEPS_KEY}=a,b picks the pipeline's steps" if catalog.job(job).config is None else ""))
    return p.parse_args(argv)


def main(job: str, argv: Sequence[str] | None = None, description: str | None = None,
         prog: str | None = None) -> int:
    """Run job ``job`` with command-line ``argv``; prints its summary as one JSON line, returns the exit code."""
    spec = catalog.job(job)  # an unknown name fails here, listing the valid ones
    args = parse_args(job, description, argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    result = run_job(job, args.config, args.overrides)
    summary = catalog.load(spec.summary)(result) if spec.summary else result
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    return 0
