"""Export to llava-hf: transformers alone (a subprocess that never imports vitune) computes what vitune computes.

For tiny models with the `linear` and `mlp2x_gelu` projectors, padded and cropped: the export loads with
`LlavaForConditionalGeneration` / `AutoProcessor`, gives logits within 1e-4 of vitune's on the same image and
conversation, the same 16 greedy tokens, vitune's pixels and vitune's prompt ids. For every conversation
template the exported chat template renders vitune's prompt (and refuses what vitune refuses). Models the
layout cannot hold exactly are refused with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vitune import IMAGE_TOKEN
from vitune.config import ModelConfig, VisionConfig
from vitune.data.masks import bos_ids, tokenize_generation_prompt
from vitune.data.templates import (
    TEMPLATES,
    SepStyle,
    TemplateError,
    render_conversation,
    render_generation_prompt,
    stop_strings,
    stop_token_ids,
    with_system,
)
from vitune.data.tokenizer import load_tokenizer
from vitune.model import llava_hf
from vitune.model.export import EXPORT_META, VLLM_READS, export_llava_hf
from vitune.model.folder import save_model_folder
from vitune.model.vision import encode_images, load_vision_tower
from vitune.model.vlm import build_model

REFERENCE = Path(__file__).with_name("hf_reference.py")
LOGITS_ATOL = 1e-4
PIXELS_ATOL = 1e-5
GREEDY_TOKENS = 16
PARITY_CASES = [(p, m) for p in ("linear", "mlp2x_gelu") for m in ("pad", "crop")]
CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": "A red circle and a blue square."},
    {"role": "user", "content": "Where is the square?"},
]
TEMPLATE_CASES: list[tuple[list[dict], bool]] = [
    (CONVERSATION[:1], True),
    (CONVERSATION, True),
    ([{"role": "system", "content": "Answer briefly."}, *CONVERSATION[:1]], True),
    ([{"role": "user", "content": "hello there"}], True),
    ([{"role": "user", "content": "What is it? <image>"}], True),  # vLLM's string format, placeholder last
    (CONVERSATION[:2], False),  # a whole training conversation
]


def vitune_turns(messages: list[dict]) -> tuple[list[dict], str | None]:
    """OpenAI-style messages → vitune turns and system text, as vitune's serving maps them."""
    system, turns = None, []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        text = "\n".join(p["text"] for p in parts if p["type"] == "text")
        if message["role"] == "system":
            system = text if system is None else f"{system}\n{text}"
            continue
        if any(p["type"] == "image" for p in parts):
            text = f"{IMAGE_TOKEN}\n{text}" if text else IMAGE_TOKEN
        turns.append({"from": "human" if message["role"] == "user" else "gpt", "value": text})
    return turns, system


def _random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _randomize(model: torch.nn.Module) -> None:
    # larger weights than the 0.02 init, so that any misplaced feature moves the logits
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2, generator=gen)


@dataclass
class Case:
    cfg: ModelConfig
    model: Any
    tower: Any
    out: Path


@dataclass
class Workspace:
    tokenizer: Any
    cases: dict[str, Case]
    templates: dict[str, Path]
    image: Image.Image
    crop_images: list[Image.Image]
    results: dict[str, Any]


def _export(tmp: Path, name: str, model: Any, tokenizer: Any, cfg: ModelConfig, tower: Any) -> Path:
    save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(tmp / f"{name}-vitune"))
    return Path(export_llava_hf(str(tmp / f"{name}-vitune"), str(tmp / f"{name}-hf")))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    tmp = tmp_path_factory.mktemp("export")
    tokenizer = load_tokenizer("tiny")
    image, image_path = _random_image(48, 20, seed=1), tmp / "image.png"
    image.save(image_path)
    cases: dict[str, Case] = {}
    for projector, mode in PARITY_CASES:
        cfg = ModelConfig(projector=projector, vision=VisionConfig(image_mode=mode))
        tower = load_vision_tower(cfg.vision)
        model = build_model(cfg, tokenizer, tower.hidden_size).eval()
        _randomize(model)
        cases[f"{projector}-{mode}"] = Case(cfg, model, tower, _export(tmp, f"{projector}-{mode}", model, tokenizer,
                                                                       cfg, tower))
    base = cases["mlp2x_gelu-pad"]
    templates = {name: _export(tmp, f"template-{name}", base.model, tokenizer,
                               base.cfg.model_copy(update={"template": name}), base.tower) for name in TEMPLATES}
    crop_images = [_random_image(w, h, seed=w * 100 + h) for w in range(20, 80) for h in (17, 32, 40)]
    crop_paths = []
    for i, img in enumerate(crop_images):
        crop_paths.append(str(tmp / f"crop-{i}.png"))
        img.save(crop_paths[-1])
    spec = {
        "parity": [{"name": name, "folder": str(case.out), "image": str(image_path), "messages": CONVERSATION}
                   for name, case in cases.items()],
        "pixels": [{"folder": str(cases["mlp2x_gelu-crop"].out), "images": crop_paths}],
        "templates": [{"folder": str(folder), "cases": [{"messages": m, "add_generation_prompt": g}
                                                        for m, g in TEMPLATE_CASES]} for folder in templates.values()],
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, str(REFERENCE), str(tmp / "spec.json"), str(tmp / "out.pt")], check=True,
                   cwd=tmp, timeout=600)
    results = torch.load(tmp / "out.pt", weights_only=False)
    return Workspace(tokenizer, cases, templates, image, crop_images, results)


