"""serving/vllm.yaml: valid for Ray Serve LLM's own config models, and in agreement with what the export writes.

How it is validated, honestly: `import ray.serve.llm` fails without vLLM (Ray Serve LLM's protocol module imports
vLLM's OpenAI protocol models), so `ray_llm_check.py` runs in a subprocess that puts placeholders in
`sys.modules` for exactly those seven vLLM protocol modules and nothing else, then validates the file with Ray's
real `ServeDeploySchema` and `LLMServingArgs` — which validates each entry with the real `LLMConfig` (unknown keys
refused, accelerator type, `deployment_config` through Serve's `DeploymentConfig`) and loads the ingress class —
and drives the configured ingress's real ASGI app. Not validated by Ray here: `engine_kwargs`, which Ray splits
into vLLM's `AsyncEngineArgs` / `FrontendArgs` fields only with vLLM installed; their names are checked against
`VLLM_ARGS`, read from vLLM 0.29.0's source (the version ray[llm]==2.60.0 pins). Nothing here runs vLLM.

The export side: a tiny model exported with `export_llava_hf` holds every file vLLM's Llava loader reads, and the
config's chat template, `hf_overrides`, context length and model id are the ones the export and vitune's own
engine give.

serving/vllm_llava_next.yaml (an AnyRes model exported as LlavaNextForConditionalGeneration) goes through the same
Ray validation in the same subprocess, and is checked against a tiny anyres export the same way; its context must
also hold the largest image's tokens. serving/vllm_onevision.yaml (a SigLIP + Qwen2 anyres_max_9 model exported as
LlavaOnevisionForConditionalGeneration) likewise, against a tiny SigLIP + Qwen2 OneVision export.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vitune.config import ModelConfig, ServeConfig
from vitune.model.export import EXPORT_META, VLLM_READS

from .ray_llm_check import VLLM_PROTOCOL_MODULES
from .tiny_models import export_tiny

ROOT = Path(__file__).resolve().parents[3]
VLLM_YAML = ROOT / "serving" / "vllm.yaml"
NEXT_YAML = ROOT / "serving" / "vllm_llava_next.yaml"
ONEVISION_YAML = ROOT / "serving" / "vllm_onevision.yaml"
# the tiny tower's 32-px tiles on LLaVA-1.6's grid ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
NEXT_GRID_PX = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
CHECK = Path(__file__).with_name("ray_llm_check.py")
API_KEY = "test-key-123"
# vLLM 0.29.0: fields of EngineArgs (vllm/engine/arg_utils.py) and FrontendArgs (vllm/entrypoints/launchers/
# cli_args.py) that serving/vllm.yaml may set; Ray Serve LLM refuses any other name ("Unknown engine argument").
VLLM_ARGS = {"max_model_len", "limit_mm_per_prompt", "hf_overrides", "trust_remote_code", "dtype",
             "gpu_memory_utilization", "max_num_seqs", "enable_prefix_caching", "tensor_parallel_size",
             "chat_template", "chat_template_content_format"}
# Ray Serve LLM 2.60's defaults when autoscaling_config gives no target (ray/llm/_internal/serve/constants.py)
RAY_LLM_DEFAULT_TARGET = int(1e9)
INVALID = [  # (what is changed in the first LLM config, a piece of Ray's error)
    ({"accelerator_type": "Z100"}, "Unsupported accelerator type: Z100"),
    ({"model_loading_config": {"model_id": "vitune-tiny", "model_sorce": "./x"}}, "model_sorce"),
    ({"deployment_config": {"autoscaling_config": {"target_ongoing_requests": -1}}}, "Invalid deployment config"),
    ({"llm_engine": "TGI"}, "Unsupported engine: TGI"),
]


def _vllm_config(path: Path = VLLM_YAML) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _app(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = [a for a in config["applications"] if a["import_path"] == "ray.serve.llm:build_openai_app"]
    return app


def _llm(config: dict[str, Any]) -> dict[str, Any]:
    (llm,) = _app(config)["args"]["llm_configs"]
    return llm


@pytest.fixture(scope="module")
def ray_llm(tmp_path_factory) -> dict[str, Any]:
    """ray_llm_check.py's report on serving/vllm.yaml (first) and on the INVALID variants of it."""
    tmp = tmp_path_factory.mktemp("ray-llm")
    configs = [_vllm_config()]
    for change, _ in INVALID:
        config = copy.deepcopy(configs[0])
        _llm(config).update(change)
        configs.append(config)
    configs.append(_vllm_config(NEXT_YAML))  # then serving/vllm_llava_next.yaml
    configs.append(_vllm_config(ONEVISION_YAML))  # last: serving/vllm_onevision.yaml
    (tmp / "spec.json").write_text(json.dumps({"configs": configs, "api_key": API_KEY}))
    env = {k: v for k, v in os.environ.items() if k != "VITUNE_API_KEY"} | {"PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(CHECK), str(tmp / "spec.json"), str(tmp / "out.json")], check=True,
                   cwd=ROOT, env=env, timeout=300, stdout=subprocess.DEVNULL)
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize(("index", "path"), [(0, VLLM_YAML), (-2, NEXT_YAML), (-1, ONEVISION_YAML)],
                         ids=["vllm", "llava_next", "onevision"])
