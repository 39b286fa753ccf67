"""Whether any engine replica can answer, for `/healthz`: the Serve controller's count, then the replicas asked.

The controller's count alone lags: a killed replica stays RUNNING until its next health check fails, and with
two killed, the first's replacement can be RUNNING before the second is noticed, so the count never reaches
zero though for seconds no replica can answer. A routed call cannot tell either: Serve's router holds it until
a live replica exists, which looks like overload. So while the controller counts some, every replica this
API replica's router knows is asked through Serve's broadcast (a dead one fails at once). A replica that does
not answer within `PROBE_S` (saturated, or its steps hang) counts as up here: overload is answered per request
(503/429 with Retry-After), and a replica whose steps hang fails the controller's own health check.

One check runs at a time, whoever asks, and its answer is kept for `CACHE_S`: `/healthz` needs no key, so
many callers must not multiply the calls to the controller and the replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

logger = logging.getLogger(__name__)

PROBE_S = 2.0  # how long the replicas have to answer
CONTROLLER_S = 5.0  # how long the controller has to report the replicas' states
CACHE_S = 1.0  # an answer is reused this long


class EngineHealth:
    """`await problem()`: why no engine replica can answer, or None."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine
        self._cached: tuple[float, str | None] = (float("-inf"), None)
        self._running: asyncio.Task[str | None] | None = None

    async def problem(self) -> str | None:
        checked, problem = self._cached
        if time.monotonic() - checked < CACHE_S:
            return problem
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._check())
        # shielded: a caller that goes away does not cancel the check the others wait on
        return await asyncio.shield(self._running)

    async def _check(self) -> str | None:
        try:
            problem = await asyncio.wait_for(asyncio.to_thread(self._controller_problem), CONTROLLER_S)
            if problem is None:
                problem = await self._replicas_problem()
        except TimeoutError:
            problem = f"the Serve controller did not report the engine's state within {CONTROLLER_S:.0f} s"
        except Exception as exc:  # noqa: BLE001 - a check that cannot run reports unavailable, never a 500
            logger.warning("health: the check failed: %r", exc)
            problem = f"the engine's state could not be checked ({type(exc).__name__})"
        self._cached = (time.monotonic(), problem)
        return problem

    def _controller_problem(self) -> str | None:
        app = serve.status().applications[serve.get_replica_context().app_name]
        states = app.deployments[self.engine.deployment_name].replica_states
        running = sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")
        return None if running else "no model replica is running"

    async def _replicas_problem(self) -> str | None:
        try:
            answers = await self.engine.broadcast("info").results_async(timeout_s=PROBE_S, return_exceptions=True)
        except TimeoutError:
            return None  # slow or saturated, not gone (see the module's docstring)
        except DeploymentUnavailableError:
            return "no model replica is reachable"
        if any(not isinstance(answer, BaseException) for answer in answers):
            return None
        return "no model replica answers (lost); Serve is replacing them"
