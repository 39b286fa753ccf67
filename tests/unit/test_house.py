"""The shape of the house: no import cycle between vitune's rooms, and a config that needs no heavy library.

A room is a subpackage (``vitune.model``) or a top-level module (``vitune.layout``). Every import counts,
deferred ones inside functions too: a deferred import is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "platform" / "vitune"
HEAVY = ("torch", "peft", "bitsandbytes", "deepspeed", "transformers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, dict[str, list[str]]]:
    """``{room: {room it imports: ["module:line", ...]}}`` from every import statement in the package."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, dict[str, list[str]]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target in modules and _room(target) != _room(name):
                    graph.setdefault(_room(name), {}).setdefault(_room(target), []).append(f"{name}:{node.lineno}")
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one room (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(set(graph) | {w for deps in graph.values() for w in deps}):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_deferred_imports_and_finds_a_planted_cycle():
    graph = import_graph()
    # a deferred import (inside a function) is an edge: the evaluation driver loads model folders lazily
    assert "vitune.model" in graph["vitune.evaluation"]
    planted = {**graph, "vitune.storage": {**graph.get("vitune.storage", {}), "vitune.layout": ["planted:1"]}}
    assert any({"vitune.storage", "vitune.layout"} <= set(c) for c in cycles(planted))


def test_no_import_cycle_between_rooms():
    graph = import_graph()
    found = cycles(graph)
    detail = [{a: {b: graph[a][b] for b in c if b in graph.get(a, {})} for a in c} for c in found]
    assert not found, f"import cycles between rooms: {json.dumps(detail, indent=1)}"


# Run in a fresh interpreter where the heavy libraries cannot be imported: load and validate every preset
# as every job's config, and print `vitune submit --help`.
_WITHOUT_HEAVY = """
import importlib.abc, sys
HEAVY = {heavy!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{{name}} is made unimportable by this test")

sys.meta_path.insert(0, Refuse())
from vitune import config
from vitune.cli.main import main

jobs = [config.FeaturesJobConfig, config.TrainJobConfig, config.EvalJobConfig, config.GenerateJobConfig,
        config.SyntheticJobConfig]
loaded = 0
for preset in config.preset_names():
    for cls in jobs:
        stages = config.STAGES if cls is config.TrainJobConfig else (None,)
        for stage in stages:
            config.load_config(cls, preset, [f"stage={{stage}}"] if stage else [])
            loaded += 1
assert not [m for m in sys.modules if m.split(".")[0] in HEAVY], "a heavy library was imported"
assert "ray" not in sys.modules, "reading configs imported Ray"
print("LOADED", loaded, len(config.preset_names()))
from vitune.catalog import JOBS
from vitune.cli.submit import validate_job
for job in JOBS:  # what `vitune submit JOB --config tiny` checks before it sends anything
    assert validate_job(job, "tiny", ["stage=finetune"] if job == "train" else []), job
print("SUBMIT_VALIDATED", len(JOBS))
try:
    main(["submit", "--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("HEAVY_AFTER", sorted(m for m in sys.modules if m.split(".")[0] in HEAVY))
"""


def test_configs_and_submit_need_no_torch_peft_bitsandbytes_deepspeed_or_transformers(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{PACKAGE.parent}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_HEAVY.format(heavy=HEAVY)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = next(line for line in done.stdout.splitlines() if line.startswith("LOADED")).split()
    assert int(loaded[2]) >= 5 and int(loaded[1]) == int(loaded[2]) * 6  # every preset, as every job's config
    validated = next(line for line in done.stdout.splitlines() if line.startswith("SUBMIT_VALIDATED")).split()
    assert int(validated[1]) >= 5  # every job's submission validated (features, train, evaluate, generate, pipeline)
    assert "vitune submit" in done.stdout and "usage" in done.stdout
    assert done.stdout.strip().endswith("HEAVY_AFTER []")
