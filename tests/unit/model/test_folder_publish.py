"""Model folders are published whole: a save that fails half-way leaves the previous folder loadable and
unchanged, and a folder whose files differ from its marker's list is refused (never loaded half-written)."""

from __future__ import annotations

import os

import pytest
import torch

from vitune.config import ModelConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model.folder import META_FILE, PROJECTOR_FILE, load_model_folder, read_meta, save_model_folder
from vitune.model.vision import load_vision_tower
from vitune.model.vlm import build_model


class DiskFullTokenizer:
    """A tokenizer whose save fails part-way, as a full disk or a killed writer would leave it."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        raise OSError(28, "No space left on device")


@pytest.fixture(scope="module")
def parts():
    cfg = ModelConfig()
    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(cfg.vision)
    torch.manual_seed(0)
    first = build_model(cfg, tokenizer, tower.hidden_size)
    torch.manual_seed(1)
    second = build_model(cfg, tokenizer, tower.hidden_size)
    return cfg, tokenizer, tower.fingerprint(), first, second


def _projector(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.projector.state_dict().items()}


def test_failed_save_leaves_the_published_folder_whole(parts, tmp_path):
    cfg, tokenizer, fp, first, second = parts
    folder = str(tmp_path / "train" / "model")
    save_model_folder(first, tokenizer, cfg, fp, folder)
    assert set(read_meta(folder)["files"]) >= {PROJECTOR_FILE, "lm/config.json"}
    with pytest.raises(OSError, match="No space left"):
        save_model_folder(second, DiskFullTokenizer(tokenizer), cfg, fp, folder)
    loaded, _, _ = load_model_folder(folder)
    for name, want in _projector(first).items():  # the first model, not a mix with the second's projector
        assert torch.equal(loaded.projector.state_dict()[name], want), name
    assert sorted(os.listdir(tmp_path / "train")) == ["model"]  # no staging folder left behind
    save_model_folder(second, tokenizer, cfg, fp, folder)  # a replace that succeeds publishes the second
    loaded, _, _ = load_model_folder(folder)
    for name, want in _projector(second).items():
        assert torch.equal(loaded.projector.state_dict()[name], want), name
    assert sorted(os.listdir(tmp_path / "train")) == ["model"]


def test_folder_whose_files_differ_from_its_marker_is_refused(parts, tmp_path):
    cfg, tokenizer, fp, first, _ = parts
    folder = tmp_path / "model"
    save_model_folder(first, tokenizer, cfg, fp, str(folder))
    data = (folder / PROJECTOR_FILE).read_bytes()
    (folder / PROJECTOR_FILE).write_bytes(data[: len(data) // 2])  # as a half-finished copy would leave it
    with pytest.raises(RuntimeError, match=rf"incomplete \({PROJECTOR_FILE}: \d+ bytes, its {META_FILE} lists"):
        load_model_folder(str(folder))
