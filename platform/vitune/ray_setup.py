"""Connecting to Ray the same way in every job: join the cluster a job runs on, or start a local one."""

from __future__ import annotations

import logging
import os
from typing import Any

from vitune.config import RayConfig

log = logging.getLogger(__name__)


def ray_init_kwargs(cfg: RayConfig) -> dict[str, Any]:
    """``ray.init`` arguments: resource sizes only when starting a local Ray (joining refuses them)."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        return {"address": address}
    return {"address": address, "num_cpus": cfg.num_cpus}


def init_ray(cfg: RayConfig, **kwargs: Any) -> None:
    """``ray.init`` unless this process is connected already (a job's driver, a test session)."""
    import ray

    if ray.is_initialized():
        return
    args = {**ray_init_kwargs(cfg), **kwargs}
    log.info("starting Ray: %s", {k: v for k, v in args.items() if v is not None} or "local")
    ray.init(**args)
