"""Storage against the real S3-compatible server fixture over HTTP: round trips, aborted multipart uploads,
download keys that escape, conditional writes and the feature store's lease between two writers."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.unit.test_storage import _roundtrip
from vitune import storage
from vitune.data import synthetic
from vitune.features.lease import LEASE_FILE, StoreBusy, StoreLease


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


def _client(s3_server):
    return boto3.client("s3", endpoint_url=s3_server)


def test_failed_multipart_upload_is_aborted(s3_bucket, s3_server, monkeypatch):
    bucket, s3 = s3_bucket[5:], _client(s3_server)
    # parts of 1 MiB: the server refuses to complete the upload (parts but the last must be >= 5 MiB)
    monkeypatch.setattr(storage.s3, "MULTIPART_THRESHOLD", 2**20)
    monkeypatch.setattr(storage.s3, "MULTIPART_PART_SIZE", 2**20)
    with pytest.raises(ClientError, match="EntityTooSmall"):
        storage.write_bytes(f"{s3_bucket}/multipart/bad.bin", b"x" * (2 * 2**20 + 512))
    assert not storage.exists(f"{s3_bucket}/multipart/bad.bin")  # no truncated object
    pending = s3.list_multipart_uploads(Bucket=bucket, Prefix="multipart/").get("Uploads", [])
    assert pending == []  # and no orphaned parts
    monkeypatch.setattr(storage.s3, "MULTIPART_PART_SIZE", 5 * 2**20)
    data = os.urandom(11 * 2**20)
    storage.write_bytes(f"{s3_bucket}/multipart/good.bin", data)  # three parts
    assert storage.read_bytes(f"{s3_bucket}/multipart/good.bin") == data


def test_download_refuses_a_key_that_escapes(s3_bucket, s3_server, tmp_path):
    bucket, s3 = s3_bucket[5:], _client(s3_server)
    s3.put_object(Bucket=bucket, Key="escape/ok.txt", Body=b"fine")
    s3.put_object(Bucket=bucket, Key="escape/../../outside.txt", Body=b"evil")
    with pytest.raises(ValueError, match="escapes the target folder"):
        storage.download_dir(f"{s3_bucket}/escape", tmp_path / "down")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "down" / "ok.txt").exists()


def test_s3_conditional_writes(s3_bucket):
    uri = f"{s3_bucket}/conditional/lease.json"
    v1 = storage.create_if_absent(uri, b"one")
    assert v1 and storage.create_if_absent(uri, b"two") is None  # If-None-Match: *
    assert storage.replace_if_match(uri, b"three", '"stale"') is None  # If-Match
    v3 = storage.replace_if_match(uri, b"three", v1)
    assert storage.read_versioned(uri) == (b"three", v3)
    assert not storage.delete_if_match(uri, v1) and storage.delete_if_match(uri, v3)
    assert storage.read_versioned(uri) is None


def test_s3_lease_one_writer_at_a_time(s3_bucket):
    store = f"{s3_bucket}/lease-{uuid.uuid4().hex[:6]}"
    held, order = threading.Event(), []

    def second() -> None:
        held.wait(10)
        with StoreLease(store, wait_s=20) as lease:
            order.append(("second", lease.waited_s))

    t = threading.Thread(target=second)
    t.start()
    with StoreLease(store, wait_s=0):
        held.set()
        with pytest.raises(StoreBusy, match="being written by another run"):
            StoreLease(store, wait_s=0).acquire()
        time.sleep(2)
        order.append(("first", 0.0))
    t.join(30)
    assert [name for name, _ in order] == ["first", "second"] and order[1][1] > 1.0
    assert not storage.exists(f"{store}/{LEASE_FILE}")  # released


def test_s3_stale_lease_is_taken_over(s3_bucket):
    store = f"{s3_bucket}/lease-{uuid.uuid4().hex[:6]}"
    dead = {"run": "dead", "host": socket.gethostname(), "pid": 2**22 + 7, "expires": time.time() + 3600}
    storage.write_bytes(f"{store}/{LEASE_FILE}", json.dumps(dead).encode())  # a killed run on this host
    with StoreLease(store, wait_s=0) as lease:
        assert json.loads(storage.read_bytes(f"{store}/{LEASE_FILE}"))["run"] == lease.holder["run"]
    expired = {"run": "gone", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}
    storage.write_bytes(f"{store}/{LEASE_FILE}", json.dumps(expired).encode())  # a holder that stopped renewing
    with StoreLease(store, wait_s=0):
        pass
    live = {"run": "live", "host": "elsewhere", "pid": 1, "expires": time.time() + 3600}
    storage.write_bytes(f"{store}/{LEASE_FILE}", json.dumps(live).encode())
    with pytest.raises(StoreBusy, match="run live on elsewhere"):
        StoreLease(store, wait_s=0).acquire()
