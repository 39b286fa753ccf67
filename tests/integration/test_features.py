"""The feature job on local Ray against the S3 server: parity with the vision tower, quarantine, resume, no-op.

One store is built per module the way a killed job would leave it: the job entrypoint dies after one shard
(``VITUNE_FAIL_AFTER_SHARDS=1``), then the library finishes it. The tests then read it back over HTTP.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
import zlib
from collections import Counter

import boto3
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from jobs import extract_features as job
from vitune import layout, storage
from vitune.config import FeaturesJobConfig, TrainJobConfig, VisionConfig, load_config
from vitune.data import synthetic
from vitune.data.records import read_records
from vitune.features.extract import FAIL_AFTER_ENV, SimulatedInterruption, extract_features
from vitune.features.store import MANIFEST, FeatureStore
from vitune.model.image import decode_image
from vitune.model.vision import encode_images, load_vision_tower
from vitune.pipeline import run_pipeline
from vitune.vision_recipe import FingerprintMismatch, fingerprint_id

pytestmark = pytest.mark.integration

TINY = "tiny"
NUM_GOOD = 20
SHARD_SIZE = 8
# named so that sorting spreads them over the three shards of 8 (``-`` sorts before ``.``)
BROKEN = {
    "images/train/00002-missing.png": None,  # referenced, never written
    "images/train/00009-garbage.png": b"this is not an image at all" * 10,
    "images/train/00014-empty.png": b"",
    "images/train/00018-huge.png": "huge",
}
EXPECTED_REASON = {
    "images/train/00002-missing.png": "missing file",
    "images/train/00009-garbage.png": "not a recognised image format",
    "images/train/00014-empty.png": "empty image bytes",
    "images/train/00018-huge.png": "too large",
}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data worth decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def objects(prefix_uri: str) -> dict[str, tuple[str, object]]:
    """``{key: (etag, last_modified)}`` of every object under an s3:// prefix, straight from the server."""
    bucket, _, prefix = prefix_uri[5:].partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1:]] = (obj["ETag"], obj["LastModified"])
    return out


