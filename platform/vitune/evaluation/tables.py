"""Small helpers the benchmark reports share: Markdown tables, number formatting, MLflow-safe metric names."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]+")


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def metric_name(*parts: str) -> str:
    """A dotted MLflow metric key; characters MLflow refuses (parentheses, commas, ...) become ``_``."""
    return ".".join(_UNSAFE.sub("_", p).strip("_") for p in parts)


def numbers(values: Mapping[str, float | None]) -> dict[str, float]:
    """Drop the Nones and make every value a float (what ``Tracker.log_metrics`` takes)."""
    return {k: float(v) for k, v in values.items() if v is not None}
