"""The RayService manifests' ``serveConfigV2``, generated from their serve configs (the one source of truth).

Two pairs: ``serving/config.yaml`` (vitune's engine) → ``cluster/kuberay/rayservice.yaml``, and
``serving/vllm.yaml`` (Ray Serve LLM / vLLM over a llava-hf export) → ``cluster/kuberay/rayservice-vllm.yaml``.

    python -m vitune.cli.manifests            # rewrite both manifests' serveConfigV2
    python -m vitune.cli.manifests --check    # exit 1 when either differs from its serve config
    python -m vitune.cli.manifests --model s3://B/vitune/tiny/train/finetune/model --engine-gpus 1 \\
        | kubectl apply -f -                      # a deployment variant, written to stdout
    python -m vitune.cli.manifests --vllm --model s3://B/vitune/tiny/export/llava-hf | kubectl apply -f -

The serve config is embedded verbatim (comments too) as the block scalar under ``serveConfigV2:``; the rest
of the manifest is left as written. KubeRay hands serveConfigV2 unchanged to Serve's REST API (only
``target_capacity`` is set by KubeRay, during incremental upgrades), so no key is excluded: the manifest's
serveConfigV2, parsed, equals serving/config.yaml, parsed. A variant (``--model``, ``--engine-gpus``) is
rendered from the parsed config, so it loses the comments, and goes to stdout, never into the checked-in file.
The vLLM variant (``--vllm --model``) points every LLM config at the exported folder.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vitune.cli.repo import RepositoryNotFound, find_repo_root
from vitune.config import MODELS_SCHEME
from vitune.references import llava_hf_export_uri

log = logging.getLogger(__name__)

SERVE_CONFIG = "serving/config.yaml"
RAYSERVICE = "cluster/kuberay/rayservice.yaml"
KEY = "serveConfigV2"
APP = "vitune"  # the application and deployment of serving/config.yaml that the options change
ENGINE = "VLMEngine"
VLLM_SERVE_CONFIG = "serving/vllm.yaml"
VLLM_RAYSERVICE = "cluster/kuberay/rayservice-vllm.yaml"
VLLM_APP = "vllm"  # the Ray Serve LLM application of serving/vllm.yaml


def replace_block_scalar(text: str, key: str, value: str) -> str:
    """``text`` with the literal block scalar ``key: |`` replaced by ``value``, indented under the key."""
    lines = text.splitlines(keepends=True)
    header = re.compile(rf"^(?P<indent> *){re.escape(key)}: *\|[-+]?\d? *$")
    matches = [i for i, line in enumerate(lines) if header.match(line.rstrip("\r\n"))]
    if len(matches) != 1:
        raise ValueError(f"expected one '{key}: |' block in the manifest, found {len(matches)}")
    start = matches[0]
    indent = len(header.match(lines[start].rstrip("\r\n")).group("indent"))
    end = start + 1  # the block is every following line that is blank or indented deeper than the key
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # trailing blank lines belong to what follows
        end -= 1
    pad = " " * (indent + 2)
    body = [pad + line + "\n" if line.strip() else "\n" for line in value.rstrip("\n").split("\n")]
    return "".join([*lines[:start], f"{' ' * indent}{key}: |\n", *body, *lines[end:]])


def _engine_deployment(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    apps = {a.get("name"): a for a in config.get("applications", [])}
    if APP not in apps:
        raise ValueError(f"{SERVE_CONFIG} has no application {APP!r} (have: {sorted(apps)})")
    deployments = {d.get("name"): d for d in apps[APP].get("deployments", [])}
    if ENGINE not in deployments:
        raise ValueError(f"application {APP!r} has no deployment {ENGINE!r} (have: {sorted(deployments)})")
    return apps[APP], deployments[ENGINE]


def render_serve_config(serve_text: str, model: str | None = None, engine_gpus: float | None = None) -> str:
    """The serve config text: verbatim without options; with them, the parsed config changed and re-dumped."""
    if model is None and engine_gpus is None:
        return serve_text
    config = copy.deepcopy(yaml.safe_load(serve_text))
    app, engine = _engine_deployment(config)
    if model is not None:
        app.setdefault("args", {})["model"] = model
    if engine_gpus is not None:
        engine.setdefault("ray_actor_options", {})["num_gpus"] = engine_gpus
    return yaml.safe_dump(config, sort_keys=False)


def embed_serve_config(manifest_text: str, serve_text: str) -> str:
    """The RayService manifest with ``serve_text`` as its serveConfigV2, checked to parse back to it."""
    out = replace_block_scalar(manifest_text, KEY, serve_text)
    if yaml.safe_load(yaml.safe_load(out)["spec"][KEY]) != yaml.safe_load(serve_text):
        raise ValueError(f"the embedded {KEY} does not parse back to the serve config")  # an indentation bug
    return out


def render_rayservice(manifest_text: str, serve_text: str, model: str | None = None,
                      engine_gpus: float | None = None) -> str:
    """The RayService manifest with its serveConfigV2 generated from ``serve_text`` (+ the variant's options)."""
    return embed_serve_config(manifest_text, render_serve_config(serve_text, model, engine_gpus))


def render_vllm_serve_config(serve_text: str, model: str | None = None) -> str:
    """serving/vllm.yaml's text: verbatim without ``model``; with it, every LLM config serves that exported folder.

    A local folder's ``chat_template.jinja`` is named explicitly; for a remote one (``s3://``) the key is dropped:
    Ray Serve LLM downloads the folder to a cache path of its own, and vLLM then applies that folder's
    chat_template.jinja itself (the processor's, else the tokenizer's chat template: the same file).
    """
    if model is None:
        return serve_text
    config = copy.deepcopy(yaml.safe_load(serve_text))
    apps = {a.get("name"): a for a in config.get("applications", [])}
    if VLLM_APP not in apps:
        raise ValueError(f"{VLLM_SERVE_CONFIG} has no application {VLLM_APP!r} (have: {sorted(apps)})")
    for llm in apps[VLLM_APP]["args"]["llm_configs"]:
        llm["model_loading_config"]["model_source"] = model
        engine = llm.setdefault("engine_kwargs", {})
        engine.pop("chat_template", None)
        if "://" not in model:
            engine["chat_template"] = f"{model.rstrip('/')}/chat_template.jinja"
    return yaml.safe_dump(config, sort_keys=False)


def render_vllm_rayservice(manifest_text: str, serve_text: str, model: str | None = None) -> str:
    """The vLLM RayService manifest with its serveConfigV2 generated from serving/vllm.yaml (+ ``model``)."""
    return embed_serve_config(manifest_text, render_vllm_serve_config(serve_text, model))


PAIRS = {"vitune": (SERVE_CONFIG, RAYSERVICE), "vllm": (VLLM_SERVE_CONFIG, VLLM_RAYSERVICE)}  # serve config → manifest


def _render(name: str, manifest_text: str, serve_text: str, model: str | None = None,
            engine_gpus: float | None = None) -> str:
    if name == "vllm":
        return render_vllm_rayservice(manifest_text, serve_text, model)
    return render_rayservice(manifest_text, serve_text, model, engine_gpus)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitune.cli.manifests", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help=f"exit 1 if {RAYSERVICE} or {VLLM_RAYSERVICE} is not up "
                                                        "to date")
    p.add_argument("--vllm", action="store_true", help=f"only {VLLM_RAYSERVICE} (from {VLLM_SERVE_CONFIG}); with "
                                                       "--model, its variant serving that exported folder")
    p.add_argument("--model", help="the model to serve: a model folder URI or models:/NAME/VERSION (with --vllm: "
                                   "an exported llava-hf folder, local or s3://, or models:/NAME/VERSION: the "
                                   "export its finetune run carries)")
    p.add_argument("--tracking-uri", help="MLflow for --vllm --model models:/... (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--engine-gpus", type=float, help=f"GPUs per {ENGINE} replica (ray_actor_options.num_gpus)")
    p.add_argument("--output", "-o", help=f"where to write (default: {RAYSERVICE} and {VLLM_RAYSERVICE} in place; "
                                          "'-' or with --model/--engine-gpus: stdout)")
    p.add_argument("--root", type=Path, default=None, help="the repository root (default: found from the cwd, "
                                                           "else the checkout vitune is installed from)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.vllm and args.engine_gpus is not None:
        p.error("--engine-gpus sizes vitune's engine; a vLLM replica takes the GPUs of its engine_kwargs")
    try:
        root = args.root or find_repo_root()
    except RepositoryNotFound as exc:
        log.error("%s", exc)
        return 2
    if args.vllm and args.model and args.model.startswith(MODELS_SCHEME):
        args.model = llava_hf_export_uri(args.model, args.tracking_uri)
        log.info("serving the llava-hf export %s", args.model)
    variant = args.model is not None or args.engine_gpus is not None
    names = ["vllm"] if args.vllm else (["vitune"] if variant or args.output else list(PAIRS))
    if args.check:
        if variant:
            p.error("--check compares the checked-in manifests; it takes no --model / --engine-gpus")
        stale = []
        for name in names:
            serve_rel, manifest_rel = PAIRS[name]
            current = (root / manifest_rel).read_text()
            if _render(name, current, (root / serve_rel).read_text()) != current:
                log.error("%s is stale: its %s differs from %s (run: python -m vitune.cli.manifests)",
                          manifest_rel, KEY, serve_rel)
                stale.append(name)
            else:
                log.info("%s is up to date with %s", manifest_rel, serve_rel)
        return 1 if stale else 0
    for name in names:
        serve_rel, manifest_rel = PAIRS[name]
        out = _render(name, (root / manifest_rel).read_text(), (root / serve_rel).read_text(), args.model,
                      args.engine_gpus)
        target = args.output or ("-" if variant else str(root / manifest_rel))
        if target == "-":
            sys.stdout.write(out)
        else:
            Path(target).write_text(out)
            log.info("wrote %s (%s from %s)", target, KEY, serve_rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
