"""cluster/: every manifest parses; RayJobs name existing jobs and presets whose overrides load; the RayService
serves exactly serving/config.yaml; the Dockerfile and the `ray up` file install what the Makefile installs."""

from __future__ import annotations

import re
import shlex
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

from vitune import layout
from vitune.catalog import JOBS
from vitune.cli import manifests as cluster_manifests
from vitune.cli import submit
from vitune.config import ConfigError, SyntheticJobConfig, TrainJobConfig, load_config, resolve_preset

ROOT = Path(__file__).resolve().parents[3]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
RAYJOB_STEPS = {"features", "align", "finetune", "eval", "pipeline"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(kind: str) -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==(\S+)", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _vitune_services() -> list[dict]:
    # rayservice-vllm.yaml runs the vLLM image, not this one: tests/unit/serve/test_vllm_config.py checks it
    return [d for d in _kind("RayService") if d["metadata"]["name"] == "vitune"]


def _cluster_specs() -> list[dict]:
    return [d["spec"] for d in _kind("RayCluster")] + [d["spec"]["rayClusterConfig"] for d in _vitune_services()]


def test_cluster_folder_has_the_pieces():
    assert {p.name for p in KUBERAY.glob("*.yaml")} >= {
        "raycluster.yaml", "rayservice.yaml", *(f"rayjob-{s}.yaml" for s in RAYJOB_STEPS)}
    assert (CLUSTER / "aws.yaml").is_file() and (CLUSTER / "Dockerfile").is_file()
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(CLUSTER)) for p in YAMLS])
def test_every_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict)
        if path.parent == KUBERAY:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: not a Kubernetes object"


def _rayjob_commands(entrypoint: str) -> list[list[str]]:
    return [shlex.split(part) for part in entrypoint.split("&&")]


def _python_command(job: dict) -> tuple[str, str, list[str]]:
    """(job script, config, overrides) of the RayJob's `python jobs/...` command."""
    commands = [c for c in _rayjob_commands(job["spec"]["entrypoint"]) if c and c[0] == "python"]
    assert len(commands) == 1, f"{job['metadata']['name']}: expected one python command"
    argv = commands[0][1:]
    script, rest = argv[0], argv[1:]
    assert "--config" in rest, f"{job['metadata']['name']}: no --config"
    i = rest.index("--config")
    return script, rest[i + 1], rest[:i] + rest[i + 2:]


def test_one_rayjob_per_step():
    names = {j["metadata"]["name"] for j in _kind("RayJob")}
    assert names == {f"vitune-{s}" for s in RAYJOB_STEPS}


@pytest.mark.parametrize("step", sorted(RAYJOB_STEPS))
def test_rayjob_entrypoint_names_existing_job_and_config_and_its_overrides_load(step):
    (job,) = [j for j in _kind("RayJob") if j["metadata"]["name"] == f"vitune-{step}"]
    script, config, overrides = _python_command(job)
    assert (ROOT / script).is_file(), f"{script} does not exist"
    assert script.startswith("jobs/") and Path(script).stem in JOBS
    assert Path(resolve_preset(config)).is_file(), f"{config} is no preset"
    cfgs = submit.validate_job(Path(script).stem, config, overrides)
    assert cfgs, f"{script}: nothing validated"
    if step in ("align", "finetune"):
        (cfg,) = cfgs
        assert isinstance(cfg, TrainJobConfig) and cfg.stage == step
        assert cfg.data.features and cfg.data.records
    if step == "finetune":
        assert cfg.train.init_from.endswith("/train/align/model")


def test_rayjob_overrides_are_really_checked():
    (job,) = [j for j in _kind("RayJob") if j["metadata"]["name"] == "vitune-align"]
    script, config, overrides = _python_command(job)
    with pytest.raises(ConfigError, match="train.num_workerz"):
        submit.validate_job(Path(script).stem, config, [*overrides, "train.num_workerz=2"])


def test_rayjobs_run_on_the_raycluster_from_the_image_workdir():
    clusters = {c["metadata"]["name"] for c in _kind("RayCluster")}
    workdir = re.search(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    for job in _kind("RayJob"):
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] in clusters
        assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir


def test_the_pipeline_rayjob_synthesizes_the_tiny_presets_data_where_the_preset_reads_it():
    (job,) = [j for j in _kind("RayJob") if j["metadata"]["name"] == "vitune-pipeline"]
    synth = [c for c in _rayjob_commands(job["spec"]["entrypoint"]) if c[:3] == ["vitune", "data", "synth"]]
    assert len(synth) == 1
    argv = synth[0][3:]
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    _, config, overrides = _python_command(job)
    preset = load_config(SyntheticJobConfig, config, [o for o in overrides if not o.startswith("steps=")])
    s = preset.synthetic
    assert flags == {"--seed": str(s.seed), "--num-images": str(s.num_images),
                     "--num-eval-images": str(s.num_eval_images), "--image-size": str(s.image_size)}
    root = next(o.split("=", 1)[1] for o in overrides if o.startswith("storage.root="))
    assert argv[0] == f"{root}/data"
    features = submit.validate_job("pipeline", config, overrides)[0]
    assert layout.image_root(features.data) == f"{root}/data"


def test_rayservice_serve_config_is_serving_config_yaml():
    (service,) = _vitune_services()
    serve_text = (ROOT / cluster_manifests.SERVE_CONFIG).read_text()
    # compared in full: KubeRay forbids no key of serveConfigV2 (it hands it to Serve's REST API as is)
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(serve_text)
    manifest = (ROOT / cluster_manifests.RAYSERVICE).read_text()
    assert cluster_manifests.render_rayservice(manifest, serve_text) == manifest, (
        "cluster/kuberay/rayservice.yaml is stale: run python -m vitune.cli.manifests")