def _vitune_side(case: Case, tokenizer: Any, image: Image.Image) -> tuple[list[int], torch.Tensor, list[int]]:
    turns, _ = vitune_turns(CONVERSATION)
    ids = tokenize_generation_prompt(turns, case.cfg.template, tokenizer)
    features = encode_images(case.tower, [image])
    with torch.no_grad():
        logits = case.model(torch.tensor([ids]), image_features=features).logits[0]
    tokens = case.model.generate([ids], [features[0]], max_new_tokens=GREEDY_TOKENS, stop_token_ids=[])[0]
    return ids, logits, tokens


def test_reference_ran_without_vitune(ws: Workspace) -> None:
    assert ws.results["vitune_modules"] == []
    assert set(ws.results["parity"]) == set(ws.cases)


@pytest.mark.parametrize("name", [f"{p}-{m}" for p, m in PARITY_CASES])
def test_transformers_computes_what_vitune_computes(ws: Workspace, name: str) -> None:
    case, hf = ws.cases[name], ws.results["parity"][name]
    assert hf["loading"] == {"error_msgs": [], "missing_keys": [], "mismatched_keys": [], "unexpected_keys": []}
    ids, logits, tokens = _vitune_side(case, ws.tokenizer, ws.image)
    expanded = [t for tok in ids for t in ([tok] * case.tower.num_patches if tok == case.model.image_token_id
                                            else [tok])]
    assert hf["input_ids"] == expanded
    assert hf["logits"].shape == logits.shape
    torch.testing.assert_close(hf["logits"], logits, rtol=0, atol=LOGITS_ATOL)
    assert len(tokens) == GREEDY_TOKENS and hf["tokens"] == tokens
    torch.testing.assert_close(hf["pixels_pil"], case.tower.preprocess(ws.image), rtol=0, atol=PIXELS_ATOL)


@pytest.mark.parametrize("name", [f"{p}-{m}" for p, m in PARITY_CASES])
def test_default_image_backend_is_within_one_intensity_level(ws: Workspace, name: str) -> None:
    # transformers picks torchvision when installed; its bicubic resize differs from PIL's by <= 1/255
    case, hf = ws.cases[name], ws.results["parity"][name]
    one_level = 1 / 255 / min(case.tower.std) + PIXELS_ATOL
    assert (hf["pixels_default"] - case.tower.preprocess(ws.image)).abs().max() <= one_level


def test_parity_is_sensitive_to_the_image(ws: Workspace) -> None:
    case, hf = ws.cases["linear-pad"], ws.results["parity"]["linear-pad"]
    turns, _ = vitune_turns(CONVERSATION)
    ids = tokenize_generation_prompt(turns, case.cfg.template, ws.tokenizer)
    other = encode_images(case.tower, [_random_image(48, 20, seed=2)])
    with torch.no_grad():
        moved = case.model(torch.tensor([ids]), image_features=other).logits[0]
    assert (moved - hf["logits"]).abs().max() > 100 * LOGITS_ATOL


