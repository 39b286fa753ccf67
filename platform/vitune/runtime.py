"""Where a job starts: the S3 endpoint its config names, then Ray joined where the job runs, else started.

Reading or validating a config never does any of this (``vitune.config`` has no side effects); every job
calls ``connect`` when it starts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vitune import progress, storage
from vitune.config import JobConfig, RayConfig

log = logging.getLogger(__name__)


def ray_init_kwargs(cfg: RayConfig) -> dict[str, Any]:
    """``ray.init`` arguments: resource sizes only when starting a local Ray (joining refuses them)."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        return {"address": address}
    return {"address": address, "num_cpus": cfg.num_cpus}


def init_ray(cfg: RayConfig, **kwargs: Any) -> None:
    """``ray.init`` unless this process is connected already (a job's driver, a test session)."""
    import ray  # deferred: configs are read by processes that never start Ray (CLI, Serve replicas, unit tests)

    if ray.is_initialized():
        return
    args = {**ray_init_kwargs(cfg), **kwargs}
    if progress.ray_log_file():  # the command line's default verbosity: Ray's logs go to files, not the terminal
        args.setdefault("log_to_driver", False)
        progress.route_ray_logs()
    log.info("starting Ray: %s", {k: v for k, v in args.items() if v is not None} or "local")
    ray.init(**args)
    progress.route_ray_logs()


def connect(cfg: JobConfig, start_ray: bool = False) -> None:
    """What every job sets up first: the S3 endpoint its config names, then Ray when ``start_ray``.

    Jobs that may find nothing to do (a complete feature store) connect to Ray later, only when needed.
    """
    if cfg.storage.s3_endpoint_url:
        storage.s3.configure_s3(cfg.storage.s3_endpoint_url)
    if start_ray:
        init_ray(cfg.ray)
