"""Storage round-trips against the real S3-compatible server fixture over HTTP."""

from __future__ import annotations

import boto3

from tests.unit.test_storage import _roundtrip
from vitune import storage
from vitune.data import synthetic


def test_s3_roundtrip(s3_bucket, s3_server):
    base = f"{s3_bucket}/roundtrip"
    _roundtrip(base)
    # the bytes really are on the server: read back with a plain boto3 client
    storage.write_bytes(f"{base}/direct.txt", b"hello")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    assert s3.get_object(Bucket=s3_bucket[5:], Key="roundtrip/direct.txt")["Body"].read() == b"hello"


def test_synthetic_to_s3(s3_bucket, tmp_path):
    out = synthetic.generate(f"{s3_bucket}/synth", seed=1, num_images=4, num_eval_images=2)
    local = synthetic.generate(str(tmp_path / "synth"), seed=1, num_images=4, num_eval_images=2)
    assert storage.read_bytes(out["records"]["instruct"]) == storage.read_bytes(local["records"]["instruct"])
    assert len(storage.list_files(f"{s3_bucket}/synth/images", suffix=".png")) == 6
    got = storage.download_dir(f"{s3_bucket}/synth", tmp_path / "down")
    assert (got / "images" / "train" / "00000.png").read_bytes() == (
        tmp_path / "synth" / "images" / "train" / "00000.png"
    ).read_bytes()