def test_cropped_pixels_match_for_every_image_size(ws: Workspace) -> None:
    tower = ws.cases["mlp2x_gelu-crop"].tower
    worst = max(float((hf - tower.preprocess(img)).abs().max())
                for hf, img in zip(ws.results["pixels"][0], ws.crop_images, strict=True))
    assert worst <= PIXELS_ATOL


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_chat_template_renders_vitune_prompt(ws: Workspace, template: str) -> None:
    index = list(ws.templates).index(template)
    results = ws.results["templates"][index]
    for (messages, generation), hf in zip(TEMPLATE_CASES, results, strict=True):
        turns, system = vitune_turns(messages)
        try:
            tpl = with_system(template, system)
            render = render_generation_prompt if generation else render_conversation
            text = render(turns, tpl, ws.tokenizer)
        except TemplateError:
            assert "error" in hf, f"{template}: vitune refuses {messages}, the chat template renders {hf}"
            continue
        writes_bos = tpl.style in (SepStyle.CHAT_TEMPLATE, SepStyle.LLAMA_3)  # their rendering holds the BOS text
        bos = ws.tokenizer.bos_token if bos_ids(ws.tokenizer) and not writes_bos else ""
        assert hf.get("text") == bos + text, f"{template}: {messages}"
        if generation:
            assert hf["ids"] == tokenize_generation_prompt(turns, tpl, ws.tokenizer), f"{template}: {messages}"


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_generation_config_stops_where_vitune_serving_stops(ws: Workspace, template: str) -> None:
    generation = json.loads((ws.templates[template] / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    expected = dict.fromkeys([*ws.cases["linear-pad"].model.eos_token_ids, *stop_token_ids(template, ws.tokenizer)])
    assert eos == list(expected)
    # plain's newline is one token here, so it is a stop; the tiny tokenizer spells <|im_end|> / <|eot_id|> in
    # several tokens, which serving catches as text (test_llava_next_templates checks them as single ids)
    if template == "plain":
        assert stop_strings(template) == ("\n",) and len(eos) == len(ws.cases["linear-pad"].model.eos_token_ids) + 1


def test_export_holds_what_vllm_reads(ws: Workspace) -> None:
    out = ws.cases["linear-pad"].out
    assert all((out / name).exists() for name in (*VLLM_READS, "model.safetensors", EXPORT_META))
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]  # vLLM builds the LM by this name
    assert config["projector_hidden_act"] == "linear" and config["vision_feature_select_strategy"] == "default"
    overrides = json.loads((out / EXPORT_META).read_text())["vllm_hf_overrides"]
    assert overrides == {"projector_hidden_act": "torch.nn.modules.linear.Identity"}  # vLLM's name for identity
    generation = json.loads((out / "generation_config.json").read_text())
    stops = list(ws.cases["linear-pad"].model.eos_token_ids)
    assert generation["eos_token_id"] in (stops, stops[0])


def test_linear_projector_is_exact_not_approximate(ws: Workspace) -> None:
    from safetensors.torch import load_file

    case = ws.cases["linear-pad"]
    weights = load_file(str(case.out / "model.safetensors"))
    linear = case.model.projector
    assert torch.equal(weights["multi_modal_projector.linear_1.weight"], linear.weight)
    assert torch.equal(weights["multi_modal_projector.linear_2.weight"], torch.eye(linear.out_features))
    features = torch.randn(3, 5, linear.in_features, generator=torch.Generator().manual_seed(3)) * 10
    two_layers = torch.nn.functional.linear(linear(features), weights["multi_modal_projector.linear_2.weight"],
                                            weights["multi_modal_projector.linear_2.bias"])
    assert torch.equal(two_layers, linear(features))


def test_sharded_weights_load_like_one_file(ws: Workspace, tmp_path: Path) -> None:
    case = ws.cases["mlp2x_gelu-pad"]
    source = ws.cases["mlp2x_gelu-pad"].out.parent / "mlp2x_gelu-pad-vitune"
    out = Path(export_llava_hf(str(source), str(tmp_path / "sharded"), max_shard_bytes=200_000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from vitune.model.importers import read_weights

    assert set(read_weights(out)) == set(read_weights(case.out))


def test_deeper_projectors_are_refused_with_the_reason() -> None:
    projector = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 8),
                                    torch.nn.GELU(), torch.nn.Linear(8, 8))
    with pytest.raises(llava_hf.NotRepresentable, match="3 Linear layers; llava-hf's has two"):
        llava_hf.projector_tensors(projector, "mlp3x_gelu", 8, torch.float32)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"ls_init_value": 1e-5}, "layer scale"),
    ({"no_ln_pre": True}, "no LayerNorm before its blocks"),
])
def test_towers_that_are_not_clip_shaped_are_refused(kwargs: dict, reason: str) -> None:
    from open_clip.transformer import VisionTransformer

    visual = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, **kwargs)
    with pytest.raises(llava_hf.NotRepresentable, match=reason):
        llava_hf.clip_vision_config(visual)


def test_quick_gelu_tower_exports_quick_gelu() -> None:
    from open_clip.transformer import QuickGELU, VisionTransformer

    visual = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0,
                               act_layer=QuickGELU)
    assert llava_hf.clip_vision_config(visual)["hidden_act"] == "quick_gelu"


def test_cli_exports_and_refuses_with_the_reason(ws: Workspace, tmp_path: Path, capsys) -> None:
    from vitune.cli.export import main

    source = ws.cases["linear-pad"].out.parent / "linear-pad-vitune"
    assert main([str(source), str(tmp_path / "out"), "--format", "llava-hf", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    cfg = ModelConfig(projector="mlp3x_gelu")
    tower = ws.cases["linear-pad"].tower
    model = build_model(cfg, ws.tokenizer, tower.hidden_size)
    save_model_folder(model, ws.tokenizer, cfg, tower.fingerprint(), str(tmp_path / "deep"))
    assert main([str(tmp_path / "deep"), str(tmp_path / "deep-out")]) == 2
    assert "'mlp3x_gelu' has 3 Linear layers; llava-hf's has two" in capsys.readouterr().err
