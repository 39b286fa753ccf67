"""What a person sees: progress lines off a terminal, a bar on one, and Ray's logs kept off the terminal
(its Python loggers and what is written below Python to file descriptor 2) at default verbosity."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

from vitune.progress import INTERVAL_ENV, Progress


def test_off_a_terminal_one_line_per_interval_and_a_last_one(caplog, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    with caplog.at_level(logging.INFO, logger="vitune.progress"), \
            Progress("align", 4, "steps", terminal=False) as p:
        p.set(2, loss=1.23456, samples_per_s=10.0)
        p.set(4, loss=0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "vitune.progress"]
    assert lines[0] == "align: 0/4 steps"
    assert lines[1].startswith("align: 2/4 steps (50%), ") and "steps/s" in lines[1] and "ETA " in lines[1]
    assert "loss=1.235" in lines[1] and "samples_per_s=10" in lines[1]
    assert lines[-1].startswith("align: 4/4 steps (100%)") and "loss=0.5" in lines[-1] and " in 0:0" in lines[-1]


def test_quiet_interval_logs_only_the_first_and_last(caplog, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    with caplog.at_level(logging.INFO, logger="vitune.progress"), \
            Progress("features", 3, "images", terminal=False) as p:
        for _ in range(3):
            p.update()
    lines = [r.getMessage() for r in caplog.records if r.name == "vitune.progress"]
    assert len(lines) == 2 and lines[-1].startswith("features: 3/3 images (100%)"), lines


def test_on_a_terminal_a_bar_with_rate_and_stats():
    out = io.StringIO()
    with Progress("answers", 5, "answers", stream=out, terminal=True) as p:
        p.update(5, loss=0.25)
    text = out.getvalue()
    assert "answers" in text and "5/5" in text and "loss=0.25" in text and "/s" in text


PROBE = r"""
import logging, os, sys
from vitune import progress
progress.setup_console(False)
path = progress.route_ray_logs()
logging.getLogger("ray").warning("RAY-PYTHON-LINE")
logging.getLogger("ray.data").info("RAY-DATA-LINE")
os.write(2, b"BELOW-PYTHON-LINE\n")
print("\x1b[33m(raylet)\x1b[0m RAYLET-PUSHED-LINE")  # what Ray's driver prints for errors pushed to it
print("(MapWorker(MapBatches(f)) pid=7) WORKER-LINE", file=sys.stderr)
logging.getLogger("vitune.x").info("VITUNE-LINE")
logging.getLogger("somelib").info("LIB-INFO-LINE")
import ray.data
assert not ray.data.DataContext.get_current().enable_progress_bars
print(path)
"""


def test_default_verbosity_sends_ray_to_a_file_and_keeps_vitune_on_the_terminal(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path))
    logged = open(path).read()
    for line in ("RAY-PYTHON-LINE", "RAY-DATA-LINE", "BELOW-PYTHON-LINE", "RAYLET-PUSHED-LINE", "WORKER-LINE"):
        assert line in logged and line not in proc.stderr + proc.stdout, line
    assert "VITUNE-LINE" in proc.stderr and "LIB-INFO-LINE" not in proc.stderr
