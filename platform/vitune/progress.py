"""What a person sees while a job runs: progress bars for the long steps, and Ray's own logs kept in files.

``Progress`` is one progress display for every long step (feature extraction, training, evaluation,
generation): a tqdm bar with rate and ETA on a terminal, and one log line per interval (plus a last one)
when stderr is not a terminal (a CI log, ``ray job logs``, a pipe).

``setup_console(verbose)`` is what the ``vitune`` command line calls first. At default verbosity the
terminal gets vitune's own INFO lines and everyone's warnings; once Ray starts (``route_ray_logs``, from
``vitune.config.init_ray``) Ray's Python loggers and whatever the process writes to file descriptor 2 below
Python (Ray's C++ core worker) go to ``<tmp>/vitune/logs/ray-<time>-<pid>.log``, and Ray Data's own progress
bars are off (``Progress`` replaces them).
``-v`` keeps everything on the terminal, as before. Ray's worker, raylet and Ray Data logs stay where Ray
writes them: ``<ray temp dir>/session_latest/logs``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
import time
from typing import IO, Any

log = logging.getLogger("vitune.progress")

INTERVAL_ENV = "VITUNE_PROGRESS_INTERVAL"  # seconds between progress lines off a terminal (default 10)
RAY_LOG_ENV = "VITUNE_RAY_LOG"  # set by setup_console at default verbosity: the file Ray's driver logs go to
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
RAY_SESSION_LOGS = "session_latest/logs"  # under Ray's temp dir: workers, raylet, GCS, Ray Data
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _interval() -> float:
    return float(os.environ.get(INTERVAL_ENV, "10"))


def _fmt_seconds(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _fmt_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """Progress of one step: ``update(n, **stats)`` as work completes, ``close()`` (or ``with``) at the end.

    ``unit`` names what is counted (images, steps, answers); ``stats`` (loss=..., samples_per_s=...) are shown
    beside the rate. On a terminal a tqdm bar; otherwise a line every ``VITUNE_PROGRESS_INTERVAL`` seconds.
    """

    def __init__(self, desc: str, total: int | None, unit: str = "it", stream: IO[str] | None = None,
                 terminal: bool | None = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0
        self.stats: dict[str, Any] = {}
        self._t0 = self._last = time.perf_counter()
        stream = stream or sys.stderr
        self._bar = None
        if terminal if terminal is not None else _isatty(stream):
            from tqdm import tqdm  # deferred: only a terminal draws a bar

            self._bar = tqdm(total=total, desc=desc, unit=unit.rstrip("s") or unit, file=stream,
                             dynamic_ncols=True, leave=True, mininterval=0.5)
        else:
            log.info("%s: 0/%s %s", desc, total if total is not None else "?", unit)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self._t0
        return self.n / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The line logged off a terminal: count, share, rate, ETA and the step's own numbers."""
        rate = self.rate
        parts = [f"{self.desc}: {self.n}/{self.total if self.total is not None else '?'} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.2f} {self.unit}/s")
        if self.total and self.n < self.total:
            parts.append(f"ETA {_fmt_seconds((self.total - self.n) / rate if rate > 0 else None)}")
        else:
            parts.append(f"in {_fmt_seconds(time.perf_counter() - self._t0)}")
        parts.extend(f"{k}={_fmt_value(v)}" for k, v in self.stats.items())
        return ", ".join(parts)

    def update(self, n: int = 1, **stats: Any) -> None:
        self.set(self.n + n, **stats)

    def set(self, n: int, **stats: Any) -> None:
        """Move to ``n`` done (absolute: a training step number), with the step's latest numbers."""
        delta, self.n = n - self.n, n
        self.stats.update({k: v for k, v in stats.items() if v is not None})
        if self._bar is not None:
            if self.stats:
                self._bar.set_postfix({k: _fmt_value(v) for k, v in self.stats.items()}, refresh=False)
            self._bar.update(delta)
            return
        now = time.perf_counter()
        if now - self._last >= _interval():
            self._last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._last is not None:
            log.info("%s", self.line())
        self._last = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------------------- console and logs


class _ConsoleFilter(logging.Filter):
    """At default verbosity: vitune's own INFO lines, and only warnings from everyone else."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings" and f"{os.sep}ray{os.sep}" in record.getMessage():
            return False  # Ray's own Python warnings go to its log file with the rest (route_ray_logs)
        return record.name.startswith("vitune") or record.levelno >= logging.WARNING


def default_log_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "vitune", "logs")


def setup_console(verbose: bool) -> None:
    """Logging for a command-line process: vitune's lines (and everyone's warnings) on stderr; at default
    verbosity Ray's logs will go to a file once Ray starts (``route_ray_logs``), with ``verbose`` everything
    stays on the terminal."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format=FORMAT, datefmt="%H:%M:%S")
        os.environ.pop(RAY_LOG_ENV, None)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_ConsoleFilter())
    _StderrAtEmit.adopt(handler)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # peft imports bitsandbytes when installed; on a CPU with AVX512-BF16 that import tries to fetch an optional
    # kernel from the Hugging Face hub and warns when it cannot, then uses its own (correct) one: noise on every run
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # mlflow sets up its own INFO console handler on import (its store's schema notices): warnings only
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # transformers' "Loading weights" bar on every model folder load: vitune logs the load itself (read by
    # transformers when it is imported, which the commands do later)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ[RAY_LOG_ENV] = os.path.join(default_log_dir(), f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


