"""benchmarks/gpu/stage2_step.py on CPU with its tiny shapes, where only torch and transformers are installed.

The script is run in a subprocess whose Python cannot see Ray, DeepSpeed, open_clip, pydantic or vitune's
editable install (a copy of site-packages without them, ``python -S``), as on a lent GPU machine; its printed
rows are parsed. In-process (the import paid once): a failing case makes the run exit 1, and the packing check
tells packed attention from attention that crosses samples.
"""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "stage2_step.py"
# what a GPU machine with torch and transformers alone lacks (pydantic: vitune.config must not be pulled in)
ABSENT = ("ray", "deepspeed", "open_clip", "open_clip_torch", "pydantic", "pydantic_core", "vitune", "__editable__")


def _stripped_site(tmp: Path) -> Path:
    """This Python's site-packages as links in one folder, less the ``ABSENT`` packages, their metadata and
    every .pth file (the first folder holding a name wins, as on ``sys.path``)."""
    paths = sysconfig.get_paths()
    out = tmp / "site"
    out.mkdir()
    for folder in dict.fromkeys([paths["purelib"], paths["platlib"], *site.getsitepackages()]):
        for entry in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
            top = entry.name.split("-")[0].split(".")[0].lower()
            if top in ABSENT or entry.suffix == ".pth" or (out / entry.name).exists():
                continue
            (out / entry.name).symlink_to(entry)
    return out


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(_stripped_site(tmp)), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-S", str(SCRIPT), "--tiny", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp)


def _rows(stdout: str) -> list[dict]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].strip("|").split("|")) == {"---"}
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def test_tiny_run_without_ray_deepspeed_open_clip(tmp_path: Path) -> None:
    done = _run(tmp_path, "--steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "packing check (sdpa, bf16)" in done.stdout and ": ok" in done.stdout
    rows = _rows(done.stdout)
    models = ("tiny-llava-pad", "tiny-llava", "tiny-qwen2")  # the first two share one model (pad, anyres)
    assert [(r["model"], r["packing"]) for r in rows] == [(m, p) for m in models for p in ("off", "on")]
    for r in rows:
        assert r["status"] == "ok" and r["MFU"] == "n/a" and r["peak memory GiB"] == "n/a"  # CPU: no peak, no CUDA
        assert float(r["real tokens/s"]) > 0 and float(r["step s"]) > 0
        assert 0 <= float(r["data wait share"]) < 1
    by = {(r["model"], r["packing"]): r for r in rows}
    for model in models:
        on, off = by[model, "on"], by[model, "off"]
        assert float(on["padding share"]) < float(off["padding share"])
        assert float(on["samples/step"]) > float(off["samples/step"])  # the same [rows, max_length] bound, fuller
    assert "6 of 6 cases ok" in done.stdout


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("stage2_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_a_failing_case_exits_non_zero(bench, capsys, caplog) -> None:
    # a packing budget under the longest sample: the packer refuses it, the row says so, the run exits 1
    assert bench.main(["--tiny", "--shapes", "tiny-qwen2", "--steps", "1", "--warmup", "0", "--pack-budget", "64"]) == 1
    rows = {r["packing"]: r for r in _rows(capsys.readouterr().out)}
    assert rows["off"]["status"] == "ok" and rows["on"]["status"] == "FAILED (ValueError)"
    assert "more than the packing budget of 64" in caplog.text


def test_packing_check_separates_packed_from_leaking_attention(bench) -> None:
    import torch

    check = bench.packing_check("sdpa", torch.device("cpu"), torch.float32)
    assert check["ok"], check
    assert check["leak_free"] <= 1e-4 < check["leaking"]


def test_unknown_shape_lists_the_valid_ones(bench, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        bench.main(["--shapes", "llava-70b"])
    assert stop.value.code == 2
    assert "llava-7b" in capsys.readouterr().err


def test_out_of_memory_is_a_failed_row_and_the_other_cases_run(bench, capsys, monkeypatch) -> None:
    import torch

    real = bench.run_case

    def packed_runs_out(model, optimizer, shape, packed, *args):
        if packed:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, optimizer, shape, packed, *args)

    monkeypatch.setattr(bench, "run_case", packed_runs_out)
    assert bench.main(["--tiny", "--shapes", "tiny-qwen2", "tiny-llava", "--steps", "1", "--warmup", "0"]) == 1
    rows = {(r["model"], r["packing"]): r["status"] for r in _rows(capsys.readouterr().out)}
    assert rows == {("tiny-qwen2", "off"): "ok", ("tiny-qwen2", "on"): "FAILED (OOM)",
                    ("tiny-llava", "off"): "ok", ("tiny-llava", "on"): "FAILED (OOM)"}
