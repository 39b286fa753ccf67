"""Shared argument handling for the job entrypoints: ``--config FILE`` plus ``key.sub=value`` overrides."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# jobs run from the repository root (or a Ray job's working dir) without installing the package
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(_ROOT, "platform") not in sys.path:
    sys.path.insert(0, os.path.join(_ROOT, "platform"))


def parse(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="a preset YAML, e.g. tiny")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return args
