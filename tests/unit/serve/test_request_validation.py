"""Request checks of the served API without Ray: OpenAI's strictness, parameter ranges, JSON, text and image
limits, images fitted to the tower in the API replica, and the remote-image address policy (loopback only)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading
import time

import pytest
from PIL import Image

from vitune.config import RemoteImagesConfig, ServeConfig
from vitune.serve.openai import APIError, parse_json, parse_request
from vitune.serve.request import chat_request_from_openai, fit_to_tower, load_image, refused_address

GOOD = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}


def refused(**overrides) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request({**GOOD, **overrides})
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


@pytest.mark.parametrize(("field", "value"), [
    ("seed", 2**70), ("seed", -(2**63) - 1), ("seed", "1"), ("seed", 1.0),
    ("temperature", "0.5"), ("temperature", True), ("top_p", "1"), ("max_tokens", 8.0), ("max_tokens", True),
    ("max_tokens", 2**40), ("stream", "true"), ("stream", 1), ("n", True), ("model", 5), ("stop", ["x" * 257]),
    ("stop", 7), ("logprobs", "yes"),
])
def test_types_are_not_coerced_and_ranges_are_checked(field, value):
    assert (refused(**{field: value}).param or "").startswith(field)


def test_the_seed_range_is_int64_and_nulls_take_the_defaults():
    for seed in (-(2**63), 2**63 - 1, 0):
        assert parse_request({**GOOD, "seed": seed}).seed == seed
    req = parse_request({**GOOD, "temperature": None, "top_p": None, "stream": None, "n": None})
    assert req.sampling == (1.0, 1.0) and not req.stream


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,", "detail": "ultra"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": 1, "content": "hi"}],
], ids=["url-as-string", "bad-detail", "text-not-a-string", "role-not-a-string"])
def test_content_parts_as_strict_as_openai(messages):
    assert (refused(messages=messages).param or "").startswith("messages[0]")


@pytest.mark.parametrize("message", [
    {"role": "user", "content": None}, {"role": "user"}, {"role": "system", "content": None},
], ids=["user-null", "user-missing", "system-null"])
def test_a_message_without_content_is_a_400_as_openai_answers_it(message):
    err = refused(messages=[message])
    assert err.param == "messages[0]" and "needs content" in err.message, (err.param, err.message)
    # an assistant message may leave it out (OpenAI: it then carries tool calls); the rest of the request decides
    req = parse_request({**GOOD, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                                              {"role": "user", "content": "b"}]})
    assert req.messages[1].content is None


def test_stream_options_need_stream():
    refused(stream_options={"include_usage": True})
    assert parse_request({**GOOD, "stream": True, "stream_options": {"include_usage": True}}).include_usage


@pytest.mark.parametrize("raw", [b'{"temperature": NaN, "messages": []}', b'{"a": Infinity}', b"[" * 100_000,
                                 b'{"seed": ' + b"9" * 5000 + b"}", b"\xff\xfe", b'{"a": 1', b""])
def test_bodies_the_json_parser_cannot_handle_are_400(raw):
    with pytest.raises(APIError) as info:
        parse_json(raw)
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_text_is_limited_for_text():
    cfg = ServeConfig(model="unused", max_text_chars=1000)
    req = parse_request({**GOOD, "messages": [{"role": "system", "content": "s" * 600},
                                              {"role": "user", "content": "u" * 600}]})
    with pytest.raises(APIError) as info:
        asyncio.run(chat_request_from_openai(req, cfg))
    assert info.value.status == 413 and info.value.code == "request_too_large"


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("fmt", ["PPM", "TIFF", "ICO", "TGA"])
def test_only_common_image_formats_are_decoded(fmt):
    data = encoded(Image.new("RGB", (16, 16), (10, 200, 30)), fmt)
    with pytest.raises(APIError) as info:
        asyncio.run(load_image(data_url(data), ServeConfig(model="unused")))
    assert info.value.status == 400 and info.value.code == "invalid_image" and "PNG" in info.value.message


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_images_are_fitted_to_the_tower_in_the_api_replica(mode):
    """The API replica hands the engine a tower-sized image whose preprocessing equals the original's."""
    from vitune.config import VisionConfig
    from vitune.model.vision import load_vision_tower

    tower = load_vision_tower(VisionConfig(image_mode=mode))
    geometry = {"image_size": tower.image_size, "image_mean": list(tower.mean), "image_mode": tower.image_mode}
    big = Image.effect_noise((2400, 1300), 60).convert("RGB")
    fitted = asyncio.run(load_image(data_url(encoded(big, "PNG")), ServeConfig(model="unused"), geometry=geometry))
    assert fitted.size == (tower.image_size, tower.image_size)
    assert fit_to_tower(fitted, geometry).tobytes() == fitted.tobytes()  # the engine's pass changes nothing
    assert tower.preprocess(fitted).equal(tower.preprocess(big))


