"""`vitune.family.model_family`: tower + LM + aspect mode from a config, torch-free."""

from __future__ import annotations

import pytest

from vitune.config import TrainJobConfig, load_config
from vitune.family import lm_family, model_family, tower_family


@pytest.mark.parametrize(("preset", "family"), [
    ("tiny", "clip + llama, pad"),
    ("tiny-anyres", "clip + llama, anyres"),
    ("tiny-onevision", "siglip + qwen2, anyres_max_4"),
    ("llava-v1.6-vicuna-7b", "clip + llama, anyres"),
    ("llava-onevision-qwen2-7b", "siglip + qwen2, anyres_max_9"),
    ("llava-onevision-qwen2-0.5b", "siglip + qwen2, anyres_max_9"),
])
def test_presets_name_their_family(preset, family):
    cfg = load_config(TrainJobConfig, preset, ["stage=finetune"])
    assert model_family(cfg.model) == family
    assert model_family(cfg.model.model_dump(mode="json")) == family  # a model folder's meta["model"]


@pytest.mark.parametrize(("lm", "family"), [
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2"), ("Qwen/Qwen2-0.5B", "qwen2"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3"), ("meta-llama/Llama-3-8B", "llama-3"),
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistral"), ("lmsys/vicuna-7b-v1.5", "llama"),
    ("meta-llama/Llama-2-7b-chat-hf", "llama"), ("tiny", "llama"), ("tiny-qwen2", "qwen2"),
])
def test_lm_family_from_names(lm, family):
    assert lm_family(lm) == family


def test_unnamed_lm_falls_back_to_its_model_type():
    assert lm_family("/ckpt/my-model") == "unknown"
    assert lm_family("/ckpt/my-model", "gemma2") == "gemma2"
    assert tower_family("ViT-SO400M-14-SigLIP-384") == "siglip" and tower_family("ViT-L-14-336") == "clip"
