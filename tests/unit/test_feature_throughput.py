"""benchmarks/feature_throughput.py's rows: medians over the runs, Ray's start-up kept apart from the rate.

The benchmark itself takes minutes of real Ray work; these check the arithmetic of what it prints, on runs
shaped like the manifests' ``last_run`` entries.
"""

from __future__ import annotations

import pytest

from benchmarks.feature_throughput import rate_rows


def _run(rate: float, steady: float | None, startup: float | None, pipeline: float) -> dict:
    return {"timings": {"images_per_s": rate, "steady_images_per_s": steady, "startup_s": startup,
                        "pipeline_s": pipeline, "load_s": 1.0, "wait_s": None},
            "pool": {"num_actors": 1}}


def test_medians_not_the_best_run_and_start_up_apart() -> None:
    # three runs of 100 images; the first pays the worker start-up (as a fresh local Ray's does)
    runs = [_run(20.0, 50.0, 3.0, 5.0), _run(40.0, 60.0, 0.5, 2.5), _run(45.0, 55.0, 0.4, 100 / 45)]
    rows = rate_rows(100, [50.0, 40.0, 60.0], runs, ray_init_s=5.0)
    assert rows["runs"] == 3
    assert rows["loop_images_per_s"] == 50.0 and rows["ray_images_per_s"] == 40.0  # medians, not 60 and 45
    assert rows["ratio"] == pytest.approx(0.8) and rows["steady_ratio"] == pytest.approx(55 / 50)
    assert rows["ray_startup_s"] == 0.5 and rows["all_ray_startup_s"] == [3.0, 0.5, 0.4]
    # cold: the first run with ray.init added, 100 images in 5 + 5 s, against the median loop
    assert rows["ray_init_s"] == 5.0 and rows["cold_ratio"] == pytest.approx(10 / 50)
    assert rows["ray_timings_s"]["images_per_s"] == 40.0  # the median run's breakdown
    assert "wait_s" not in rows["ray_timings_s"]


def test_a_single_shard_run_has_no_steady_rate() -> None:
    rows = rate_rows(10, [5.0], [_run(4.0, None, 2.5, 2.5)], ray_init_s=1.0)
    assert rows["ray_steady_images_per_s"] is None and rows["steady_ratio"] is None
    assert rows["ratio"] == pytest.approx(0.8)