def test_vllm_yaml_validates_against_ray_serve_llms_models(ray_llm, index, path):
    first = ray_llm["results"][index]
    assert first["ok"], first.get("error")
    (llm,) = first["apps"]["vllm"]["llm_configs"]
    assert llm["class"] == "ray.llm._internal.serve.core.configs.llm_config.LLMConfig"
    assert llm["accelerator_kind"] == "gpu" and llm["accelerator_type"] == _llm(_vllm_config(path))["accelerator_type"]
    assert first["apps"]["vllm"]["ingress_cls"] == "serving.vllm_ingress.KeyedOpenAiIngress"
    # only the protocol placeholders stood in for vLLM, and the ingress imports nothing of vitune (not in its image)
    assert ray_llm["vllm_modules"] == sorted(VLLM_PROTOCOL_MODULES)
    assert ray_llm["vitune_modules"] == []


@pytest.mark.parametrize(("index", "expected"), [(i + 1, e) for i, (_, e) in enumerate(INVALID)],
                         ids=[e for _, e in INVALID])
def test_ray_refuses_broken_variants(ray_llm, index, expected):
    result = ray_llm["results"][index]
    assert not result["ok"] and expected in result["error"]


@pytest.mark.parametrize("index", [0, -2, -1], ids=["vllm", "llava_next", "onevision"])
def test_autoscaling_targets_are_explicit_and_scale(ray_llm, index):
    app = ray_llm["results"][index]["apps"]["vllm"]
    for name, deployment in (("LLM", app["llm_configs"][0]["deployment_config"]),
                             ("ingress", app["ingress_deployment_config"])):
        auto = deployment["autoscaling_config"]
        assert 0 < auto["target_ongoing_requests"] < RAY_LLM_DEFAULT_TARGET, name
        assert auto["target_ongoing_requests"] <= deployment["max_ongoing_requests"], name
        assert 1 <= auto["min_replicas"] < auto["max_replicas"], name


def test_ray_llm_default_target_is_still_the_one_that_never_scales(ray_llm):
    assert ray_llm["ray_llm_default_target"] == RAY_LLM_DEFAULT_TARGET  # why vllm.yaml sets its own


def test_both_engines_name_the_same_model():
    serve = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    (app,) = [a for a in serve["applications"] if a["import_path"] == "serving.app:build_app"]
    assert _llm(_vllm_config())["model_loading_config"]["model_id"] == ServeConfig(**app["args"]).model_name()


@pytest.mark.parametrize("path", [VLLM_YAML, NEXT_YAML, ONEVISION_YAML], ids=["vllm", "llava_next", "onevision"])
def test_engine_kwargs_are_vllm_arguments_and_plain(path):
    engine = _llm(_vllm_config(path))["engine_kwargs"]
    assert set(engine) <= VLLM_ARGS, set(engine) - VLLM_ARGS
    assert "model" not in engine and "served_model_name" not in engine  # Ray Serve LLM refuses both
    assert engine["trust_remote_code"] is False and engine["limit_mm_per_prompt"] == {"image": 1}


