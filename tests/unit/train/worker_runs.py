"""One run of the real per-worker loop in this process, for the tests: ``benchmarks/train_step.py``'s harness with
its process group and DeepSpeed's cached world group set up and torn down around it.

DeepSpeed caches its world group (``deepspeed.utils.groups._WORLD_GROUP``); one left from an earlier run's
destroyed process group is stale in the next, so it is forgotten before and after each run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from benchmarks.train_step import run_single_process
from vitune.config import TrainJobConfig
from vitune.train.worker import Worker


@dataclass
class WorkerRun:
    final: dict  # run_loop's summary of the last step
    metrics: list[dict] = field(default_factory=list)  # every logged step's metrics
    workers: list[Worker] = field(default_factory=list)  # the worker built (one: this process is rank 0 of 1)

    @property
    def worker(self) -> Worker:
        return self.workers[0]


def forget_deepspeed_world_group() -> None:
    from deepspeed.utils import groups  # deferred: DeepSpeed is slow to import

    groups._WORLD_GROUP = None


def run_worker(cfg: TrainJobConfig, rows: list[dict], feature_dim: int, worker_cls: type[Worker] = Worker,
               fingerprint: dict[str, Any] | None = None) -> WorkerRun:
    """``run_single_process`` over ``rows`` with a ``worker_cls`` worker, in a process group of its own."""
    run = WorkerRun(final={})

    def make(*args: Any) -> Worker:
        run.workers.append(worker_cls(*args))
        return run.workers[-1]

    forget_deepspeed_world_group()
    try:
        run.final = run_single_process(cfg, rows, feature_dim, fingerprint or {"tower": "test"}, run.metrics.append,
                                       make)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        forget_deepspeed_world_group()
    return run
