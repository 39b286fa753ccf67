"""The feature store's lease on a local folder, contended by real processes: one holder at a time, a second
waits or refuses, and a holder killed with SIGKILL never blocks the next run (the kernel drops its lock)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from vitune.features.lease import StoreBusy, StoreLease


def _hold(store: str, seconds: float, ready) -> None:
    with StoreLease(store, wait_s=0):
        ready.set()
        time.sleep(seconds)


def _start_holder(store: str, seconds: float):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold, args=(store, seconds, ready))
    proc.start()
    assert ready.wait(30), "holder never took the lease"
    return proc


def test_second_writer_refuses_then_waits_for_the_holder(tmp_path):
    store = str(tmp_path / "store")
    holder = _start_holder(store, 2.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreBusy, match=r"being written by another run \(run \w+ on .* pid \d+"):
            StoreLease(store, wait_s=0).acquire()
        assert time.monotonic() - t0 < 1.5
        with StoreLease(store, wait_s=30) as lease:  # waits for the holder to finish, then holds it
            assert lease.waited_s > 0.5
            with pytest.raises(StoreBusy):  # and now this process is the holder others wait for
                StoreLease(store, wait_s=0).acquire()
    finally:
        holder.join(10)


def test_killed_holder_does_not_block(tmp_path):
    store = str(tmp_path / "store")
    holder = _start_holder(store, 60.0)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    t0 = time.monotonic()
    with StoreLease(store, wait_s=5):
        assert time.monotonic() - t0 < 2.5