@pytest.fixture(scope="module")
def built(ray_local, s3_bucket):
    root = f"{s3_bucket}/features-{uuid.uuid4().hex[:8]}"
    data = synthetic.generate(f"{root}/data", seed=3, num_images=NUM_GOOD, num_eval_images=0)
    for key, content in BROKEN.items():
        if content == "huge":
            content = png_header(100_000, 100_000)
        if content is not None:
            storage.write_bytes(f"{root}/data/{key}", content)
    broken_records = [{"id": f"broken-{i}", "image": key,
                       "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                         {"from": "gpt", "value": "Nothing."}]}
                      for i, key in enumerate(BROKEN)]
    storage.write_text(f"{root}/data/broken.json", json.dumps(broken_records))
    records = [data["records"]["captions"], data["records"]["instruct"], f"{root}/data/broken.json"]
    overrides = [f"storage.root={root}", "tracking.enabled=false", f"data.records={json.dumps(records)}",
                 f"data.image_root={root}/data", f"features.shard_size={SHARD_SIZE}", "features.batch_size=3"]
    cfg = load_config(FeaturesJobConfig, TINY, overrides)

    # 1. the job entrypoint, killed after one shard
    os.environ[FAIL_AFTER_ENV] = "1"
    try:
        with pytest.raises(SimulatedInterruption):
            job.main(["--config", TINY, *overrides])
    finally:
        os.environ.pop(FAIL_AFTER_ENV)
    tower = load_vision_tower(cfg.model.vision)
    out = layout.features_output(cfg, fingerprint_id(tower.fingerprint()))
    after_kill = objects(out)
    time.sleep(1.1)  # S3 LastModified has one-second resolution: a rewrite would show

    # 2. the library finishes the store
    resumed = extract_features(cfg)
    assert resumed["output"] == out
    after_resume = objects(out)
    return {"root": root, "data": data, "records": records, "cfg": cfg, "overrides": overrides, "tower": tower,
            "tower_id": fingerprint_id(tower.fingerprint()), "out": out, "after_kill": after_kill,
            "resumed": resumed, "after_resume": after_resume}


def test_store_is_where_the_layout_says_without_loading_a_tower(built):
    # training finds the store from its own config: the same path, derived from the config alone
    assert built["out"] == layout.features_output(built["cfg"]) == f"{built['root']}/features/{built['tower_id']}"
    train = load_config(TrainJobConfig, TINY, built["overrides"])
    assert layout.features_input(train) == built["out"]


def test_interrupted_run_resumes_without_recomputing(built):
    after_kill, after_resume, resumed = built["after_kill"], built["after_resume"], built["resumed"]
    assert sorted(after_kill) == ["errors/shard-00000.jsonl", "plan.json", "shard-00000.parquet"]  # no manifest
    assert resumed["shards"] == 3 and resumed["computed_shards"] == 2 and resumed["reused_shards"] == 1
    for key in after_kill:  # finished shard, its errors and the plan: untouched by the resumed run
        assert after_resume[key] == after_kill[key], key
    assert {"shard-00001.parquet", "shard-00002.parquet", MANIFEST} <= set(after_resume)


def test_counts_and_no_duplicate_keys(built):
    store = FeatureStore.open(built["out"])
    good = {f"images/train/{i:05d}.png" for i in range(NUM_GOOD)}
    keys = store.keys()
    assert Counter(keys) == Counter(good)  # every good image exactly once
    counts = store.counts
    assert counts["images_in"] == NUM_GOOD + len(BROKEN) == counts["features_out"] + counts["quarantined"]
    assert (counts["features_out"], counts["quarantined"]) == (NUM_GOOD, len(BROKEN))
    assert built["resumed"]["images_in"] == counts["images_in"]
    assert store.manifest["schema"]["shape"] == [store.num_patches, store.hidden_size] == [16, 64]
    assert store.manifest["last_run"]["preprocessed_in_actor"] == 0  # decode ran in CPU tasks, not the actors


def test_features_equal_encode_images(built):
    store = FeatureStore.open(built["out"])
    tower = built["tower"]
    got = store.get(store.keys())
    assert len(got) == NUM_GOOD
    for key, feats in got.items():
        image = decode_image(storage.read_bytes(f"{built['root']}/data/{key}"))
        want = encode_images(tower, [image])[0].numpy()  # [N, D]
        assert feats.dtype == np.float16 and feats.shape == want.shape
        np.testing.assert_allclose(feats.astype(np.float32), want, rtol=2e-3, atol=2e-3, err_msg=key)


def test_broken_images_are_quarantined_with_reasons(built):
    store = FeatureStore.open(built["out"])
    errors = {e["image_key"]: e for e in store.errors()}
    assert set(errors) == set(BROKEN)
    for key, reason in EXPECTED_REASON.items():
        assert reason in errors[key]["reason"], errors[key]
    # the errors dataset is plain JSONL on the server, one file per shard that had any
    files = sorted(k for k in objects(built["out"]) if k.startswith("errors/"))
    assert files == ["errors/shard-00000.jsonl", "errors/shard-00001.jsonl", "errors/shard-00002.jsonl"]
    assert not set(store.get(BROKEN))


def test_rerun_is_a_noop(built, capsys):
    time.sleep(1.1)
    assert job.main(["--config", TINY, *built["overrides"]]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the job's JSON summary
    assert printed["output"] == built["out"] and printed["computed_shards"] == 0
    assert objects(built["out"]) == built["after_resume"]  # no file written, not even the manifest
    summary = extract_features(built["cfg"])
    assert summary["computed_shards"] == 0 and summary["features_out"] == NUM_GOOD


def test_pipeline_features_step_is_its_own_run_under_the_parent(built, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = run_pipeline(TINY, [*built["overrides"], "tracking.enabled=true", f"tracking.uri={uri}",
                              "tracking.experiment=t-features"], steps=["features"])
    assert [(s["step"], s["skipped"]) for s in res["steps"]] == [("features", True)]  # the store is complete
    client = MlflowClient(uri)
    parent = client.get_run(res["mlflow_parent_run_id"])
    child = client.get_run(res["features"]["run_id"])
    assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
    assert child.info.run_name == "extract_features" and child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["vitune.features.extract"] == built["out"]
    assert child.data.metrics["features_out"] == NUM_GOOD and child.data.metrics["computed_shards"] == 0
    assert {a.path for a in client.list_artifacts(child.info.run_id, "features")} == {
        "features/summary.json", "features/manifest.json"}


def test_changed_plan_is_refused(built):
    cfg = load_config(FeaturesJobConfig, TINY, [*built["overrides"], "features.shard_size=5"])
    with pytest.raises(ValueError, match="shard_size: this run has 5, the store has 8"):
        extract_features(cfg)


def test_reader_refuses_other_fingerprint(built):
    other = load_vision_tower(VisionConfig(feature_layer=-1)).fingerprint()
    with pytest.raises(FingerprintMismatch, match=r"feature_layer: expected -1, found -2") as err:
        FeatureStore.open(built["out"], expect_fingerprint=other)
    assert [d[0] for d in err.value.diffs] == ["feature_layer"]
    with pytest.raises(FingerprintMismatch, match=r"image_size: expected 336, found 32"):
        FeatureStore.open(built["out"], expect_fingerprint={**built["tower"].fingerprint(), "image_size": 336})
    assert FeatureStore.open(built["out"], expect_fingerprint=built["tower"].fingerprint()).feature_dim == 64


def test_join_records_and_ray_dataset(built):
    store = FeatureStore.open(built["out"])
    records = [r for uri in built["records"] for r in read_records(uri)]
    pairs = list(store.join_records(records))
    by_image = Counter(r.image for r in records if r.image not in BROKEN)
    assert Counter(r.image for r, _ in pairs) == by_image  # every record with features, once each
    expected = store.get(by_image)
    for record, feats in pairs:
        assert np.array_equal(feats, expected[record.image])
    batch = store.to_ray_dataset().take_batch(100)
    assert batch["features"].shape == (NUM_GOOD, 16, 64)
    assert sorted(batch["image_key"]) == sorted(store.keys())
