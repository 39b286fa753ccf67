"""The serving engine loads a tiny-onevision folder (tiny SigLIP, tiny-qwen2, anyres_max) and ends a reply at
qwen_1_5's <|im_end|>, which is not the tokenizer's EOS."""

from __future__ import annotations

import asyncio

import torch
from PIL import Image
from torch import nn

from vitune.config import ServeConfig, TrainJobConfig, load_config
from vitune.data.tokenizer import load_tokenizer
from vitune.model.folder import save_model_folder
from vitune.model.vision import load_vision_tower
from vitune.model.vlm import build_model
from vitune.serve.engine import ServingEngine
from vitune.serve.request import ChatRequest
from vitune.vision_recipe import model_recipe


def test_engine_serves_a_tiny_onevision_folder_and_stops_at_im_end(tmp_path):
    cfg = load_config(TrainJobConfig, "tiny-onevision", ["stage=finetune"]).model
    tokenizer = load_tokenizer(cfg.lm)
    tower = load_vision_tower(cfg.vision, recipe=model_recipe(cfg.vision))
    model = build_model(cfg, tokenizer, tower.hidden_size, recipe=tower.recipe)
    folder = save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(tmp_path / "m"))
    engine = ServingEngine.from_config(ServeConfig(model=folder, warmup=False))
    try:
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert engine.template_name == "qwen_1_5" and im_end != tokenizer.eos_token_id
        chat = ChatRequest(turns=[{"from": "human", "value": "<image>\nWhat color?"}],
                           images=[Image.new("RGB", (64, 32), (200, 30, 30))], max_tokens=6)
        free = asyncio.run(engine.complete(chat))
        assert free["type"] == "result" and free["completion_tokens"] >= 1
        # an LM whose every next token is <|im_end|>: the reply ends there, empty, as a stop (not at max_tokens)
        lm = engine.model.lm
        head = nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(-10.0)
            head.bias[im_end] = 10.0
        lm.lm_head = head
        stopped = asyncio.run(engine.complete(chat))
        assert stopped["type"] == "result" and stopped["finish_reason"] == "stop", stopped
        assert stopped["text"] == "" and "<|im_end|>" not in stopped["text"]
    finally:
        engine.close()
