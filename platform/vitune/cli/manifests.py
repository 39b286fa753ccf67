"""The RayService manifest's ``serveConfigV2``, generated from ``serving/config.yaml`` (its one source of truth).

    python -m vitune.cli.manifests            # rewrite cluster/kuberay/rayservice.yaml's serveConfigV2
    python -m vitune.cli.manifests --check    # exit 1 when it differs from serving/config.yaml
    python -m vitune.cli.manifests --model s3://B/vitune/tiny/train/finetune/model --engine-gpus 1 \\
        | kubectl apply -f -                      # a deployment variant, written to stdout

The serve config is embedded verbatim (comments too) as the block scalar under ``serveConfigV2:``; the rest
of the manifest is left as written. KubeRay hands serveConfigV2 unchanged to Serve's REST API (only
``target_capacity`` is set by KubeRay, during incremental upgrades), so no key is excluded: the manifest's
serveConfigV2, parsed, equals serving/config.yaml, parsed. A variant (``--model``, ``--engine-gpus``) is
rendered from the parsed config, so it loses the comments, and goes to stdout, never into the checked-in file.
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

log = logging.getLogger(__name__)

SERVE_CONFIG = "serving/config.yaml"
RAYSERVICE = "cluster/kuberay/rayservice.yaml"
KEY = "serveConfigV2"
APP = "vitune"  # the application and deployment of serving/config.yaml that the options change
ENGINE = "VLMEngine"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]  # platform/vitune/cli/manifests.py → repository root


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


def render_rayservice(manifest_text: str, serve_text: str, model: str | None = None,
                      engine_gpus: float | None = None) -> str:
    """The RayService manifest with its serveConfigV2 generated from ``serve_text`` (+ the variant's options)."""
    out = replace_block_scalar(manifest_text, KEY, render_serve_config(serve_text, model, engine_gpus))
    embedded = yaml.safe_load(out)["spec"][KEY]
    if yaml.safe_load(embedded) != yaml.safe_load(render_serve_config(serve_text, model, engine_gpus)):
        raise ValueError(f"the embedded {KEY} does not parse back to the serve config")  # an indentation bug
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitune.cli.manifests", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help=f"exit 1 if {RAYSERVICE} is not up to date")
    p.add_argument("--model", help="the model to serve: a model folder URI or models:/NAME/VERSION")
    p.add_argument("--engine-gpus", type=float, help=f"GPUs per {ENGINE} replica (ray_actor_options.num_gpus)")
    p.add_argument("--output", "-o", help=f"where to write (default: {RAYSERVICE} in place; '-' or with "
                                          "--model/--engine-gpus: stdout)")
    p.add_argument("--root", type=Path, default=None, help="the repository root (default: this checkout)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = args.root or repo_root()
    manifest_path = root / RAYSERVICE
    current = manifest_path.read_text()
    serve_text = (root / SERVE_CONFIG).read_text()
    variant = args.model is not None or args.engine_gpus is not None
    if args.check:
        if variant:
            p.error("--check compares the checked-in manifest; it takes no --model / --engine-gpus")
        if render_rayservice(current, serve_text) != current:
            log.error("%s is stale: its %s differs from %s (run: python -m vitune.cli.manifests)",
                      RAYSERVICE, KEY, SERVE_CONFIG)
            return 1
        log.info("%s is up to date with %s", RAYSERVICE, SERVE_CONFIG)
        return 0
    out = render_rayservice(current, serve_text, args.model, args.engine_gpus)
    target = args.output or ("-" if variant else str(manifest_path))
    if target == "-":
        sys.stdout.write(out)
    else:
        Path(target).write_text(out)
        log.info("wrote %s (%s from %s)", target, KEY, SERVE_CONFIG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
