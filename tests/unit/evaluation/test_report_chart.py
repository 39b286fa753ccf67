"""The evaluation's per-category chart: a PNG of the categories each benchmark reports (chance where known)."""

from __future__ import annotations

import io

from PIL import Image

from vitune.evaluation import report as report_lib

SYNTHETIC = {"benchmark": "synthetic", "result": {
    "accuracy": 0.79, "per_kind": {"color": 1.0, "shape": 0.5, "count": 0.88},
    "chance": {"color": 0.25, "shape": 1 / 3, "count": 1 / 3, "overall": 0.31},
    "n": 96, "n_per_kind": {"color": 32, "shape": 32, "count": 32}}}


def test_synthetic_chart_is_a_png_of_its_kinds_with_chance():
    label, scores, chance = report_lib.categories(SYNTHETIC)
    assert scores == SYNTHETIC["result"]["per_kind"] and set(chance) == {"color", "shape", "count"}
    png = report_lib.chart_png(SYNTHETIC)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_llava_bench_chart_has_its_three_categories_and_no_chart_without_categories():
    report = {"benchmark": "llava_bench", "result": {"relative_score": {
        "conversation": 50.0, "detail": 40.0, "complex": 60.0, "all": 50.0}}}
    assert list(report_lib.categories(report)[1]) == ["conversation", "detail", "complex"]
    assert report_lib.chart_png(report).startswith(b"\x89PNG")
    assert report_lib.chart_png({"benchmark": "unknown", "result": {}}) is None
