"""Storage by URI: local round trips, JSON Lines, refused schemes (S3: tests/integration/test_storage_s3.py)."""

from __future__ import annotations

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
