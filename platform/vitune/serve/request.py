"""An OpenAI chat request → a checked vitune conversation (`ChatRequest`), its images fetched, decoded and fitted.

Runs in the API replica: every client mistake here is an `APIError` 4xx naming the field. A request holds up to
`max_images_per_request` images (`image_url` parts, in any user message); each becomes one `<image>` placeholder
in its message's turn, in order over the messages. Images are decoded only from common formats, refused from
their header's size before any pixel is decoded (`max_image_pixels`; PIL's decompression-bomb guard answers the
same way), and fitted to the tower's input here (a pad/crop tower's square, an anyres tower's base view for
`detail: low`), so a model replica never handles a large one.
Remote image URLs (off by default) are checked before any connection: allow-listed host or bucket, default
port, every resolved address public; the connection is pinned to the checked address, under one deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import logging
import socket
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import ParseResult, urlparse

import httpx
from PIL import Image, UnidentifiedImageError

from vitune import GPT, HUMAN, IMAGE_TOKEN, storage
from vitune.config import RemoteImagesConfig, ServeConfig
from vitune.data.prompt import image_first
from vitune.model.image import ImageError, base_view, decode_image, fit_to_square
from vitune.serve.openai import APIError, ChatCompletionRequest, ImagePart

logger = logging.getLogger(__name__)

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what clients send; PIL's rarer decoders stay shut
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass
class ChatRequest:
    """A checked chat request in vitune's terms (what crosses from the API replica to a model replica)."""

    turns: list[dict[str, str]]  # {"from": "human"|"gpt", "value": ...}; a turn's images' <image>\n come first
    system: str | None = None
    images: list[Image.Image] = field(default_factory=list)  # in the order of their <image> placeholders
    # OpenAI's `image_url.detail` of each image (None: not given = auto); "low" = the base view alone
    details: list[str | None] = field(default_factory=list)
    max_tokens: int | None = None  # None = default_max_tokens, capped by the context left
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    model: str | None = None  # the served name asked for (a LoRA adapter's, see vitune.serve.adapters); None = default

    def __post_init__(self) -> None:
        if not self.details:
            self.details = [None] * len(self.images)
        if len(self.details) != len(self.images):
            raise ValueError(f"{len(self.details)} image details for {len(self.images)} images")


