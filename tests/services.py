"""Real services for tests: an S3-compatible server (moto server mode) and an MLflow tracking server.

Each starts as a subprocess on 127.0.0.1 and a free port, is waited on until healthy, and is stopped by
the caller (the pytest fixtures in conftest.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception as exc:  # noqa: BLE001 - any failure means not up yet
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout}s: {last}")


@dataclass
class Service:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _start(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_s3(workdir: Path) -> Service:
    port = free_port()
    log_path = workdir / "moto.log"
    proc = _start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log_path)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/moto-api/", proc=proc)
    return Service(url, proc, log_path)


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items()
                                                       if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass


def start_mlflow(workdir: Path, s3_endpoint: str, artifact_bucket: str, port: int | None = None) -> Service:
    port = port or free_port()  # a given port: a restart of the same server (the same store under workdir)
    log_path = workdir / "mlflow.log"
    env = dict(os.environ, **S3_ENV, MLFLOW_S3_ENDPOINT_URL=s3_endpoint, AWS_ENDPOINT_URL=s3_endpoint,
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{artifact_bucket}/mlflow",
    ]
    proc = _start(cmd, log_path, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", timeout=180, proc=proc)
    return Service(url, proc, log_path)