class _StderrAtEmit:
    """Makes a StreamHandler write to whatever ``sys.stderr`` is when it emits (it moves in ``route_ray_logs``)."""

    @staticmethod
    def adopt(handler: logging.StreamHandler) -> None:
        emit = handler.emit

        def emit_to_current(record: logging.LogRecord) -> None:
            handler.stream = sys.stderr
            emit(record)

        handler.emit = emit_to_current  # type: ignore[method-assign]


def ray_log_file() -> str | None:
    """The file Ray's driver logs go to in this process (None: on the terminal, as with ``-v``)."""
    return os.environ.get(RAY_LOG_ENV) or None


def route_ray_logs() -> str | None:
    """Send this process's Ray logs to ``ray_log_file()``: Ray's Python log handlers, and file descriptor 2
    (what Ray's C++ core worker prints) while ``sys.stderr`` moves to a copy of the terminal; Ray Data's own
    progress output off. A no-op when verbose. Called around ``ray.init`` and after ``serve.start``."""
    path = ray_log_file()
    if not path:
        return None
    import ray.data  # deferred: only a process that runs Ray gets here; importing sets up ray.data's loggers

    os.makedirs(os.path.dirname(path), exist_ok=True)
    _redirect_fd2(path)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # vitune's Progress shows the step instead
    ctx.print_on_execution_start = False
    file_handler = _file_handler(path)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == file_handler.baseFilename
               for h in warnings_logger.handlers):
        warnings_logger.addHandler(file_handler)
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
                logger.addHandler(file_handler)
    return path


def _redirect_fd2(path: str) -> None:
    """fd 2 → ``path`` (once), ``sys.stderr`` → a duplicate of what fd 2 was (the terminal)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if os.path.sameopenfile(fd, 2):
            return
        sys.stderr.flush()
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8")
        os.dup2(fd, 2)
        sys.stderr = _WithoutRayLines(terminal, path)
        sys.stdout = _WithoutRayLines(sys.stdout, path)
    finally:
        os.close(fd)


# what Ray's driver prints for its processes: "(raylet) ...", "(MapWorker(...) pid=123) ...", maybe coloured
RAY_PROCESS_LINE = re.compile(r"^(\x1b\[[\d;]*m)?\((raylet|autoscaler|[^\n]*? pid=\d+[^)]*)\)")


class _WithoutRayLines(io.TextIOBase):
    """A text stream that sends whole lines Ray's driver prints for its processes (raylet notices pushed to
    every driver, whatever ``log_to_driver`` says) to the Ray log file, and everything else on."""

    def __init__(self, stream: IO[str], path: str) -> None:
        self.stream, self.path, self._partial = stream, path, ""

    def write(self, text: str) -> int:
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            if RAY_PROCESS_LINE.match(line):
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            else:
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._partial and not self._partial.startswith(("(", "\x1b")):
            self.stream.write(self._partial)
            self._partial = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return _isatty(self.stream)

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


def _file_handler(path: str) -> logging.Handler:
    h = logging.FileHandler(path, delay=True)  # opened on the first record: most calls add it nowhere
    h.setFormatter(logging.Formatter(FORMAT))
    return h


def ray_session_logs() -> str:
    """Where Ray writes its own logs (workers, raylet, Ray Data) on this machine."""
    try:
        import ray  # deferred: only asked once Ray runs

        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001 - no local Ray node: Ray's default place
        return os.path.join(tempfile.gettempdir(), "ray", RAY_SESSION_LOGS)


# ------------------------------------------------------------------------------ progress from Ray workers


class ProgressBoard:
    """A tiny Ray actor: a remote worker (training's rank 0) posts where it is; the driver shows it."""

    def __init__(self) -> None:
        self.n, self.stats = 0, {}

    def post(self, n: int, stats: dict[str, Any]) -> None:
        self.n, self.stats = n, stats

    def read(self) -> tuple[int, dict[str, Any]]:
        return self.n, self.stats


class RemoteProgress:
    """``Progress`` fed by remote workers: ``with RemoteProgress(desc, total, unit) as board:`` hand ``board``
    (an actor handle) to the workers, which call ``board.post.remote(n, stats)``; a driver thread shows it."""

    def __init__(self, desc: str, total: int | None, unit: str = "it", poll_s: float = 1.0) -> None:
        self.desc, self.total, self.unit, self.poll_s = desc, total, unit, poll_s

    def __enter__(self) -> Any:
        import threading  # deferred with ray: only the training driver uses this

        import ray  # deferred: this module is imported by processes that never run Ray

        self.board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        self.progress = Progress(self.desc, self.total, self.unit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="vitune-progress", daemon=True)
        self._thread.start()
        return self.board

    def _poll(self) -> None:
        import ray  # deferred: see __enter__

        while not self._stop.wait(self.poll_s):
            try:
                n, stats = ray.get(self.board.read.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - progress display must never stop a job
                continue
            if n != self.progress.n:
                self.progress.set(n, **stats)

    def __exit__(self, *exc: object) -> None:
        import ray  # deferred: see __enter__

        self._stop.set()
        self._thread.join(timeout=5)
        try:
            n, stats = ray.get(self.board.read.remote(), timeout=10)
            self.progress.set(n, **stats)
            ray.kill(self.board)
        except Exception:  # noqa: BLE001 - progress display must never stop a job
            pass
        self.progress.close()
