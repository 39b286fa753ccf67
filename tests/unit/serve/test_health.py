"""`EngineHealth` (what `/healthz` says), without Ray: one check at a time for any number of callers, its answer
kept for `CACHE_S`, a check that cannot run reported as unavailable (never raised), the controller bounded."""

from __future__ import annotations

import asyncio
import time

from vitune.serve import health
from vitune.serve.health import EngineHealth


class Counted(EngineHealth):
    """The controller's and the replicas' answers scripted; every check counted."""

    def __init__(self, controller=None, replicas=None, controller_s: float = 0.0) -> None:
        super().__init__(engine=None)  # type: ignore[arg-type]
        self.controller, self.replicas, self.controller_s, self.checks = controller, replicas, controller_s, 0

    def _controller_problem(self) -> str | None:
        self.checks += 1
        time.sleep(self.controller_s)
        if isinstance(self.controller, Exception):
            raise self.controller
        return self.controller

    async def _replicas_problem(self) -> str | None:
        await asyncio.sleep(0.05)
        return self.replicas


async def _ask(h: EngineHealth, n: int) -> list[str | None]:
    return await asyncio.gather(*[h.problem() for _ in range(n)])


def test_one_check_answers_every_concurrent_caller_and_is_kept():
    h = Counted(replicas="no model replica answers (lost); Serve is replacing them")

    async def scenario() -> tuple[list, int, list, int]:
        first = await _ask(h, 50)
        after_first = h.checks
        again = await _ask(h, 50)  # within CACHE_S: no new check
        return first, after_first, again, h.checks

    first, after_first, again, checks = asyncio.run(scenario())
    assert set(first) == set(again) == {h.replicas}
    assert after_first == checks == 1


def test_a_check_that_fails_is_unavailable_not_an_error(monkeypatch):
    assert "RuntimeError" in asyncio.run(Counted(controller=RuntimeError("controller gone")).problem())
    monkeypatch.setattr(health, "CONTROLLER_S", 0.1)
    assert "did not report" in asyncio.run(Counted(controller_s=0.5).problem())
    assert asyncio.run(Counted(controller="no model replica is running").problem()) == "no model replica is running"
    assert asyncio.run(Counted().problem()) is None
