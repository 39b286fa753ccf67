"""An OpenAI chat request → a checked vitune conversation (`ChatRequest`), its image fetched and decoded.

Runs in the API replica: every client mistake here is an `APIError` 4xx naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

from PIL import Image

from vitune import GPT, HUMAN, IMAGE_TOKEN, storage
from vitune.config import ServeConfig
from vitune.model.image import ImageError, decode_image
from vitune.serve.openai import APIError, ChatCompletionRequest

MAX_IMAGES = 1  # the model splices one <image> per sample


@dataclass
class ChatRequest:
    """A checked chat request in vitune's terms (what crosses from the API replica to a model replica)."""

    turns: list[dict[str, str]]  # {"from": "human"|"gpt", "value": ...}; the image's turn starts with <image>\n
    system: str | None = None
    image: Image.Image | None = None
    max_tokens: int | None = None  # None = default_max_tokens, capped by the context left
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")


def _host_allowed(host: str, allowed: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith(".") and (host == entry[1:] or host.endswith(entry)):
            return True
        if host == entry:
            return True
    return False


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
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"the image data: URL is not valid base64: {exc}", param, "invalid_base64") from None


async def _fetch(url: str, cfg: ServeConfig, param: str) -> bytes:
    parsed = urlparse(url)
    policy = cfg.remote_images
    if not policy.enabled:
        raise APIError(400, "image URLs are not accepted by this server; send the image inline as a "
                       "data:image/...;base64 URL", param, "image_url_not_allowed")
    host = parsed.netloc.rsplit("@", 1)[-1].split(":")[0]
    if not host or not _host_allowed(host, policy.allowed_hosts):
        raise APIError(400, f"image host {host!r} is not in this server's allow-list", param, "image_url_not_allowed")
    limit = cfg.max_image_bytes
    if parsed.scheme == "s3":
        data = await asyncio.to_thread(storage.read_bytes, url)
    else:
        # deferred: only remote image URLs need an HTTP client
        import httpx

        # no redirects: a redirect could lead off the allow-list
        async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise APIError(400, f"fetching the image returned HTTP {resp.status_code}", param,
                                   "image_fetch_failed")
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > limit:  # stop reading: the size is all the error needs
                        raise APIError(400, f"the image is over the limit of {limit} bytes", param,
                                       "image_too_large")
                    chunks.append(chunk)
                data = b"".join(chunks)
    return data


async def load_image(url: str, cfg: ServeConfig, param: str = "messages") -> Image.Image:
    """An `image_url` → decoded RGB image, or `APIError` 400 naming why (scheme, host, size, not an image)."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        data = _decode_data_url(url, cfg.max_image_bytes, param)
    elif scheme in ("http", "https", "s3"):
        try:
            data = await _fetch(url, cfg, param)
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - any fetch failure is the URL's problem
            raise APIError(400, f"could not fetch the image: {exc}", param, "image_fetch_failed") from None
    else:
        raise APIError(400, f"unsupported image URL scheme {scheme!r}; use a data: URL", param, "invalid_image_url")
    if len(data) > cfg.max_image_bytes:
        raise APIError(400, f"the image is {len(data)} bytes, over the limit of {cfg.max_image_bytes}", param,
                       "image_too_large")
    try:
        return await asyncio.to_thread(decode_image, data, cfg.max_image_pixels)
    except ImageError as exc:
        code = "image_too_large" if "over the limit" in str(exc) else "invalid_image"
        raise APIError(400, f"the image cannot be used: {exc}", param, code) from None


async def chat_request_from_openai(req: ChatCompletionRequest, cfg: ServeConfig) -> ChatRequest:
    """Check an OpenAI request's messages and turn them into a `ChatRequest` (image decoded).

    System (or developer) messages may only open the conversation; then user and assistant alternate,
    starting and ending with user. One image per request, in a user message; its turn gets the
    `<image>` token in front, as in LLaVA's training data.
    """
    system: list[str] = []
    turns: list[dict[str, str]] = []
    image_part: tuple[str, str] | None = None  # (url, param)
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
        if images:
            if image_part is not None or len(images) > 1:
                raise APIError(400, f"this model takes at most {MAX_IMAGES} image per request", f"{param}.content",
                               "too_many_images")
            k = next(j for j, p in enumerate(msg.content or []) if not isinstance(p, str) and p.type == "image_url")
            image_part = (images[0].image_url.url, f"{param}.content[{k}].image_url")
            text = f"{IMAGE_TOKEN}\n{text}" if text else IMAGE_TOKEN
        turns.append({"from": HUMAN if msg.role == "user" else GPT, "value": text})
    if not turns:
        raise APIError(400, "messages hold no user message", "messages")
    if len(turns) % 2 == 0:
        raise APIError(400, "the last message must be from the user", f"messages[{len(req.messages) - 1}].role")
    image = await load_image(image_part[0], cfg, image_part[1]) if image_part else None
    return ChatRequest(
        turns=turns,
        system="\n".join(system) if system else None,
        image=image,
        max_tokens=req.token_limit,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_list,
        seed=req.seed,
    )