def test_rayservice_ports_and_import_path_fit_the_cluster():
    (service,) = _vitune_services()
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    serve_ports = [p["containerPort"] for p in head["ports"] if p.get("name") == "serve"]
    assert serve_ports == [serve["http_options"]["port"]]
    for app in serve["applications"]:
        module = app["import_path"].split(":")[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert re.search(r"^ENV PYTHONPATH=/app\b", (CLUSTER / "Dockerfile").read_text(), re.M), (
        "the image must put the repository root on PYTHONPATH for Serve's import_path")


def test_check_fails_when_serving_config_changes(tmp_path):
    for rel in [path for pair in cluster_manifests.PAIRS.values() for path in pair]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    assert cluster_manifests.main(["--check", "--root", str(tmp_path)]) == 0
    serve = tmp_path / cluster_manifests.SERVE_CONFIG
    serve.write_text(serve.read_text().replace("max_replicas: 4", "max_replicas: 5", 1))
    assert cluster_manifests.main(["--check", "--root", str(tmp_path)]) == 1
    assert cluster_manifests.main(["--root", str(tmp_path)]) == 0  # regenerates
    assert cluster_manifests.main(["--check", "--root", str(tmp_path)]) == 0
    embedded = yaml.safe_load(_docs(tmp_path / cluster_manifests.RAYSERVICE)[0]["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load(serve.read_text())


def test_variant_sets_model_and_gpus_only():
    serve_text = (ROOT / cluster_manifests.SERVE_CONFIG).read_text()
    manifest = (ROOT / cluster_manifests.RAYSERVICE).read_text()
    out = cluster_manifests.render_rayservice(manifest, serve_text, model="s3://b/model", engine_gpus=1)
    got = yaml.safe_load(yaml.safe_load(out)["spec"]["serveConfigV2"])
    want = yaml.safe_load(serve_text)
    (app,) = [a for a in want["applications"] if a["name"] == "vitune"]
    app["args"]["model"] = "s3://b/model"
    (engine,) = [d for d in app["deployments"] if d["name"] == "VLMEngine"]
    engine["ray_actor_options"]["num_gpus"] = 1
    assert got == want
    assert yaml.safe_load(out)["spec"]["rayClusterConfig"] == yaml.safe_load(manifest)["spec"]["rayClusterConfig"]


def test_replace_block_scalar_keeps_the_rest():
    text = "a:\n  key: |\n    old: 1\n\n    more: 2\n  after: 3\n# tail\n"
    out = cluster_manifests.replace_block_scalar(text, "key", "# c\nnew: 1\n\nx: [1, 2]\n")
    assert yaml.safe_load(out) == {"a": {"key": "# c\nnew: 1\n\nx: [1, 2]\n", "after": 3}}
    assert out.endswith("  after: 3\n# tail\n")
    with pytest.raises(ValueError, match="one 'nokey: |' block"):
        cluster_manifests.replace_block_scalar(text, "nokey", "x")


def test_raycluster_autoscales_gpu_workers_with_token_auth():
    (cluster,) = _kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no GPU worker group"
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert max(g["maxReplicas"] for g in gpu_groups) >= 8  # the GPU presets' train.num_workers
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    for s in _cluster_specs():
        assert s["authOptions"]["mode"] == "token"


def test_images_and_versions_agree_with_pyproject():
    image_tag = _pyproject()["project"]["version"]
    images = {c["image"] for s in _cluster_specs() for c in _containers(s)}
    images.add(yaml.safe_load((CLUSTER / "aws.yaml").read_text())["docker"]["image"])
    assert len(images) == 1, f"the manifests name several images: {images}"
    assert images.pop().rsplit(":", 1)[1] == image_tag
    assert {s["rayVersion"] for s in _cluster_specs()} == {_pin("ray")}


def _pip_installs(lines: list[str]) -> list[list[str]]:
    """The arguments of every `<python> -m pip install ...` command in ``lines`` (shell lines), in order."""
    out = []
    for line in lines:
        for command in line.split("&&"):
            if "-m pip install" in command:
                out.append(shlex.split(command.split("-m pip install", 1)[1]))
    return out


def _dockerfile_runs() -> list[str]:
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    return [line[len("RUN "):] for line in text.splitlines() if line.startswith("RUN ")]


def test_dockerfile_installs_the_project_as_the_makefile_does():
    makefile = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines()]
    make_installs = _pip_installs([line for line in makefile if line.startswith("$(PY)")])
    assert make_installs, "no pip install lines in the Makefile"
    assert _pip_installs(_dockerfile_runs()) == make_installs
    torch_line = [a for a in make_installs if any(x.startswith("torch==") for x in a)][0]
    assert f"torch=={_pin('torch')}" in torch_line and f"torchvision=={_pin('torchvision')}" in torch_line
    assert re.search(r"^FROM python:3\.11\b", (CLUSTER / "Dockerfile").read_text(), re.M)


def test_ray_up_file_validates_and_installs_as_the_makefile_does():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own schema for cluster files
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert any(t["node_config"]["InstanceType"].startswith(("g5.", "p4d.", "p5.")) for t in types.values())
    makefile = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines()]
    make_installs = [a for a in _pip_installs([m for m in makefile if m.startswith("$(PY)")]) if "--upgrade" not in a]
    assert _pip_installs(config["setup_commands"]) == make_installs
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
