"""Autoscaling: under sustained concurrent load the model deployment grows from 1 to 2 replicas, then shrinks."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

APP = "vitune-autoscale"
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "metrics_interval_s": 0.5,  # deprecated in favour of env vars, still honoured; keeps the test short
    "look_back_period_s": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 4,
}


def running_replicas() -> int:
    from ray import serve
    from ray.serve.schema import ReplicaState

    deployment = serve.status().applications[APP].deployments["VLMEngine"]
    return deployment.replica_states.get(ReplicaState.RUNNING, 0)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what} not reached in {timeout_s:.0f}s")
        time.sleep(0.5)


def test_scales_up_under_load_and_back_down_when_idle(serve_http, tiny_model_folder):
    from ray import serve

    url = serve_http.deploy(
        APP, "/autoscale",
        {"model": tiny_model_folder, "served_model_name": "vitune-tiny", "max_batch_size": 4},
        engine_options={"autoscaling_config": AUTOSCALING, "max_ongoing_requests": 8},
    )
    try:
        assert running_replicas() == 1
        stop = threading.Event()
        failures: list[str] = []
        payload = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 48,
                   "temperature": 0}

        def caller() -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                while not stop.is_set():
                    r = http.post("/v1/chat/completions", json=payload)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")

        callers = [threading.Thread(target=caller, daemon=True) for _ in range(10)]
        for t in callers:
            t.start()
        try:
            wait_for(lambda: running_replicas() == 2, 75, "2 running replicas under load")
        finally:
            stop.set()
            for t in callers:
                t.join(timeout=60)
        assert not failures, failures[:3]
        wait_for(lambda: running_replicas() == 1 and _no_extra_replicas(), 60, "1 replica when idle")
    finally:
        serve.delete(APP)


def _no_extra_replicas() -> bool:
    from ray import serve

    states = serve.status().applications[APP].deployments["VLMEngine"].replica_states
    return sum(states.values()) == 1
