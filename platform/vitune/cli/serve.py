"""``vitune serve MODEL``: the packaged Serve application (OpenAI-compatible API and chat page) on local Ray.

MODEL is a model folder (local or ``s3://``) or ``models:/NAME/VERSION`` (also ``NAME@ALIAS``, ``NAME/latest``)
from the MLflow registry. The application's settings are ``serving/config.yaml``'s — ``ServeConfig``'s
defaults — or, with ``--config``, the ``args`` of the first application of a Serve config file (MODEL
replacing its ``model``). Prints the API's URL, the chat page and what is served; runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

import yaml

from vitune import progress, storage
from vitune.config import MODELS_SCHEME, RayConfig, ServeConfig
from vitune.runtime import init_ray

log = logging.getLogger(__name__)

APP_NAME = "vitune"  # the Serve application's name, as in serving/config.yaml
EXAMPLE = """examples:
  vitune serve ./runs/tiny/train/finetune/model
  vitune serve models:/vitune-tiny/1 --tracking-uri sqlite:///runs/tiny/mlflow.db --port 8001
  VITUNE_API_KEY=secret vitune serve models:/vitune-tiny@prod --host 0.0.0.0"""


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def app_args(model: str, config: str | None = None, name: str | None = None,
             tracking_uri: str | None = None) -> dict[str, Any]:
    """The application's ``args``: a Serve config file's (or the defaults) with MODEL and the options given."""
    args: dict[str, Any] = {}
    if config:
        raw = yaml.safe_load(storage.read_text(config)) or {}
        apps = raw.get("applications") or [{}]
        args = dict(apps[0].get("args") or {})
        args.pop("served_model_name", None)  # the config's name belongs to the config's model
    args["model"] = model
    if name:
        args["served_model_name"] = name
    if tracking_uri:
        args["tracking_uri"] = tracking_uri
    ServeConfig.model_validate(args)  # a bad setting fails here, before Ray starts
    return args


def serve_model(args: dict[str, Any], port: int, host: str = "127.0.0.1") -> str:
    """Deploy the packaged Serve application with ``args`` (``ServeConfig`` fields) on this Ray; its URL."""
    from ray import serve  # deferred: `vitune --help` and the unit tests of this module need no Ray

    from vitune.serve.app import build_app  # deferred: imports Ray Serve and FastAPI

    app = build_app(args)
    serve.start(http_options={"host": host, "port": port})
    progress.route_ray_logs()  # Serve adds its own console handlers on start
    serve.run(app, name=APP_NAME, route_prefix="/")
    progress.route_ray_logs()  # and any it added while deploying
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def describe(args: dict[str, Any]) -> str:
    """What is served, for the banner: the registry version a ``models:/`` reference resolves to."""
    model = args["model"]
    if not model.startswith(MODELS_SCHEME):
        return model
    from vitune.lineage import registry_lineage

    try:
        info = registry_lineage(model, args.get("tracking_uri"))
    except Exception as exc:  # noqa: BLE001 - the replicas resolve it again and fail loudly if it is wrong
        log.warning("could not look up %s in the registry: %s", model, exc)
        return model
    return f"{model} = version {info['version']} of {info['registered_model']} (MLflow run {info['run_id']})"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vitune serve", description=__doc__.splitlines()[0], epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder (local or s3://) or models:/NAME/VERSION")
    p.add_argument("--config", default=None, help="a Serve config file whose first application's args to use "
                   "(default: serving/config.yaml's settings, ServeConfig's defaults)")
    p.add_argument("--name", default=None, help="the model name clients send (default: the registry name, "
                   "else the folder's name)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ (else MLFLOW_TRACKING_URI)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves beyond this machine (needs VITUNE_API_KEY)")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    serve_args = app_args(args.model, args.config, args.name, args.tracking_uri)
    what = describe(serve_args)
    # "local": a fresh local Ray unless RAY_ADDRESS names a cluster (never one a stray `ray start` left behind)
    init_ray(RayConfig(address=os.environ.get("RAY_ADDRESS") or "local"), include_dashboard=False)
    url = serve_model(serve_args, args.port, args.host)
    name = ServeConfig.model_validate(serve_args).model_name()
    _out(f"serving {what} as {name!r}")
    _out(f"  API        {url}/v1  (OpenAI-compatible: POST {url}/v1/chat/completions, GET {url}/v1/models)")
    _out(f"  chat page  {url}/")
    ray_log = progress.ray_log_file()
    _out(f"  logs       {ray_log + ' (Ray), ' if ray_log else ''}{progress.ray_session_logs()} (Ray's workers)")
    _out("Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _out("stopping ...")
    from ray import serve  # deferred: see serve_model

    serve.shutdown()
    return 0
