"""Faults on the data path, on the real services: the feature job killed mid-run (SIGKILL) and rerun, the S3
server restarted mid-write, and two concurrent runs on one store. After each, every image is in the store
exactly once and no shard is truncated. The figures go to the README's Reliability table, rows (d) and (e).

(d) and the concurrent runs use the session's S3 server; (e) restarts a short-lived moto server of its own
(moto keeps objects in memory, so its restart also loses what was written: the harshest case for the job).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import boto3
import pytest

from tests import services
from vitune import layout, storage
from vitune.config import FeaturesJobConfig, load_config
from vitune.data import synthetic
from vitune.features.extract import extract_features, plan_shards
from vitune.features.store import FeatureStore, shard_name, shard_problem

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # `make test-slow`
log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
TINY = "tiny"


def _config(root: str, data: dict, shard_size: int, *extra: str) -> FeaturesJobConfig:
    records = [data["records"]["captions"]]
    return load_config(FeaturesJobConfig, TINY, [
        f"storage.root={root}", "tracking.enabled=false", f"data.records={json.dumps(records)}",
        f"data.image_root={os.path.dirname(records[0])}", f"features.shard_size={shard_size}",
        "features.batch_size=4", *extra])


def _assert_whole(out: str, num_images: int, shard_size: int) -> FeatureStore:
    """Every image exactly once; every shard readable, holding its planned keys, of the manifest's size."""
    store = FeatureStore.open(out)
    planned = plan_shards([f"images/train/{i:05d}.png" for i in range(num_images)], shard_size)
    assert Counter(store.keys()) == Counter(k for keys in planned for k in keys)
    assert store.counts["images_in"] == store.counts["features_out"] == num_images
    assert [e["file"] for e in store.manifest["shards"]] == [shard_name(i) for i in range(len(planned))]
    for i, entry in enumerate(store.manifest["shards"]):
        problem, _ = shard_problem(storage.join(out, entry["file"]), planned[i], store.manifest["fingerprint_id"],
                                   size=entry["bytes"])
        assert problem is None, (entry["file"], problem)
    return store


def _shards_on(endpoint: str, out: str) -> dict[str, str]:
    bucket, _, prefix = out[5:].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    got = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: o["ETag"] for o in got}


# ---------------------------------------------------------------------------------------------------- (d)


