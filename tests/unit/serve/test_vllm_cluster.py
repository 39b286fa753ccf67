"""The vLLM serving path in cluster/: the RayService serves exactly serving/vllm.yaml on a cluster that fits it,
with the API key from a Secret; its image installs Ray Serve LLM at the project's pins and nothing of vitune."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import yaml

from vitune import config
from vitune.cli import manifests

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "cluster" / "Dockerfile.vllm"
API_KEY_ENV = config.API_KEY_ENV  # what vitune's own engine reads


def _service() -> dict[str, Any]:
    (service,) = [d for d in yaml.safe_load_all((ROOT / manifests.VLLM_RAYSERVICE).read_text())
                  if d and d.get("kind") == "RayService"]
    return service


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / manifests.VLLM_SERVE_CONFIG).read_text())


def _groups() -> dict[str, dict[str, Any]]:
    spec = _service()["spec"]["rayClusterConfig"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def _containers() -> list[dict[str, Any]]:
    return [c for g in _groups().values() for c in g["template"]["spec"]["containers"]]


def _pin(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (version,) = [m.group(2) for d in deps if (m := re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==(\S+)", d))]
    return version


def _app() -> dict[str, Any]:
    (app,) = _serve_config()["applications"]
    return app


def test_rayservice_serves_exactly_vllm_yaml_and_is_not_stale():
    serve_text = (ROOT / manifests.VLLM_SERVE_CONFIG).read_text()
    assert yaml.safe_load(_service()["spec"]["serveConfigV2"]) == yaml.safe_load(serve_text)
    manifest = (ROOT / manifests.VLLM_RAYSERVICE).read_text()
    assert manifests.render_vllm_rayservice(manifest, serve_text) == manifest, (
        f"{manifests.VLLM_RAYSERVICE} is stale: run python -m vitune.cli.manifests")


def test_check_covers_the_vllm_manifest(tmp_path):
    for rel in [path for pair in manifests.PAIRS.values() for path in pair]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    assert manifests.main(["--check", "--root", str(tmp_path)]) == 0
    serve = tmp_path / manifests.VLLM_SERVE_CONFIG
    serve.write_text(serve.read_text().replace("max_model_len: 256", "max_model_len: 512", 1))
    assert manifests.main(["--check", "--root", str(tmp_path)]) == 1
    assert manifests.main(["--root", str(tmp_path)]) == 0  # regenerates both
    assert manifests.main(["--check", "--root", str(tmp_path)]) == 0
    embedded = yaml.safe_load(yaml.safe_load((tmp_path / manifests.VLLM_RAYSERVICE).read_text())["spec"][
        "serveConfigV2"])
    assert embedded["applications"][0]["args"]["llm_configs"][0]["engine_kwargs"]["max_model_len"] == 512


def test_variant_points_every_llm_config_at_the_export():
    serve_text = (ROOT / manifests.VLLM_SERVE_CONFIG).read_text()
    want = yaml.safe_load(serve_text)
    llm = want["applications"][0]["args"]["llm_configs"][0]
    remote = yaml.safe_load(manifests.render_vllm_serve_config(serve_text, "s3://b/export/m1"))
    llm["model_loading_config"]["model_source"] = "s3://b/export/m1"
    template = llm["engine_kwargs"].pop("chat_template")  # downloaded to Ray's cache: vLLM reads the folder's own
    assert remote == want
    local = yaml.safe_load(manifests.render_vllm_serve_config(serve_text, "/data/m1/"))
    llm["model_loading_config"]["model_source"] = "/data/m1/"
    llm["engine_kwargs"]["chat_template"] = "/data/m1/chat_template.jinja"
    assert local == want and Path(template).name == "chat_template.jinja"
    manifest = (ROOT / manifests.VLLM_RAYSERVICE).read_text()
    out = yaml.safe_load(manifests.render_vllm_rayservice(manifest, serve_text, "s3://b/export/m1"))
    assert out["spec"]["rayClusterConfig"] == _service()["spec"]["rayClusterConfig"]


def test_cluster_fits_the_serve_config():
    serve = _serve_config()
    groups = _groups()
    head = groups["head"]["template"]["spec"]["containers"][0]
    assert [p["containerPort"] for p in head["ports"] if p.get("name") == "serve"] == [serve["http_options"]["port"]]
    (llm,) = _app()["args"]["llm_configs"]
    gpu = [g for name, g in groups.items() if name != "head"
           and "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu) == 1, "one GPU worker group: one vLLM engine per pod"
    (gpu,) = gpu
    resources = yaml.safe_load(yaml.safe_load(gpu["rayStartParams"]["resources"]))
    assert resources == {f"accelerator_type:{llm['accelerator_type']}": 1}  # what the LLM replica asks for
    assert gpu["maxReplicas"] >= llm["deployment_config"]["autoscaling_config"]["max_replicas"]
    assert gpu["minReplicas"] >= llm["deployment_config"]["autoscaling_config"]["min_replicas"]
    ingress = _app()["args"]["ingress_deployment_config"]["autoscaling_config"]
    assert groups["cpu"]["maxReplicas"] >= ingress["max_replicas"]
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"


def test_cluster_versions_and_token_auth():
    spec = _service()["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == _pin("ray") and spec["authOptions"]["mode"] == "token"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for c in _containers()}
    assert images == {f"ghcr.io/change-me/vitune-vllm:{version}"}
    assert f"-t {images.pop()} ." in DOCKERFILE.read_text()


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_api_key_comes_from_a_secret_never_from_args():
    for container in _containers():
        (env,) = [e for e in container["env"] if e["name"] == API_KEY_ENV]
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] and not ref.get("optional", False), container["name"]
        assert "value" not in env
    assert not {k for k in _keys(_serve_config()) if "key" in k.lower() and "api" in k.lower()}
    # the variable the ingress reads (its module needs vLLM to import) is the one vitune's engine reads
    ingress_source = (ROOT / "serving" / "vllm_ingress.py").read_text()
    assert re.search(rf'^API_KEY_ENV = "{API_KEY_ENV}"', ingress_source, re.M)


def _dockerfile_runs() -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line[len("RUN "):] for line in text.splitlines() if line.startswith("RUN ")]


def test_image_installs_ray_llm_at_the_project_pins_and_no_vitune():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11\b", text, re.M)
    installs = [shlex.split(run.split("-m pip install", 1)[1]) for run in _dockerfile_runs() if "-m pip install" in run]
    packages = {a for args in installs for a in args if not a.startswith("-")}
    assert {f"ray[llm]=={_pin('ray')}", f"transformers=={_pin('transformers')}", f"boto3=={_pin('boto3')}"} <= packages
    assert not any(a in ("-e", "--editable", ".") or "vitune" in a for args in installs for a in args)
    assert not any(a.startswith("torch") for a in packages), "torch is vLLM's pin, through ray[llm]"
    (check,) = [run for run in _dockerfile_runs() if "vllm.__version__" in run]
    assert f"'{_pin('ray')}', '0.29.0', '2.13.0', '{_pin('transformers')}'" in check
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies == [["serving/vllm_ingress.py", "serving/vllm.yaml", "./serving/"]]
    assert re.search(r"^ENV PYTHONPATH=/app$", text, re.M)  # Serve imports serving.vllm_ingress from /app
    module, _ = _app()["args"]["ingress_cls_config"]["ingress_cls"].split(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    ignore = (ROOT / "cluster" / "Dockerfile.vllm.dockerignore").read_text().split()
    assert {f"!{c}" for c in copies[0][:-1]} <= set(ignore)
