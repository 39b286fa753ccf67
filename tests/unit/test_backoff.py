"""``vitune.backoff``: calls that can wait are held while a service is down and replayed in order; calls the job
needs are retried with a doubling backoff for up to ``retry_s``; a refusal of the request itself is not retried."""

from __future__ import annotations

import pytest

from vitune.backoff import Backoff, is_request_error


class Clock:
    """A fake monotonic clock; ``sleep`` advances it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(round(s, 3))
        self.now += s


class Service:
    """Records what it received; raises ConnectionError while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.got: list[str] = []
        self.tries = 0

    def send(self, item: str) -> str:
        self.tries += 1
        if self.down:
            raise ConnectionError("refused")
        self.got.append(item)
        return item


class Refused(Exception):
    def get_http_status_code(self) -> int:
        return 400


def _backoff(clock: Clock, retry_s: float = 60.0, max_held: int = 100) -> Backoff:
    return Backoff("svc", retry_s, initial_s=1.0, max_s=8.0, max_held=max_held, sleep=clock.sleep, clock=clock)


def test_held_calls_are_replayed_in_order_once_the_service_answers():
    clock, svc = Clock(), Service()
    b = _backoff(clock)
    svc.down = True
    assert b.call("a", lambda: svc.send("a")) is None  # tried, failed: held
    assert b.call("b", lambda: svc.send("b")) is None  # within the backoff: held without a try
    assert (svc.tries, b.held, b.down) == (1, 2, True)
    clock.now += 1.0
    b.call("c", lambda: svc.send("c"))  # still down: the retry fails on the first held call; backoff doubles
    assert (svc.tries, b.held) == (2, 3)
    clock.now += 1.0
    b.call("d", lambda: svc.send("d"))  # 1 s into a 2 s backoff: no try
    assert svc.tries == 2
    svc.down = False
    clock.now += 1.0
    assert b.call("e", lambda: svc.send("e")) == "e"
    assert svc.got == ["a", "b", "c", "d", "e"] and b.held == 0 and not b.down


def test_a_critical_call_waits_the_outage_out_with_a_doubling_backoff():
    clock, svc = Clock(), Service()
    b = _backoff(clock)
    svc.down = True
    tries = iter(range(100))

    def send() -> str:
        if next(tries) == 5:
            svc.down = False
        return svc.send("register")

    assert b.call("register", send, critical=True) == "register"
    assert clock.slept == [1.0, 2.0, 4.0, 8.0, 8.0]  # capped at max_s


def test_a_critical_call_gives_up_after_retry_s_and_the_job_goes_on():
    clock, svc = Clock(), Service()
    b = _backoff(clock, retry_s=10.0)
    svc.down = True
    assert b.call("close", lambda: svc.send("close"), critical=True) is None
    assert sum(clock.slept) == pytest.approx(10.0)
    assert svc.got == []


def test_a_refused_request_is_dropped_not_retried_or_held():
    clock, svc = Clock(), Service()
    b = _backoff(clock)

    def refuse() -> None:
        raise Refused("name exists")

    assert is_request_error(Refused()) and not is_request_error(ConnectionError())
    assert b.call("bad", refuse, critical=True) is None and b.held == 0 and clock.slept == []
    assert b.call("next", lambda: svc.send("next")) == "next"


def test_held_calls_are_bounded_oldest_dropped_first():
    clock, svc = Clock(), Service()
    b = _backoff(clock, max_held=3)
    svc.down = True
    for item in "abcde":
        b.call(item, lambda i=item: svc.send(i))
    assert (b.held, b.dropped) == (3, 2)
    svc.down = False
    assert b.flush()
    assert svc.got == ["c", "d", "e"]
