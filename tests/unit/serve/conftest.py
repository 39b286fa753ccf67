"""The model the vLLM path serves: the tiny preset's finetuned model, exported as `vitune export` writes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitune.config import TrainJobConfig, load_config

from .tiny_models import export_tiny


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    cfg = load_config(TrainJobConfig, "tiny", ["stage=finetune"]).model
    return export_tiny(tmp_path_factory.mktemp("export"), "llava-hf", cfg)
