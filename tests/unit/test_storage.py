"""Storage by URI: local round trips, JSON Lines, refused schemes, atomic writes under concurrency, download keys
that escape their folder, conditional writes (S3: tests/integration/test_storage_s3.py)."""

from __future__ import annotations

import os
import threading

import pyarrow as pa
import pytest

from vitune import storage


def test_local_storage_roundtrip(tmp_path):
    _roundtrip(str(tmp_path / "store"))


def _roundtrip(base: str) -> None:
    storage.write_bytes(storage.join(base, "a", "b.bin"), b"\x00\x01bytes")
    assert storage.read_bytes(storage.join(base, "a", "b.bin")) == b"\x00\x01bytes"
    storage.write_json(storage.join(base, "x.json"), {"k": [1, 2, "ü"]})
    assert storage.read_json(storage.join(base, "x.json")) == {"k": [1, 2, "ü"]}
    table = pa.table({"key": ["a", "b"], "v": [1.5, 2.5]})
    storage.write_parquet(table, storage.join(base, "t", "p.parquet"))
    assert storage.read_parquet(storage.join(base, "t", "p.parquet")).equals(table)
    assert storage.exists(storage.join(base, "x.json"))
    assert not storage.exists(storage.join(base, "missing.json"))
    files = storage.list_files(base)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["b.bin", "p.parquet", "x.json"]
    assert storage.list_files(storage.join(base, "nothing-here")) == []
    storage.delete(storage.join(base, "t"))
    assert not storage.exists(storage.join(base, "t", "p.parquet"))


def test_jsonl_roundtrip_and_bad_line(tmp_path):
    uri = str(tmp_path / "rows.jsonl")
    rows = [{"id": 1, "text": "ü"}, {"id": 2, "path": tmp_path}]  # a value JSON cannot hold is written as text
    storage.write_jsonl(uri, rows)
    assert storage.read_text(uri) == f'{{"id": 1, "text": "ü"}}\n{{"id": 2, "path": "{tmp_path}"}}\n'
    assert storage.read_jsonl(uri) == [{"id": 1, "text": "ü"}, {"id": 2, "path": str(tmp_path)}]
    storage.write_text(uri, '{"id": 1}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"rows.jsonl line 3: not JSON"):
        storage.read_jsonl(uri)


def test_storage_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="gs"):
        storage.resolve("gs://bucket/x")


def test_concurrent_local_writers_never_share_a_temp_file(tmp_path):
    # eight writers of one path in one process (the pid-named temp file of old was shared by all of them):
    # every write succeeds and the file always holds one writer's whole payload
    target = str(tmp_path / "shared.bin")
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for _ in range(25):
                storage.write_bytes(target, payloads[i])
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if os.path.exists(target):
            data = storage.read_bytes(target)
            assert data in payloads, f"torn file of {len(data)} bytes"
    for t in threads:
        t.join()
    assert errors == []
    assert storage.read_bytes(target) in payloads
    assert os.listdir(tmp_path) == ["shared.bin"]  # no temp file left behind


def test_failed_local_write_leaves_old_content_and_no_temp_file(tmp_path):
    target = str(tmp_path / "data.json")
    storage.write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        storage.write_bytes(target, object())  # fails after the temp file was opened
    assert storage.read_json(target) == {"v": 1}
    assert os.listdir(tmp_path) == ["data.json"]


@pytest.mark.parametrize("key", ["../evil.txt", "a/../../evil.txt", "/etc/passwd", "a/..", "..\\evil.txt",
                                 "C:/evil.txt"])
def test_download_target_refuses_keys_that_escape(tmp_path, key):
    with pytest.raises(ValueError, match="escapes|outside"):
        storage.safe_target(tmp_path / "down", key)


def test_download_target_keeps_plain_keys_inside(tmp_path):
    root = tmp_path / "down"
    assert storage.safe_target(root, "a/b/c.txt") == (root / "a" / "b" / "c.txt").resolve()
    assert storage.safe_target(root, "./a//b.txt") == (root / "a" / "b.txt").resolve()
    assert storage.safe_target(root, "a..b/c..txt") == (root / "a..b" / "c..txt").resolve()


def test_local_conditional_writes(tmp_path):
    uri = str(tmp_path / "lease.json")
    v1 = storage.create_if_absent(uri, b"one")
    assert v1 is not None and storage.create_if_absent(uri, b"two") is None
    assert storage.read_versioned(uri) == (b"one", v1)
    assert storage.replace_if_match(uri, b"three", "stale") is None
    v3 = storage.replace_if_match(uri, b"three", v1)
    assert v3 is not None and storage.read_bytes(uri) == b"three"
    assert not storage.delete_if_match(uri, v1)
    assert storage.delete_if_match(uri, v3) and not storage.exists(uri)
    assert storage.read_versioned(uri) is None