# -- remote images: refused before any connection, or fetched from a loopback listener --

def policy(**kwargs) -> ServeConfig:
    remote = RemoteImagesConfig(enabled=True, **kwargs)
    return ServeConfig(model="unused", max_image_bytes=50_000, remote_images=remote)


def code_of(url: str, cfg: ServeConfig) -> str:
    try:
        asyncio.run(load_image(url, cfg))
    except APIError as err:
        assert err.status == 400
        return err.code
    return "ok"


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254",
                                     "fe80::1", "fd00:ec2::254", "fc00::1", "100.100.100.200", "0.0.0.0",
                                     "::ffff:127.0.0.1", "224.0.0.1", "fec0::1"])
def test_non_public_addresses_are_refused(address):
    assert refused_address(address)
    literal = f"[{address}]" if ":" in address else address
    # allow-listed by host, still refused by address: getaddrinfo of a literal sends nothing
    assert code_of(f"http://{literal}/cat.png", policy(allowed_hosts=[address])) == "image_url_not_allowed"


def test_public_addresses_pass_the_address_check():
    assert refused_address("93.184.216.34") is None and refused_address("2606:2800:220:1::1") is None


def test_names_resolving_to_loopback_ports_and_credentials_are_refused():
    assert code_of("http://localhost/cat.png", policy(allowed_hosts=["localhost"])) == "image_url_not_allowed"
    # a non-standard port is refused before the name is even resolved
    assert code_of("https://images.example.com:8443/cat.png",
                   policy(allowed_hosts=["images.example.com"])) == "image_url_not_allowed"
    assert code_of("http://user:pw@93.184.216.34/cat.png",
                   policy(allowed_hosts=["93.184.216.34"])) == "image_url_not_allowed"
    assert code_of("s3://other-bucket/cat.png", policy(allowed_buckets=["mine"])) == "image_url_not_allowed"
    # hostnames and buckets are separate allow-lists
    assert code_of("s3://mine/cat.png", policy(allowed_hosts=["mine"])) == "image_url_not_allowed"


@pytest.fixture()
def loopback_images():
    png = encoded(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG")
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Host", ""))
            if self.path == "/slow.png":  # headers at once, then a body that trickles past the deadline
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(30):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:  # the client gave up at its deadline
                    pass
                return
            data = {"/red.png": png, "/big.png": b"\0" * 60_000}.get(self.path)
            self.send_response(200 if data else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()


def test_loopback_fetch_when_allowed_pins_the_address_and_keeps_limits(loopback_images):
    port, seen = loopback_images
    base = f"http://127.0.0.1:{port}"
    open_cfg = policy(allowed_hosts=["127.0.0.1"], allowed_ports=[port], allow_private_addresses=True, timeout_s=1.0)
    assert code_of(f"{base}/red.png", open_cfg) == "ok"
    assert seen == [f"127.0.0.1:{port}"]  # the Host header names the URL's host, not the pinned address
    assert code_of(f"{base}/red.png", policy(allowed_hosts=["127.0.0.1"], allowed_ports=[port])) == \
        "image_url_not_allowed"  # loopback needs allow_private_addresses
    assert code_of(f"{base}/red.png", policy(allowed_hosts=["127.0.0.1"], allow_private_addresses=True)) == \
        "image_url_not_allowed"  # and its port allowed
    assert code_of(f"{base}/big.png", open_cfg) == "image_too_large"
    assert code_of(f"{base}/missing.png", open_cfg) == "image_fetch_failed"
    started = time.monotonic()
    assert code_of(f"{base}/slow.png", open_cfg) == "image_fetch_failed"  # one deadline for the whole fetch
    assert time.monotonic() - started < 2.0