def _host_allowed(host: str, allowed: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith(".") and (host == entry[1:] or host.endswith(entry)):
            return True
        if host == entry:
            return True
    return False


def refused_address(address: str) -> str | None:
    """Why an image may not be fetched from `address` (loopback, private, link-local, ...), or None when public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for reason, hit in (("a loopback", ip.is_loopback), ("a link-local (cloud metadata)", ip.is_link_local),
                        ("an unspecified", ip.is_unspecified), ("a multicast", ip.is_multicast),
                        ("a private or unique-local", ip.is_private), ("a reserved", ip.is_reserved),
                        ("a site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)):
        if hit:
            return f"{reason} address"
    if not ip.is_global:  # shared address space (100.64/10, where some clouds put their metadata), ...
        return "a non-public address"
    return None


def _decode_data_url(url: str, max_bytes: int, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise APIError(400, "a data: URL needs a ',' before its payload", param, "invalid_image_url")
    if not header.endswith(";base64"):
        raise APIError(400, "image data: URLs must be base64 encoded (data:image/png;base64,...)", param,
                       "invalid_image_url")
    payload = payload.strip()
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise APIError(400, f"the image is about {len(payload) * 3 // 4} bytes, over the limit of {max_bytes}",
                       param, "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the image data: URL is not valid base64", param, "invalid_base64") from None


def _not_allowed(message: str, param: str) -> APIError:
    return APIError(400, message, param, "image_url_not_allowed")


async def _pinned_address(parsed: ParseResult, policy: RemoteImagesConfig, param: str) -> tuple[str, int]:
    """Check an http(s) URL's host, port and every address it resolves to; the one address to connect to."""
    host = (parsed.hostname or "").rstrip(".")
    if parsed.username is not None or parsed.password is not None:
        raise _not_allowed("image URLs must not carry credentials", param)
    if not host or not _host_allowed(host, policy.allowed_hosts):
        raise _not_allowed(f"image host {host!r} is not in this server's allow-list", param)
    try:
        port = parsed.port or _DEFAULT_PORTS[parsed.scheme]
    except ValueError:
        raise APIError(400, "the image URL's port is not a number", param, "invalid_image_url") from None
    if port != _DEFAULT_PORTS[parsed.scheme] and port not in policy.allowed_ports:
        raise _not_allowed(f"image URLs on port {port} are not accepted (only {_DEFAULT_PORTS[parsed.scheme]} "
                           f"for {parsed.scheme})", param)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise APIError(400, f"image host {host!r} does not resolve", param, "image_fetch_failed") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not policy.allow_private_addresses:
        for address in addresses:  # every one: a name may resolve to a public and a private address
            reason = refused_address(address)
            if reason:
                raise _not_allowed(f"image host {host!r} resolves to {reason}", param)
    return addresses[0], port


async def _fetch_http(url: str, cfg: ServeConfig, param: str) -> bytes:
    parsed = urlparse(url)
    address, port = await _pinned_address(parsed, cfg.remote_images, param)
    # connect to the address just checked (no second lookup that could answer differently); the Host header
    # and TLS name stay the URL's
    literal = f"[{address}]" if ":" in address else address
    pinned = parsed._replace(netloc=f"{literal}:{port}").geturl()
    headers = {"Host": parsed.netloc.rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": parsed.hostname} if parsed.scheme == "https" else {}
    limit = cfg.max_image_bytes
    # no redirects: a redirect could lead off the allow-list
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        async with client.stream("GET", pinned, headers=headers, extensions=extensions) as resp:
            if resp.status_code != 200:
                raise APIError(400, f"fetching the image returned HTTP {resp.status_code}", param,
                               "image_fetch_failed")
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise APIError(400, f"the image is {declared} bytes, over the limit of {limit}", param,
                               "image_too_large")
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > limit:  # stop reading: the size is all the error needs
                    raise APIError(400, f"the image is over the limit of {limit} bytes", param, "image_too_large")
                chunks.append(chunk)
    return b"".join(chunks)


def _read_s3(url: str, limit: int, param: str) -> bytes:
    fs, path = storage.resolve(url)
    size = fs.get_file_info(path).size
    if size is None:
        raise APIError(400, "the image object does not exist", param, "image_fetch_failed")
    if size > limit:  # checked before reading a byte of it
        raise APIError(400, f"the image is {size} bytes, over the limit of {limit}", param, "image_too_large")
    return storage.read_bytes(url)


async def _fetch(url: str, cfg: ServeConfig, param: str) -> bytes:
    parsed = urlparse(url)
    policy = cfg.remote_images
    if not policy.enabled:
        raise _not_allowed("image URLs are not accepted by this server; send the image inline as a "
                           "data:image/...;base64 URL", param)
    async with asyncio.timeout(policy.timeout_s):  # one deadline for resolution, connection, headers and body
        if parsed.scheme == "s3":
            bucket = parsed.netloc
            if not bucket or bucket not in policy.allowed_buckets:
                raise _not_allowed(f"image bucket {bucket!r} is not in this server's allow-list", param)
            return await asyncio.to_thread(_read_s3, url, cfg.max_image_bytes, param)
        return await _fetch_http(url, cfg, param)


class ImageTooLarge(ImageError):
    """An image whose header declares more pixels than the server takes (refused before decoding)."""


def header_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """`(width, height)` from the image's header alone (PIL's `open` is lazy: no pixel data is decoded), in one
    of `IMAGE_FORMATS`; `ImageTooLarge` over `max_pixels` (and for what PIL itself calls a decompression bomb),
    `ImageError` for anything else."""
    with warnings.catch_warnings():
        # the limit below is ours; PIL's bomb warning (over its own MAX_IMAGE_PIXELS) would only be noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:  # refuse formats beyond the common ones before any decoder runs
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
        except Image.DecompressionBombError:  # over twice PIL's MAX_IMAGE_PIXELS: PIL refuses to go on
            raise ImageTooLarge(f"its header declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, over the "
                                f"limit of {max_pixels}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise ImageError(f"not an image in one of the accepted formats ({', '.join(IMAGE_FORMATS)})") from None
    if width * height > max_pixels:
        raise ImageTooLarge(f"it is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    return width, height


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    header_size(data, max_pixels)  # the size from the header, before any pixel is decoded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size was checked above
        return decode_image(data, max_pixels)


def fit_to_tower(image: Image.Image, geometry: dict[str, Any] | None, detail: str | None = None) -> Image.Image:
    """The image as the tower will take it, so the model replica never handles a large one: a pad/crop tower's
    `size`×`size` square; for an anyres tower the base view at `detail="low"` and the image itself otherwise
    (its tiles depend on its size; `max_image_pixels` bounds it).

    `fit_to_square` and `base_view` are idempotent on their own output, so the engine's preprocessing leaves
    the image unchanged.
    """
    if not geometry:
        return image
    if geometry["image_mode"] == "anyres":
        return base_view(image, geometry["image_size"]) if detail == "low" else image
    return fit_to_square(image, geometry["image_size"], geometry["image_mean"], geometry["image_mode"])


async def load_image(url: str, cfg: ServeConfig, param: str = "messages",
                     geometry: dict[str, Any] | None = None, detail: str | None = None) -> Image.Image:
    """An `image_url` → decoded RGB image (fitted to the tower when `geometry` is given), or `APIError` 400."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        data = _decode_data_url(url, cfg.max_image_bytes, param)
    elif scheme in ("http", "https", "s3"):
        try:
            data = await _fetch(url, cfg, param)
        except APIError:
            raise
        except TimeoutError:
            raise APIError(400, f"fetching the image took over {cfg.remote_images.timeout_s} s", param,
                           "image_fetch_failed") from None
        except Exception as exc:  # noqa: BLE001 - any fetch failure is the URL's problem
            logger.warning("fetching image %s failed: %r", url[:200], exc)
            raise APIError(400, f"could not fetch the image ({type(exc).__name__})", param,
                           "image_fetch_failed") from None
    else:
        raise APIError(400, f"unsupported image URL scheme {scheme!r}; use a data: URL", param, "invalid_image_url")
    if len(data) > cfg.max_image_bytes:
        raise APIError(400, f"the image is {len(data)} bytes, over the limit of {cfg.max_image_bytes}", param,
                       "image_too_large")
    try:
        image = await asyncio.to_thread(_decode, data, cfg.max_image_pixels)
        return await asyncio.to_thread(fit_to_tower, image, geometry, detail)
    except ImageError as exc:
        code = "image_too_large" if isinstance(exc, ImageTooLarge) or "over the limit" in str(exc) else "invalid_image"
        # the reason in our words; a decoder's own exception text stays in the log
        reason = "cannot decode the image data" if exc.__cause__ is not None else str(exc)
        if exc.__cause__ is not None:
            logger.info("image decode failed: %r", exc.__cause__)
        raise APIError(400, f"the image cannot be used: {reason}", param, code) from None


async def chat_request_from_openai(req: ChatCompletionRequest, cfg: ServeConfig,
                                   geometry: dict[str, Any] | None = None) -> ChatRequest:
    """Check an OpenAI request's messages and turn them into a `ChatRequest` (images decoded, fitted to the
    tower's input when `geometry` (`ServingEngine.info()`) is given).

    System (or developer) messages may only open the conversation; then user and assistant alternate,
    starting and ending with user. Up to `cfg.max_images_per_request` images over all user messages: each
    `image_url` part is one `<image>` placeholder of its message's turn, the message's placeholders in front of
    its text in part order (`vitune.data.prompt.image_first`, the placement batch evaluation and training use
    too; vLLM places them so for `<image>` models), and the images go in that order over the messages.
    """
    if req.text_chars > cfg.max_text_chars:
        raise APIError(413, f"the messages hold {req.text_chars} characters of text, over the limit of "
                       f"{cfg.max_text_chars}", "messages", "request_too_large")
    system: list[str] = []
    turns: list[dict[str, str]] = []
    image_parts: list[tuple[str, str, str | None]] = []  # (url, param, detail) in placeholder order
    for i, msg in enumerate(req.messages):
        param = f"messages[{i}]"
        images = msg.image_parts()
        text = "\n".join(msg.text_parts())
        if IMAGE_TOKEN in text:
            raise APIError(400, f"message text must not contain the literal {IMAGE_TOKEN} token; send images as "
                           "image_url parts", f"{param}.content")
        if msg.role in ("system", "developer"):
            if turns:
                raise APIError(400, "system messages must come before the first user message", f"{param}.role")
            if images:
                raise APIError(400, "images go in user messages, not system messages", f"{param}.content")
            system.append(text)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if msg.role != expected:
            raise APIError(400, f"{param} is from {msg.role!r} but {expected!r} was expected: after any system "
                           "messages, user and assistant messages alternate, starting with user", f"{param}.role")
        if images and msg.role == "assistant":
            raise APIError(400, "images go in user messages, not assistant messages", f"{param}.content")
        for k, part in enumerate(msg.content if isinstance(msg.content, list) else []):
            if not isinstance(part, ImagePart):
                continue
            if len(image_parts) >= cfg.max_images_per_request:  # refused before any image is fetched or decoded
                raise APIError(400, f"this server takes at most {cfg.max_images_per_request} images per request; "
                               f"{param}.content[{k}] is image {len(image_parts) + 1}", f"{param}.content[{k}]",
                               "too_many_images")
            image_parts.append((part.image_url.url, f"{param}.content[{k}].image_url", part.image_url.detail))
        text = image_first(text, len(images))
        turns.append({"from": HUMAN if msg.role == "user" else GPT, "value": text})
    if not turns:
        raise APIError(400, "messages hold no user message", "messages")
    if len(turns) % 2 == 0:
        raise APIError(400, "the last message must be from the user", f"messages[{len(req.messages) - 1}].role")
    loaded = await asyncio.gather(*(load_image(url, cfg, where, geometry, detail)
                                    for url, where, detail in image_parts), return_exceptions=True)
    for outcome in loaded:  # the first bad image in placeholder order answers
        if isinstance(outcome, BaseException):
            raise outcome
    temperature, top_p = req.sampling
    return ChatRequest(
        turns=turns,
        system="\n".join(system) if system else None,
        images=list(loaded),  # type: ignore[arg-type]
        details=[detail for _, _, detail in image_parts],
        max_tokens=req.token_limit,
        temperature=temperature,
        top_p=top_p,
        stop=req.stop_list,
        seed=req.seed,
    )