def test_feature_job_killed_mid_run_then_rerun(ray_local, s3_bucket, s3_server, tmp_path):
    num = 24
    root = f"{s3_bucket}/faults-d-{uuid.uuid4().hex[:6]}"
    data = synthetic.generate(str(tmp_path / "data"), seed=5, num_images=num, num_eval_images=0)
    overrides = [f"storage.root={root}", "tracking.enabled=false",
                 f"data.records={json.dumps([data['records']['captions']])}",
                 f"data.image_root={tmp_path / 'data'}", "features.shard_size=1", "features.batch_size=4",
                 f"ray.address={ray_local.get_runtime_context().gcs_address}"]
    cfg = load_config(FeaturesJobConfig, TINY, overrides)
    out = layout.features_output(cfg)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT)]))
    t0 = time.monotonic()
    job_log = tmp_path / "job.log"
    with open(job_log, "wb") as sink:
        job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "extract_features.py"), "--config", TINY,
                                *overrides], env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while time.monotonic() - t0 < 240 and job.poll() is None:
            if any(k.startswith("shard-") for k in _shards_on(s3_server, out)):
                break
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGKILL)  # the job's driver, mid-run: no cleanup of any kind
    finally:
        job.wait(30)
    before = _shards_on(s3_server, out)
    done = sorted(k for k in before if k.startswith("shard-"))
    assert "manifest.json" not in before and 0 < len(done) < num, (
        f"not killed mid-run: {sorted(before)}; the job said: {job_log.read_text()[-3000:]}")
    # what a writer without atomic uploads would leave after such a kill: a truncated shard
    victim = storage.join(out, done[0])
    whole = storage.read_bytes(victim)
    storage.write_bytes(victim, whole[: len(whole) // 3])
    truncated = _shards_on(s3_server, out)[done[0]]

    rerun = extract_features(cfg, lease_wait_s=30)  # takes over the dead run's lease at once (same host)
    _assert_whole(out, num, 1)
    after = _shards_on(s3_server, out)
    assert after[done[0]] != truncated and after[done[0]] == before[done[0]]  # recomputed, to the same bytes
    assert all(after[k] == before[k] for k in done[1:])  # finished shards untouched
    assert rerun["computed_shards"] + rerun["reused_shards"] == num
    assert num - len(done) + 1 >= rerun["computed_shards"] >= 1
    log.info("RELIABILITY (d): killed after %d/%d shards; rerun computed %d (1 of them truncated), reused %d; "
             "%d images once each, no truncated shard; %.1fs in all", len(done), num, rerun["computed_shards"],
             rerun["reused_shards"], num, time.monotonic() - t0)


# ---------------------------------------------------------------------------------------------------- (e)


def _moto(port: int, workdir: Path) -> subprocess.Popen:
    log_file = open(workdir / f"moto-{time.time():.0f}.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([str(services.BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    services.wait_http(f"http://127.0.0.1:{port}/moto-api/", proc=proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)


def test_s3_server_restarted_mid_write(ray_local, tmp_path):
    num, port = 16, services.free_port()
    url = f"http://127.0.0.1:{port}"
    server = _moto(port, tmp_path)
    try:
        services.create_bucket(url, "faults")
        data = synthetic.generate(str(tmp_path / "data"), seed=6, num_images=num, num_eval_images=0)
        cfg = _config("s3://faults/e", data, 1, f"storage.s3_endpoint_url={url}")
        storage.s3.configure_s3(url)
        out = layout.features_output(cfg)
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["summary"] = extract_features(cfg, lease_wait_s=30)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                # its text only: the traceback would keep the failed run's Ray Data actors (and CPUs) alive
                outcome["error"] = f"{type(exc).__name__}: {exc}"
                log.info("first run failed: %s", outcome["error"][:2000])

        t0 = time.monotonic()
        job = threading.Thread(target=run)
        job.start()
        while time.monotonic() - t0 < 180 and job.is_alive():
            if sum(k.startswith("shard-") for k in _shards_on(url, out)) >= 2:
                break
            time.sleep(0.1)
        written = sum(k.startswith("shard-") for k in _shards_on(url, out))
        _stop(server)  # the S3 server goes down mid-write ...
        down_at = time.monotonic()
        time.sleep(2.0)
        server = _moto(port, tmp_path)  # ... and comes back empty: moto held everything in memory
        services.create_bucket(url, "faults")
        outage = time.monotonic() - down_at
        job.join(240)
        assert not job.is_alive(), "the job hung after the S3 restart"
        gc.collect()  # the failed run's dataset and its actors
        first = outcome.get("error")
        if first is None:  # it retried through the outage: then its manifest must be true
            _assert_whole(out, num, 1)
        else:
            on_server = _shards_on(url, out)
            assert "manifest.json" not in on_server  # never a manifest over lost or partial shards
        rerun = extract_features(cfg, lease_wait_s=30)
        store = _assert_whole(out, num, 1)
        assert rerun["features_out"] == num and len(store.manifest["shards"]) == num
        log.info("RELIABILITY (e): S3 down %.1fs after %d/%d shards written; first run: %s; rerun computed %d "
                 "shards, %d images once each; %.1fs", outage, written, num,
                 f"failed clearly ({first.splitlines()[0][:300]})" if first else
                 "retried and completed", rerun["computed_shards"], num, time.monotonic() - t0)
    finally:
        _stop(server)
        storage.s3.configure_s3(None)


# ---------------------------------------------------------------------------------------------------- two runs


def test_two_concurrent_runs_build_the_store_once(ray_local, s3_bucket, tmp_path):
    num = 8
    data = synthetic.generate(str(tmp_path / "data"), seed=7, num_images=num, num_eval_images=0)
    cfg = _config(f"{s3_bucket}/faults-2-{uuid.uuid4().hex[:6]}", data, 2)
    results: list = []

    def run() -> None:
        try:
            results.append(extract_features(cfg, lease_wait_s=120))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            results.append(exc)

    runs = [threading.Thread(target=run) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(240)
    assert all(isinstance(r, dict) for r in results), results
    # one run computed the store, the other waited for it and found it complete: no shard computed twice
    assert sorted(r["computed_shards"] for r in results) == [0, num // 2]
    _assert_whole(results[0]["output"], num, 2)
    assert not storage.exists(storage.join(results[0]["output"], "lease.json"))
    assert shard_name(0) in _shards_on(os.environ["AWS_ENDPOINT_URL"], results[0]["output"])
