"""Auth by default: no key beyond loopback refuses to start; the key never sits in Serve args; the RayService
reads it from a Kubernetes Secret; the queue limits are derived the same way from YAML and from `build_app`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from vitune.config import API_KEY_ENV, ServeConfig
from vitune.serve.app import check_auth_setup, queue_options

ROOT = Path(__file__).parents[3]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::", "my-node.internal", None])
def test_binding_beyond_loopback_without_a_key_refuses_to_start(monkeypatch, host):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=API_KEY_ENV):
        check_auth_setup(ServeConfig(model="m"), host)
    check_auth_setup(ServeConfig(model="m", allow_unauthenticated=True), host)  # said explicitly
    monkeypatch.setenv(API_KEY_ENV, "k")
    check_auth_setup(ServeConfig(model="m"), host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_key(monkeypatch, host):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    check_auth_setup(ServeConfig(model="m"), host)


def test_the_key_is_never_an_arg():
    with pytest.raises(ValueError, match=API_KEY_ENV):
        ServeConfig.model_validate({"model": "m", "api_key": "s3cret"})


def test_the_rayservice_takes_the_key_from_a_secret():
    manifest = yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]["name"] == "vitune-api-key"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # hence the key is required
    for app in serve_config["applications"]:
        assert "api_key" not in app["args"] and "runtime_env" not in app
        assert not app["args"].get("allow_unauthenticated")


def test_queue_limits_are_consistent_end_to_end():
    cfg = ServeConfig(model="m", max_batch_size=8, max_queued=4, max_pending_requests=20)
    engine, api = queue_options(cfg)
    # an engine replica holds a full batch plus its own queue; callers hold a bounded queue, then 503
    assert engine == {"max_ongoing_requests": 12, "max_queued_requests": 20}
    # the proxy's queue for the ingress is kept well above the engine's: its refusal has no Retry-After
    assert api["max_queued_requests"] >= 4 * 20


def test_the_demo_sends_the_key_when_one_is_set(monkeypatch):
    """`vitune demo`'s request carries `VITUNE_API_KEY` (it failed with 401 when the key was set)."""
    import http.server
    import json
    import threading

    from vitune.cli import demo

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == "Bearer k3y"
            data = json.dumps({"choices": [{"message": {"content": "red"}}]} if ok else {"error": {}}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(API_KEY_ENV, "k3y")
        reply = demo.ask(f"http://127.0.0.1:{server.server_address[1]}", "m", b"png", "colour?")
    finally:
        server.shutdown()
    assert seen == ["Bearer k3y"] and reply["choices"][0]["message"]["content"] == "red"


def test_the_body_limit_is_enforced_while_reading():
    """A chunked body (no Content-Length) is refused once it passes the limit: the rest is never read."""
    from starlette.requests import Request

    from vitune.serve.app import read_json_body
    from vitune.serve.openai import APIError

    pulled: list[int] = []

    async def receive() -> dict:
        pulled.append(1)
        return {"type": "http.request", "body": b" " * 1000, "more_body": len(pulled) < 1000}

    def request(content_type: bytes = b"application/json") -> Request:
        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", content_type)]}
        return Request(scope, receive)

    with pytest.raises(APIError) as info:
        asyncio.run(read_json_body(request(), max_body=10_000))
    assert info.value.status == 413 and len(pulled) == 11  # 11 kB read of the 1 MB sent
    with pytest.raises(APIError) as info:
        asyncio.run(read_json_body(request(b"text/plain"), max_body=10_000))
    assert info.value.status == 415
    pulled.clear()
    assert len(asyncio.run(read_json_body(request(b"application/json; charset=utf-8"), max_body=10**7))) == 10**6
