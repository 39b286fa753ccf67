"""``vitune evaluate --compare A B``: two results side by side, with deltas (A − B), in published units.

A side is any of:

- an evaluation's output folder (its ``results_table.json``), or a folder holding several (a pipeline's
  ``<root>/eval``: their rows merged; two results for one name is an error naming both files);
- a ``results_table.json`` or a ``report.json`` (its table is built from the report);
- a published row as a small YAML: ``name: ...`` and ``results: {<published name>: value, ...}`` with the
  names of ``results_table`` (``GQA``, ``POPE``, ``MME``, ``MM-Bench``, ...), MME in points, the rest in %;
- the name of a row vitune ships from LLaVA's model zoo (``published_rows.json``): ``llava-v1.5-7b``,
  ``llava-v1.5-13b``, ``llava-v1.5-7b-lora``, ``llava-v1.5-13b-lora``.

The table lists A's rows in order, then the names only B has; a delta is shown where both have a value.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from vitune import storage
from vitune.evaluation import results_table
from vitune.evaluation.tables import fmt, table

PUBLISHED_FILE = "published_rows.json"


@dataclass(frozen=True)
class Side:
    label: str
    values: dict[str, float | None]  # published name → value in its unit


@lru_cache(maxsize=1)
def published() -> dict[str, Any]:
    """``{source, rows: {name: {published name: value}}}``, the model-zoo rows vitune ships."""
    return json.loads(resources.files("vitune.evaluation").joinpath(PUBLISHED_FILE).read_text("utf-8"))


def _from_table(tab: Mapping[str, Any]) -> dict[str, float | None]:
    return {r["name"]: r["value"] for r in tab["rows"]}


def _from_json(uri: str) -> dict[str, float | None]:
    data = storage.read_json(uri)
    if isinstance(data, dict) and "rows" in data:
        return _from_table(data)
    if isinstance(data, dict) and "benchmark" in data and "result" in data:
        return _from_table(results_table.build(data))
    raise ValueError(f"{uri}: neither a results_table.json (rows) nor an evaluation report.json")


def _from_yaml(uri: str) -> tuple[str, dict[str, float | None]]:
    data = yaml.safe_load(storage.read_text(uri))
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{uri}: a published row is a YAML mapping with `results: {{name: value, ...}}`")
    values = {}
    for name, value in data["results"].items():
        if value is not None and not isinstance(value, int | float):
            raise ValueError(f"{uri}: results.{name} must be a number, got {value!r}")
        values[str(name)] = None if value is None else float(value)
    return str(data.get("name") or uri), values


def _from_folder(uri: str) -> dict[str, float | None]:
    files = [f for f in storage.list_files(uri) if f.rsplit("/", 1)[-1] == results_table.JSON_FILE]
    if not files:
        raise ValueError(f"{uri}: no {results_table.JSON_FILE} in this folder or below (an evaluation's output)")
    merged: dict[str, float | None] = {}
    origin: dict[str, str] = {}
    for f in files:
        for name, value in _from_json(f).items():
            if name in origin:
                raise ValueError(f"two results for {name!r} under {uri}: {origin[name]} and {f}; name one of them")
            merged[name], origin[name] = value, f
    return merged


def load(ref: str) -> Side:
    """One side of the comparison (see the module docstring)."""
    rows = published()["rows"]
    if ref in rows:
        return Side(f"{ref} (published)", {k: float(v) for k, v in rows[ref].items()})
    if ref.endswith((".yaml", ".yml")):
        label, values = _from_yaml(ref)
        return Side(label, values)
    if ref.endswith(".json") and storage.exists(ref):
        return Side(ref, _from_json(ref))
    if storage.is_dir(ref):
        return Side(ref.rstrip("/"), _from_folder(ref))
    raise ValueError(f"{ref!r} is not a results folder, a results_table.json / report.json, a published-row YAML, "
                     f"nor a shipped published row ({', '.join(rows)})")


def compare_table(a: Side, b: Side) -> str:
    """The Markdown table: name, unit, A, B, A − B."""
    names = list(a.values) + [n for n in b.values if n not in a.values]
    rows = []
    for name in names:
        va, vb = a.values.get(name), b.values.get(name)
        delta = f"{va - vb:+.{results_table.DIGITS}f}" if va is not None and vb is not None else "–"
        rows.append([name, results_table.unit_of(name), fmt(va, results_table.DIGITS),
                     fmt(vb, results_table.DIGITS), delta])
    return table(["", "unit", f"A: {a.label}", f"B: {b.label}", "A − B"], rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vitune evaluate --compare",
                                description="two evaluation results (or a result and a published row) side by side")
    p.add_argument("a", help="results folder, results_table.json, report.json, published YAML or shipped row name")
    p.add_argument("b", help="the same kinds; e.g. llava-v1.5-7b (LLaVA's model zoo)")
    args = p.parse_args(argv)
    sys.stdout.write(compare_table(load(args.a), load(args.b)))
    return 0