def test_export_holds_every_file_vllm_reads(tiny_export):
    missing = [name for name in (*VLLM_READS, "model.safetensors") if not (tiny_export / name).is_file()]
    assert not missing
    config = json.loads((tiny_export / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]  # vLLM's Llava model class


def test_chat_template_is_the_exports_own(tiny_export):
    llm = _llm(_vllm_config())
    source = llm["model_loading_config"]["model_source"]
    template = llm["engine_kwargs"]["chat_template"]
    assert template == f"{source.rstrip('/')}/chat_template.jinja"
    text = (tiny_export / Path(template).name).read_text()
    # without the key (an s3:// source), vLLM takes the processor's template, else the tokenizer's: the same file
    from transformers import AutoProcessor, AutoTokenizer

    assert AutoProcessor.from_pretrained(tiny_export).chat_template == text
    assert AutoTokenizer.from_pretrained(tiny_export).chat_template == text


def test_context_length_is_vitune_engines(tiny_export):
    meta = json.loads((tiny_export / EXPORT_META).read_text())
    text_config = json.loads((tiny_export / "config.json").read_text())["text_config"]
    # vitune's engine: the model's max_length, capped by the LM's positions (vitune.serve.engine)
    context = min(meta["model"]["max_length"], text_config["max_position_embeddings"])
    assert _llm(_vllm_config())["engine_kwargs"]["max_model_len"] == context


def _commented_overrides() -> dict[str, Any]:
    (line,) = [ln for ln in VLLM_YAML.read_text().splitlines() if ln.strip().startswith("# hf_overrides:")]
    return yaml.safe_load(line.strip()[2:])["hf_overrides"]


def test_hf_overrides_are_what_the_export_records(tiny_export, tmp_path):
    meta = json.loads((tiny_export / EXPORT_META).read_text())
    assert meta["projector"] == "mlp2x_gelu" and meta["vllm_hf_overrides"] == {}
    assert _llm(_vllm_config())["engine_kwargs"].get("hf_overrides", {}) == meta["vllm_hf_overrides"]
    # the override the config documents for a `linear` projector is the one its export records
    linear = export_tiny(tmp_path, "linear", ModelConfig(projector="linear"))
    assert json.loads((linear / EXPORT_META).read_text())["vllm_hf_overrides"] == _commented_overrides()
    assert json.loads((linear / "config.json").read_text())["projector_hidden_act"] == "linear"


def test_ingress_requires_the_key_when_set(ray_llm):
    ingress = ray_llm["ingress"]
    for case in ("no_key", "wrong_key", "basic_scheme"):
        assert ingress[case]["status"] == 401, case
        assert ingress[case]["body"]["error"]["code"] == "invalid_api_key"
        assert ingress[case]["www_authenticate"] == "Bearer"
    assert ingress["chat_no_key"] == 401
    assert ingress["right_key"] == {"status": 200, "text": "inner"}
    assert ingress["unset_wraps"] == "FastAPI"  # no key configured: Ray's app as is, like vitune's engine


# ------------------------------------------------------------- serving/vllm_llava_next.yaml over an AnyRes export


@pytest.fixture(scope="module")
def next_export(tmp_path_factory) -> Path:
    from vitune.config import TrainJobConfig, VisionConfig, load_config

    cfg = load_config(TrainJobConfig, "tiny", ["stage=finetune"]).model
    vision = VisionConfig(**{**cfg.vision.model_dump(), "image_aspect_ratio": "anyres",
                             "image_grid_pinpoints": NEXT_GRID_PX})
    return export_tiny(tmp_path_factory.mktemp("export-next"), "llava-hf", cfg.model_copy(update={"vision": vision}))


def test_llava_next_export_holds_every_file_vllm_reads(next_export):
    missing = [name for name in (*VLLM_READS, "model.safetensors") if not (next_export / name).is_file()]
    assert not missing
    config = json.loads((next_export / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]  # vLLM's LlavaNext model class
    assert config["image_grid_pinpoints"] == NEXT_GRID_PX


def test_llava_next_chat_template_and_overrides_are_the_exports_own(next_export):
    llm = _llm(_vllm_config(NEXT_YAML))
    template = llm["engine_kwargs"]["chat_template"]
    assert template == f"{llm['model_loading_config']['model_source'].rstrip('/')}/chat_template.jinja"
    assert (next_export / Path(template).name).read_text() == (next_export / "chat_template.jinja").read_text()
    meta = json.loads((next_export / EXPORT_META).read_text())
    assert llm["engine_kwargs"].get("hf_overrides", {}) == meta["vllm_hf_overrides"] == {}


def test_llava_next_context_is_vitune_engines_and_holds_the_largest_image(next_export):
    from vitune.model.folder import folder_recipe
    from vitune.vision_recipe import visual_tokens

    meta = json.loads((next_export / EXPORT_META).read_text())
    text_config = json.loads((next_export / "config.json").read_text())["text_config"]
    context = min(meta["model"]["max_length"], text_config["max_position_embeddings"])
    engine = _llm(_vllm_config(NEXT_YAML))["engine_kwargs"]
    assert engine["max_model_len"] == context
    recipe = folder_recipe(meta)
    largest = max(visual_tokens(recipe, w, h) for h, w in recipe.grid_pinpoints)
    assert largest == 88  # the count the file's comment gives: 16 (base) + 8 x 8 + 8 newlines
    assert engine["max_model_len"] >= largest + 64  # room for a prompt beside the image


def test_llava_next_yaml_differs_from_vllm_yaml_only_in_the_model():
    plain, nxt = _vllm_config(VLLM_YAML), _vllm_config(NEXT_YAML)
    a, b = _llm(plain), _llm(nxt)
    assert a["deployment_config"] == b["deployment_config"] and a["accelerator_type"] == b["accelerator_type"]
    assert _app(plain)["args"]["ingress_cls_config"] == _app(nxt)["args"]["ingress_cls_config"]
    assert _app(plain)["args"]["ingress_deployment_config"] == _app(nxt)["args"]["ingress_deployment_config"]
    assert a["model_loading_config"]["model_id"] != b["model_loading_config"]["model_id"]  # two models, two ids


# ------------------------------------------------ serving/vllm_onevision.yaml over a SigLIP + Qwen2 OneVision export


@pytest.fixture(scope="module")
def onevision_export(tmp_path_factory):
    from tests.unit.model.test_export_siglip import _export

    return _export(tmp_path_factory.mktemp("export-onevision"), "onevision")


def test_onevision_export_holds_every_file_vllm_reads(onevision_export):
    out = onevision_export.out
    missing = [name for name in (*VLLM_READS, "model.safetensors") if not (out / name).is_file()]
    assert not missing
    config = json.loads((out / "config.json").read_text())
    # what vLLM's LlavaOnevision builds from: its class, a SigLIP tower config, the cap and the grid
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["text_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert config["vision_aspect_ratio"] == "anyres_max_9" and config["vision_feature_select_strategy"] == "full"
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["vision_feature_select_strategy"] == "full"
    assert processor["num_image_tokens"] == onevision_export.tower.num_patches  # no CLS counted


def test_onevision_chat_template_and_overrides_are_the_exports_own(onevision_export):
    llm = _llm(_vllm_config(ONEVISION_YAML))
    template = llm["engine_kwargs"]["chat_template"]
    assert template == f"{llm['model_loading_config']['model_source'].rstrip('/')}/chat_template.jinja"
    meta = json.loads((onevision_export.out / EXPORT_META).read_text())
    assert llm["engine_kwargs"].get("hf_overrides", {}) == meta["vllm_hf_overrides"] == {}
    assert "<|im_start|>" in (onevision_export.out / "chat_template.jinja").read_text()  # qwen_1_5: ChatML


def test_onevision_context_is_vitune_engines_and_holds_the_largest_image(onevision_export):
    from vitune.vision_recipe import visual_tokens

    meta = json.loads((onevision_export.out / EXPORT_META).read_text())
    text_config = json.loads((onevision_export.out / "config.json").read_text())["text_config"]
    engine = _llm(_vllm_config(ONEVISION_YAML))["engine_kwargs"]
    assert engine["max_model_len"] == min(meta["model"]["max_length"], text_config["max_position_embeddings"])
    recipe = onevision_export.model.recipe
    largest = max(visual_tokens(recipe, w, h) for h, w in recipe.grid_pinpoints)
    assert engine["max_model_len"] >= largest + 64  # room for a prompt beside the image


def test_onevision_yaml_differs_from_vllm_yaml_only_in_the_model():
    plain, ov = _vllm_config(VLLM_YAML), _vllm_config(ONEVISION_YAML)
    a, b = _llm(plain), _llm(ov)
    assert a["deployment_config"] == b["deployment_config"] and a["accelerator_type"] == b["accelerator_type"]
    assert _app(plain)["args"]["ingress_cls_config"] == _app(ov)["args"]["ingress_cls_config"]
    assert _app(plain)["args"]["ingress_deployment_config"] == _app(ov)["args"]["ingress_deployment_config"]
    assert b["model_loading_config"]["model_id"] not in {a["model_loading_config"]["model_id"],
                                                         _llm(_vllm_config(NEXT_YAML))["model_loading_config"]["model_id"]}
