"""SigLIP-tower export: a vitune SigLIP + Qwen2 / Llama-3 model folder → llava-hf, loaded by transformers alone.

Three tiny random models (the tiny SigLIP tower, mlp2x_gelu, weights larger than the init):
- OneVision: SigLIP + a Qwen2-shaped LM (GQA, q/k/v biases, tied embeddings as Qwen2-0.5B), anyres_max_9, the
  qwen_1_5 (ChatML) template → `LlavaOnevisionForConditionalGeneration`;
- LLaVA-NeXT: the same LM with plain anyres → `LlavaNextForConditionalGeneration`;
- pad: SigLIP + a Llama-3-shaped LM with the llava_llama_3 template → `LlavaForConditionalGeneration`.
transformers reads only the exported folder (`AutoModelForImageTextToText`, `AutoProcessor` with the PIL image
backend); its processor's prompt, `<image>` expansion (no CLS counted) and pixels (mean/std 0.5) feed its model,
whose logits equal vitune's on five odd aspect ratios. The config names `SiglipVisionConfig`, the "full" select
strategy (nothing to drop) and vitune's feature layer; generation_config stops on the template's turn end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.data.real_tokenizers import chatml_tokenizer, llama3_tokenizer
from vitune.config import ModelConfig, VisionConfig
from vitune.data.masks import tokenize_generation_prompt
from vitune.model.export import export_llava_hf
from vitune.model.folder import save_model_folder
from vitune.model.vision import encode_image_tiles, load_vision_tower
from vitune.model.vlm import build_model
from vitune.vision_recipe import visual_tokens

TOWER = "vitune-tiny-siglip"
LOGITS_ATOL = 1e-4
PIXELS_ATOL = 1e-5
SIZES = [(1, 1), (10, 200), (200, 10), (333, 77), (400, 300)]  # (width, height)
# the tiny tower's 32 px tiles: LLaVA-1.6's grid for NeXT, OneVision's (1x1)..(6x6) for anyres_max_9
KINDS = {
    "onevision": ("qwen2", "qwen_1_5", VisionConfig(name=TOWER, image_aspect_ratio="anyres_max_9",
                                                    image_grid_pinpoints="(1x1),...,(6x6)")),
    "next": ("qwen2", "qwen_1_5", VisionConfig(name=TOWER, image_aspect_ratio="anyres",
                                               image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])),
    "pad": ("llama3", "llava_llama_3", VisionConfig(name=TOWER, image_aspect_ratio="pad")),
}
ARCHS = {"onevision": "LlavaOnevisionForConditionalGeneration", "next": "LlavaNextForConditionalGeneration",
         "pad": "LlavaForConditionalGeneration"}
TURN_ENDS = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}


def tiny_lm(kind: str, tokenizer: Any) -> torch.nn.Module:
    """A random Qwen2-0.5B-shaped (GQA, qkv bias, tied) or Llama-3-shaped LM over `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True, rope_theta=1e6,
                                            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")))
    return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, rope_theta=5e5,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


@dataclass
class Exported:
    kind: str
    cfg: ModelConfig
    model: Any
    tower: Any
    tokenizer: Any
    out: Path
    hf: Any
    loading: dict[str, list]
    processor: Any


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _export(tmp: Path, kind: str) -> Exported:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

    lm_kind, template, vision = KINDS[kind]
    tokenizer = chatml_tokenizer() if lm_kind == "qwen2" else llama3_tokenizer()
    cfg = ModelConfig(projector="mlp2x_gelu", vision=vision, template=template)
    tower = load_vision_tower(cfg.vision)
    model = build_model(cfg, tokenizer, tower.hidden_size, lm=tiny_lm(lm_kind, tokenizer),
                        recipe=tower.recipe if tower.recipe.image_mode == "anyres" else None).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than the 0.02 init, so a misplaced feature or newline moves the logits
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2, generator=gen)
        if model.image_newline is not None:
            model.image_newline.normal_(0.0, 1.0, generator=gen)
    save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(tmp / "vitune"))
    out = Path(export_llava_hf(str(tmp / "vitune"), str(tmp / "hf")))
    hf, loading = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    processor = AutoProcessor.from_pretrained(str(out))
    processor.image_processor = AutoImageProcessor.from_pretrained(str(out), backend="pil")  # vitune's resize
    return Exported(kind, cfg, model, tower, tokenizer, out, hf.eval(), loading, processor)


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, tmp_path_factory) -> Exported:
    return _export(tmp_path_factory.mktemp(f"siglip-{request.param}"), request.param)


def _vitune_ids(ex: Exported) -> list[int]:
    return tokenize_generation_prompt([{"from": "human", "value": "<image>\nWhat is in the picture?"}],
                                      ex.cfg.template, ex.tokenizer)


def _hf_inputs(ex: Exported, image: Image.Image) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    return ex.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")


def _vitune_logits(ex: Exported, image: Image.Image) -> torch.Tensor:
    kwargs = {"image_sizes": [image.size]} if ex.model.recipe is not None else {}
    with torch.no_grad():
        return ex.model(torch.tensor([_vitune_ids(ex)]), image_features=encode_image_tiles(ex.tower, [image]),
                        **kwargs).logits[0]


def _count(ex: Exported, width: int, height: int) -> int:
    recipe = ex.model.recipe or ex.tower.recipe
    return visual_tokens(recipe, width, height)


def test_the_folder_is_a_siglip_llava_transformers_loads_whole(exported: Exported) -> None:
    assert type(exported.hf).__name__ == ARCHS[exported.kind]
    assert {k: list(v) for k, v in exported.loading.items()} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    config = json.loads((exported.out / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["vision_feature_select_strategy"] == "full"  # SigLIP has no CLS to drop
    # headless, as llava-hf's OneVision configs: LLaVA reads a hidden state, never the MAP head
    assert config["vision_config"]["vision_use_head"] is False
    assert not any(".head." in name for name in exported.hf.state_dict())
    assert config["vision_feature_layer"] == exported.tower.feature_layer
    assert config["text_config"]["model_type"] == {"qwen2": "qwen2", "llama3": "llama"}[KINDS[exported.kind][0]]
    image_config = json.loads((exported.out / "preprocessor_config.json").read_text())
    assert image_config["image_mean"] == image_config["image_std"] == [0.5, 0.5, 0.5]


def test_generation_config_stops_on_the_templates_turn_end(exported: Exported) -> None:
    generation = json.loads((exported.out / "generation_config.json").read_text())
    stops = generation["eos_token_id"]
    stops = stops if isinstance(stops, list) else [stops]
    assert exported.tokenizer.convert_tokens_to_ids(TURN_ENDS[KINDS[exported.kind][0]]) in stops


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_transformers_computes_what_vitune_computes(exported: Exported, width: int, height: int) -> None:
    image = _image(width, height)
    inputs = _hf_inputs(exported, image)
    image_id = exported.model.image_token_id
    count = _count(exported, width, height)
    ids = _vitune_ids(exported)  # the chat template renders vitune's prompt for the model's template
    assert inputs["input_ids"][0].tolist() == [t for tok in ids for t in ([tok] * count if tok == image_id
                                                                          else [tok])]
    if exported.model.recipe is not None:  # anyres: [1, max tiles, C, H, W], the image's tiles first
        tiles = exported.tower.preprocess_tiles(image)
        torch.testing.assert_close(inputs["pixel_values"][0, :len(tiles)], tiles, rtol=0, atol=PIXELS_ATOL)
    else:
        torch.testing.assert_close(inputs["pixel_values"][0], exported.tower.preprocess(image), rtol=0,
                                   atol=PIXELS_ATOL)
    with torch.no_grad():
        expected = exported.hf(**inputs).logits[0]
    got = _vitune_logits(exported, image)
    assert got.shape == expected.shape == (len(ids) - 1 + count, exported.hf.config.text_config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=LOGITS_ATOL)


def test_parity_is_sensitive_to_the_image(exported: Exported) -> None:
    with torch.no_grad():
        expected = exported.hf(**_hf_inputs(exported, _image(333, 77))).logits[0]
    moved = _vitune_logits(exported, _image(333, 77, seed=5))
    assert (moved - expected).abs().max() > 100 * LOGITS_ATOL
