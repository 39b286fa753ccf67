"""benchmarks/engines_compare.py, as far as a CPU machine without vLLM can take it: its arguments, its clear
refusal, and the two Serve configs it derives (Serve's own schema; one GPU replica each; the same model id)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from ray.serve.schema import ServeDeploySchema

from benchmarks import engines_compare
from vitune.cli import manifests


def test_arguments_and_defaults():
    args = engines_compare.parse_args(["--model", "models:/m/1", "--concurrency", "1", "4"])
    assert args.concurrency == [1, 4] and args.dtype == "bfloat16" and args.export is None
    with pytest.raises(SystemExit):
        engines_compare.parse_args([])  # --model is required


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine would start the benchmark")
def test_refuses_clearly_without_gpu_and_vllm(caplog, capsys):
    with caplog.at_level(logging.ERROR, logger="engines_compare"):
        assert engines_compare.main(["--model", "/nonexistent/model"]) == 2
    message = caplog.text
    assert "a CUDA GPU" in message and "cannot import vllm / ray.serve.llm" in message
    assert "ModuleNotFoundError: No module named 'vllm'" in message  # the interpreter's own answer
    assert capsys.readouterr().out == ""  # no report


def test_requests_are_fixed():
    first, again = engines_compare.payloads(10, 16), engines_compare.payloads(10, 16)
    assert first == again and len({json.dumps(p) for p in first}) == len(engines_compare.PROMPTS)
    assert {p["model"] for p in first} == {engines_compare.MODEL_ID}


def test_derived_serve_configs_deploy_one_gpu_replica_each(tiny_export: Path):
    vitune = engines_compare.vitune_serve_config("/models/m", "bfloat16", 8123)
    vllm = engines_compare.vllm_serve_config(tiny_export, "bfloat16", 8123)
    for config in (vitune, vllm):
        ServeDeploySchema.model_validate(config)
        assert config["http_options"]["port"] == 8123 and len(config["applications"]) == 1
    (app,) = vitune["applications"]
    assert app["args"]["served_model_name"] == engines_compare.MODEL_ID and app["args"]["dtype"] == "bfloat16"
    for deployment in app["deployments"]:
        assert deployment["num_replicas"] == 1 and "autoscaling_config" not in deployment
    (engine,) = [d for d in app["deployments"] if d["name"] == manifests.ENGINE]
    assert engine["ray_actor_options"]["num_gpus"] == 1
    (llm,) = vllm["applications"][0]["args"]["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": engines_compare.MODEL_ID, "model_source": str(tiny_export)}
    assert llm["deployment_config"]["num_replicas"] == 1 and "accelerator_type" not in llm
    meta = json.loads((tiny_export / "vitune_export.json").read_text())
    assert llm["engine_kwargs"]["max_model_len"] == meta["model"]["max_length"] == 256  # vitune's engine's context
    assert llm["engine_kwargs"]["hf_overrides"] == meta["vllm_hf_overrides"]
    assert (tiny_export / Path(llm["engine_kwargs"]["chat_template"]).name).is_file()
    assert llm["engine_kwargs"]["chat_template"] == f"{tiny_export}/chat_template.jinja"
    # everything else is serving/vllm.yaml's
    shipped = yaml.safe_load((engines_compare.ROOT / manifests.VLLM_SERVE_CONFIG).read_text())
    (shipped_llm,) = shipped["applications"][0]["args"]["llm_configs"]
    assert llm["engine_kwargs"]["limit_mm_per_prompt"] == shipped_llm["engine_kwargs"]["limit_mm_per_prompt"]
    assert vllm["applications"][0]["args"]["ingress_cls_config"] == shipped["applications"][0]["args"][
        "ingress_cls_config"]
