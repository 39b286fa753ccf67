"""Shared fixtures: one S3 server, one MLflow server and one local Ray per test session, started lazily."""

from __future__ import annotations

import os

import pytest

from tests import services

TEST_BUCKET = "vitune-test"


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
