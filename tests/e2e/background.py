"""`vitune demo`, then `vitune serve models:/vitune-tiny/latest` on its registry, run beside the rest of the session.

Both are the installed commands in their own processes, from a folder outside the repository, exactly as
tests/e2e/test_demo.py checks them; they only start earlier. The demo is ~6 minutes of mostly waiting
processes on this 2-core machine, so the session starts it when collection finishes (tests/conftest.py), runs
the unit and integration tests meanwhile and the e2e tests last; their fixture joins this run and asserts on
what it recorded. Nothing here asserts: a failure is recorded and reported by the test that reads it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.services import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
DEMO_TIMEOUT_S = 1500
SERVE_TIMEOUT_S = 300
BANNER = "Ctrl-C stops it"  # `vitune serve`'s banner: the model is deployed


@dataclass
class Served:
    """What `vitune serve models:/...` showed: its banner, /v1/models' first entry, or why it failed."""

    port: int
    banner: str = ""
    entry: dict | None = None
    error: str | None = None


@dataclass
class DemoRun:
    base: Path
    env: dict[str, str]
    demo: subprocess.CompletedProcess | None = None
    error: str | None = None
    served: Served | None = None
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def root(self) -> Path:
        return self.base / "run"

    @classmethod
    def start(cls) -> DemoRun:
        base = Path(tempfile.mkdtemp(prefix="vitune-e2e-"))
        (base / "elsewhere").mkdir()
        # the installed command alone: no PYTHONPATH, so neither the driver nor a Serve replica sees the repository
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
        run = cls(base, env)
        run._thread = threading.Thread(target=run._run, name="vitune-demo", daemon=True)
        run._thread.start()
        return run

    def join(self, timeout: float = DEMO_TIMEOUT_S + SERVE_TIMEOUT_S + 120) -> DemoRun:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.error = self.error or f"the background demo did not finish in {timeout:.0f}s"
        return self

    def stop(self) -> None:
        self._stopping.set()
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        if self._thread is not None:
            self._thread.join(30)
        shutil.rmtree(self.base, ignore_errors=True)

    def _popen(self, argv: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, cwd=cwd, env=self.env, text=True, **kwargs)
        self._procs.append(proc)
        return proc

    def _run(self) -> None:
        try:
            proc = self._popen([os.path.join(BIN, "vitune"), "demo", "--root", str(self.root),
                                "--port", str(free_port())], self.base / "elsewhere",
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = proc.communicate(timeout=DEMO_TIMEOUT_S)
            self.demo = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            if proc.returncode == 0 and not self._stopping.is_set():
                self.served = self._serve_registered()
        except Exception as e:  # recorded for the tests; the thread never raises
            self.error = f"{type(e).__name__}: {e}"

    def _serve_registered(self) -> Served:
        """`vitune serve models:/vitune-tiny/latest` until deployed, /v1/models, then Ctrl-C (SIGINT)."""
        served = Served(free_port())
        cwd = self.base / "serve"
        cwd.mkdir()
        out_path, err_path = cwd / "serve.out", cwd / "serve.err"
        with open(out_path, "w") as stdout, open(err_path, "w") as stderr:
            proc = self._popen([os.path.join(BIN, "vitune"), "serve", "models:/vitune-tiny/latest",
                                "--tracking-uri", f"sqlite:///{self.root}/mlflow.db", "--port", str(served.port)],
                               cwd, stdout=stdout, stderr=stderr)
            try:
                deadline = time.time() + SERVE_TIMEOUT_S
                while BANNER not in out_path.read_text():
                    if proc.poll() is not None or time.time() > deadline or self._stopping.is_set():
                        served.error = f"not deployed (exit {proc.poll()}):\n{err_path.read_text()[-3000:]}"
                        return served
                    time.sleep(0.5)
                served.entry = httpx.get(f"http://127.0.0.1:{served.port}/v1/models", timeout=30).json()["data"][0]
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                served.banner = out_path.read_text()
        return served


_RUN: DemoRun | None = None


def start_once() -> None:
    global _RUN
    if _RUN is None:
        _RUN = DemoRun.start()


def joined() -> DemoRun:
    """The session's run, joined (started here when the background start was skipped, e.g. `-p no:...`)."""
    start_once()
    assert _RUN is not None
    return _RUN.join()


def stop() -> None:
    if _RUN is not None:
        _RUN.stop()
