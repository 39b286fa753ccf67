"""Shared fixtures: one S3 server, one MLflow server and one local Ray per test session, started lazily."""

from __future__ import annotations

import os

import pytest

from tests import services
from tests.e2e import background

TEST_BUCKET = "vitune-test"

# The session runs unit tests first, then integration, then e2e: the e2e demo (tests/e2e/background.py) starts
# when collection finishes and runs beside the rest, so the e2e tests go last and find it done. Within
# integration, the files that time things or start a cluster of their own go last, when the demo has finished
# and the machine is quieter again.
_LATE_INTEGRATION = ("test_train.py", "test_submit_two_node.py", "test_generate_feeds_pipeline.py",
                     "test_serving.py", "test_serving_faults.py", "test_autoscaling.py")


def _rank(item: pytest.Item) -> tuple[int, int]:
    parts = item.path.parts
    if "e2e" in parts:
        return (3, 0)
    if "integration" in parts:
        name = item.path.name
        return (2, _LATE_INTEGRATION.index(name) + 1) if name in _LATE_INTEGRATION else (2, 0)
    return (1, 0)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_rank)  # stable: the order within a file and among equal ranks stays as collected


def pytest_collection_finish(session):
    selected = any("e2e" in item.path.parts for item in session.items)
    if selected and not session.config.option.collectonly and not getattr(session.config.option, "setuponly", False):
        background.start_once()


def pytest_sessionfinish(session, exitstatus):
    background.stop()


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def s3_server(services_dir):
    """A moto S3 server on loopback; sets AWS_ENDPOINT_URL and test credentials for the session."""
    svc = services.start_s3(services_dir)
    old = {k: os.environ.get(k) for k in [*services.S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(services.S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = svc.url
    services.create_bucket(svc.url, TEST_BUCKET)
    services.create_bucket(svc.url, "vitune-mlflow")
    yield svc.url
    svc.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_bucket(s3_server) -> str:
    return f"s3://{TEST_BUCKET}"


@pytest.fixture(scope="session")
def mlflow_server(s3_server, services_dir):
    """An MLflow tracking server (SQLite backend, artifacts on the S3 server)."""
    svc = services.start_mlflow(services_dir, s3_server, "vitune-mlflow")
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_server
    yield svc.url
    svc.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session; started after the S3 env so workers inherit it."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_pythonpath())}})
    yield ray
    ray.shutdown()


def _pythonpath() -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [os.path.join(root, "platform"), root]


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> str:
    """A model folder of the tiny preset (random weights, tiny tokenizer and tower), saved once per session."""
    from vitune.config import ModelConfig
    from vitune.data.tokenizer import load_tokenizer
    from vitune.model.folder import save_model_folder
    from vitune.model.vision import load_vision_tower
    from vitune.model.vlm import build_model

    cfg = ModelConfig()
    tokenizer = load_tokenizer("tiny")
    tower = load_vision_tower(cfg.vision)
    model = build_model(cfg, tokenizer, tower.hidden_size)
    folder = tmp_path_factory.mktemp("tiny_model") / "model"
    return save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(folder))


class ServeHTTP:
    """Ray Serve on a loopback port for the session; `deploy` runs an app of `serving.app` under a prefix."""

    def __init__(self, url: str) -> None:
        self.url = url

    def deploy(self, name: str, route_prefix: str, args: dict, engine_options: dict | None = None,
               api_options: dict | None = None) -> str:
        from ray import serve

        from serving.app import make_app

        engine_options = {"ray_actor_options": {"num_cpus": 0.5}, **(engine_options or {})}
        api_options = {"ray_actor_options": {"num_cpus": 0.25}, **(api_options or {})}
        serve.run(make_app(args, engine_options, api_options), name=name, route_prefix=route_prefix)
        return self.url + route_prefix.rstrip("/")


@pytest.fixture(scope="session")
def serve_http(ray_local):
    """Serve's HTTP proxy on 127.0.0.1 and a free port, shared by the serving tests of the session."""
    from ray import serve

    port = services.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield ServeHTTP(f"http://127.0.0.1:{port}")
    serve.shutdown()


@pytest.fixture(scope="session")
def chat_app(serve_http, tiny_model_folder) -> str:
    """The tiny model served at `/` (app `vitune`, no auth, small image limits for the tests); its base URL."""
    return serve_http.deploy("vitune", "/", {
        "model": tiny_model_folder,
        "served_model_name": "vitune-tiny",
        "max_image_bytes": 200_000,
        "max_image_pixels": 1_000_000,
    })
