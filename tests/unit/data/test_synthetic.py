"""The deterministic synthetic shapes dataset."""

from __future__ import annotations

from vitune import storage
from vitune.data import synthetic


def test_synthetic_is_deterministic_and_valid(tmp_path):
    from vitune.data.records import validate_record

    a = synthetic.generate(str(tmp_path / "a"), seed=3, num_images=12, num_eval_images=4)
    b = synthetic.generate(str(tmp_path / "b"), seed=3, num_images=12, num_eval_images=4)
    c = synthetic.generate(str(tmp_path / "c"), seed=4, num_images=12, num_eval_images=4)
    for name in ("captions", "instruct", "eval"):
        assert storage.read_bytes(a["records"][name]) == storage.read_bytes(b["records"][name])
        for rec in storage.read_json(a["records"][name]):
            validate_record(rec)
    imgs_a = [storage.read_bytes(u) for u in storage.list_files(str(tmp_path / "a" / "images"))]
    imgs_b = [storage.read_bytes(u) for u in storage.list_files(str(tmp_path / "b" / "images"))]
    assert imgs_a == imgs_b and len(imgs_a) == 16
    assert storage.read_bytes(a["records"]["instruct"]) != storage.read_bytes(c["records"]["instruct"])
    evals = storage.read_json(a["records"]["eval"])
    assert {r["kind"] for r in evals} == set(synthetic.CHECKABLE_KINDS)
    assert all(r["conversations"][1]["value"] == r["answer"] for r in evals)
