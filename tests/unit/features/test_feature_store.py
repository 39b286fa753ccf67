"""Feature store format and reader without Ray: shards, manifest, lookups, joins, fingerprints, pool sizing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vitune import storage
from vitune.config import FeaturesJobConfig, build_config
from vitune.features.encode import pool_size
from vitune.features.extract import key_set_hash, plan_shards
from vitune.features.store import (
    PLAN,
    FeatureStore,
    features_to_numpy,
    shard_name,
    shard_problem,
    shard_table,
    write_manifest,
    write_shard,
)
from vitune.vision_recipe import FingerprintMismatch

N, D = 4, 3
FP = {"tower": "t", "pretrained": None, "feature_layer": -2, "select": "patch", "image_size": 16,
      "image_mode": "pad", "num_patches": N, "hidden_size": D, "open_clip_version": "1", "torch_version": "2"}


def feats_for(key: str) -> np.ndarray:
    seed = sum(key.encode())
    return np.random.default_rng(seed).standard_normal((N, D)).astype(np.float16)  # [N, D]


def build_store(root, keys: list[str], shard_size: int, bad: frozenset[str] = frozenset()) -> str:
    out = str(root / "store")
    shards = plan_shards(sorted(keys), shard_size)
    for i, shard_keys in enumerate(shards):
        good = [k for k in shard_keys if k not in bad]
        feats = np.stack([feats_for(k) for k in good]) if good else np.empty((0, N, D), np.float16)
        if len(good) < len(shard_keys):
            storage.write_jsonl(storage.join(out, f"errors/shard-{i:05d}.jsonl"),
                                [{"image_key": k, "reason": "broken", "shard": i} for k in shard_keys if k in bad])
        write_shard(storage.join(out, shard_name(i)),
                    shard_table(good, feats, {"shard": i, "quarantined": len(shard_keys) - len(good)}))
    write_manifest(out, shards, FP, (N, D))
    return out


def test_roundtrip_get_keys_and_errors(tmp_path):
    keys = [f"img/{i:03d}.png" for i in range(10)]
    bad = frozenset({"img/003.png", "img/004.png", "img/005.png"})  # shard 1 of 3 is all bad
    store = FeatureStore.open(build_store(tmp_path, keys, 3, bad))
    assert store.keys() == [k for k in keys if k not in bad]
    assert store.counts["images_in"] == 10 and store.counts["quarantined"] == 3 and len(store) == 7
    got = store.get(["img/009.png", "img/000.png", "img/004.png", "nope.png", "img/0035.png"])
    assert set(got) == {"img/009.png", "img/000.png"}
    np.testing.assert_array_equal(got["img/009.png"], feats_for("img/009.png"))
    assert sorted(e["image_key"] for e in store.errors()) == sorted(bad)
    tables = list(store.iter_shards())
    assert [t.num_rows for t in tables] == [3, 0, 3, 1]
    assert isinstance(tables[0].schema.field("features").type, pa.FixedShapeTensorType)
    assert [a.shape for _, a in store.iter_arrays()] == [(3, N, D), (0, N, D), (3, N, D), (1, N, D)]


def test_join_records_by_mapping_and_objects(tmp_path):
    keys = [f"k{i}" for i in range(5)]
    store = FeatureStore.open(build_store(tmp_path, keys, 2, frozenset({"k1"})))

    class Rec:
        def __init__(self, rid, image):
            self.id, self.image = rid, image

    recs = [Rec("a", "k4"), Rec("b", "k0"), Rec("c", "k4"), Rec("d", None), Rec("e", "k1"), Rec("f", "zz")]
    pairs = list(store.join_records(recs))
    assert [r.id for r, _ in pairs] == ["b", "a", "c"]  # store order, both records of k4
    for r, f in pairs:
        np.testing.assert_array_equal(f, feats_for(r.image))
    assert [r for r, _ in store.join_records({"k2": ["x"], "k1": ["y"]})] == ["x"]


def test_flat_tensor_columns_are_reshaped(tmp_path):
    feats = np.stack([feats_for("a"), feats_for("b")])  # [2, N, D]
    flat = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), N * D)
    var = pa.array([f.reshape(-1) for f in feats], type=pa.list_(pa.float16()))
    for column in (flat, var):
        np.testing.assert_array_equal(features_to_numpy(column, N, D), feats)
    with pytest.raises(ValueError, match="expected 2x5x3"):
        features_to_numpy(flat, 5, D)
    # a shard written with a plain list column reads back as a fixed-shape tensor
    out = build_store(tmp_path, ["a", "b"], 2)
    storage.write_parquet(pa.table({"image_key": ["a", "b"], "features": var}), storage.join(out, shard_name(0)))
    store = FeatureStore.open(out)
    table = next(store.iter_shards())
    assert isinstance(table.schema.field("features").type, pa.FixedShapeTensorType)
    np.testing.assert_array_equal(table.column("features").combine_chunks().to_numpy_ndarray(), feats)
    np.testing.assert_array_equal(store.get(["b"])["b"], feats_for("b"))


def test_fingerprint_mismatch_names_fields(tmp_path):
    out = build_store(tmp_path, ["a"], 1)
    with pytest.raises(FingerprintMismatch) as err:
        FeatureStore.open(out, expect_fingerprint={**FP, "select": "cls_patch", "image_size": 32})
    msg = str(err.value)
    assert "select: expected 'cls_patch', found 'patch'" in msg and "image_size: expected 32, found 16" in msg
    assert [d[0] for d in err.value.diffs] == ["select", "image_size"]
    # versions are recorded, not compared
    assert FeatureStore.open(out, expect_fingerprint={**FP, "torch_version": "9"}).num_patches == N


def test_incomplete_store_is_refused(tmp_path):
    out = str(tmp_path / "half")
    storage.write_json(storage.join(out, PLAN), {"shard_size": 1})
    with pytest.raises(FileNotFoundError, match="interrupted"):
        FeatureStore.open(out)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        FeatureStore.open(str(tmp_path / "none"))


def test_manifest_checks_counts(tmp_path):
    out = build_store(tmp_path, ["a", "b", "c"], 2)
    with pytest.raises(RuntimeError, match="planned images"):
        write_manifest(out, [["a", "b"], ["c", "d"]], FP, (N, D))  # shard 1 holds 1 row, plan says 2


def test_manifest_refuses_shard_of_other_tower(tmp_path):
    out = build_store(tmp_path, ["a", "b"], 1)
    write_shard(storage.join(out, shard_name(1)),
                shard_table(["b"], feats_for("b")[None], {"shard": 1, "quarantined": 0, "fingerprint_id": "other"}))
    with pytest.raises(RuntimeError, match="written by tower other"):
        write_manifest(out, [["a"], ["b"]], FP, (N, D))


def test_plan_is_deterministic():
    keys = sorted(f"k{i:02d}" for i in range(7))
    assert plan_shards(keys, 3) == [["k00", "k01", "k02"], ["k03", "k04", "k05"], ["k06"]]
    assert key_set_hash(keys) == key_set_hash(list(keys)) != key_set_hash(keys[:-1])


@pytest.mark.parametrize(("overrides", "cluster", "shards", "want"), [
    ([], {"CPU": 16, "GPU": 4}, 100, (4, 1.0, None)),  # one actor per GPU
    ([], {"CPU": 16, "GPU": 4}, 2, (2, 1.0, None)),  # no more actors than shards
    ([], {"CPU": 8}, 100, (7, 0.0, 1)),  # CPUs minus one preprocessing slot
    ([], {"CPU": 2}, 100, (1, 0.0, 2)),  # a lone actor's threads use every core
    ([], {"CPU": 8}, 2, (2, 0.0, 4)),
    (["features.actor_cpus=2"], {"CPU": 8}, 100, (3, 0.0, 2)),
    (["features.num_actors=2"], {"CPU": 8}, 100, (2, 0.0, 4)),
])
def test_pool_size(overrides, cluster, shards, want):
    pool = pool_size(build_config(FeaturesJobConfig, {}, overrides), cluster, shards)
    assert (pool.num_actors, pool.gpus_per_actor, pool.threads) == want


def test_pool_is_sized_to_the_cpus_free_now():
    cfg = build_config(FeaturesJobConfig, {}, [])
    # 4 CPUs, 3 held by Serve replicas: one actor, leaving the preprocessing task a CPU once one frees up
    assert pool_size(cfg, {"CPU": 4}, 100, free={"CPU": 1}).num_actors == 1
    assert pool_size(cfg, {"CPU": 4}, 100, free={"CPU": 3}).num_actors == 2
    assert pool_size(cfg, {"CPU": 4}, 100, free={"CPU": 4}).num_actors == 3


def test_pool_that_starves_preprocessing_is_refused():
    cfg = build_config(FeaturesJobConfig, {}, ["features.num_actors=4"])
    with pytest.raises(ValueError, match="preprocessing could never run"):
        pool_size(cfg, {"CPU": 4}, 100)


def test_shard_reused_only_when_footer_rows_keys_and_size_match(tmp_path):
    from vitune.features.extract import reusable_shards
    from vitune.vision_recipe import fingerprint_id

    out = str(tmp_path / "store")
    fp_id = fingerprint_id(FP)
    shards = [["a", "b", "c"], ["d", "e"], ["f", "g"], ["h"]]
    sizes = [write_shard(storage.join(out, shard_name(i)), shard_table(
        keys, np.stack([feats_for(k) for k in keys]), {"shard": i, "fingerprint_id": fp_id, "quarantined": 0}))
        for i, keys in enumerate(shards)]
    good = storage.read_bytes(storage.join(out, shard_name(0)))
    storage.write_bytes(storage.join(out, shard_name(1)), good[: len(good) // 2])  # a truncated upload
    storage.write_bytes(storage.join(out, shard_name(2)), good)  # another shard's rows
    storage.delete(storage.join(out, shard_name(3)))
    keep = reusable_shards(out, shards, fp_id)
    assert sorted(keep) == [0] and keep[0]["rows"] == 3 and keep[0]["bytes"] == sizes[0]
    problem, _ = shard_problem(storage.join(out, shard_name(1)), shards[1], fp_id)
    assert problem.startswith("unreadable")
    problem, _ = shard_problem(storage.join(out, shard_name(2)), shards[2], fp_id)
    assert "3 rows + 0 quarantined != 2 planned" in problem
    problem, _ = shard_problem(storage.join(out, shard_name(0)), shards[0], fp_id, size=sizes[0] + 1)
    assert "bytes, the manifest says" in problem
    problem, _ = shard_problem(storage.join(out, shard_name(0)), ["x", "y", "z"], fp_id)
    assert "are not this shard's" in problem
    assert shard_problem(storage.join(out, shard_name(0)), shards[0], "other-tower")[0].startswith("written by")
