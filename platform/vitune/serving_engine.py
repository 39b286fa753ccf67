"""Serving engine: OpenAI chat request → template prompt + image features → batched, streamed generation.

Ray-free: the Serve app (`serving/app.py`) holds one `ServingEngine` per model replica and only moves
requests and events over HTTP and handles. The prompt path is training's: the model folder's own
template through `tokenize_generation_prompt`, the image through `decode_image` and `encode_images`.

Batching (what happens on a replica): continuous batching. Requests wait in one queue; a worker thread
owns the running batch (`_Batch`: rows, KV cache, mask, positions, logits) and loops: admit waiting
requests (their images through the tower in one `encode_images` call, then one prefill whose cache is
merged into the running one), sample one token per row, detokenise and push each row's text to its
asyncio queue (so streams get tokens as they are made), drop rows that finished (EOS, a stop string,
their own `max_tokens`, or their caller going away), and run the survivors one step. New requests join
at the next step boundary; nobody waits for a whole batch to end. Each row samples with its own
temperature and top_p; a request with a `seed` draws from its own generator, so its tokens do not
depend on its neighbours' draws. The decode steps are `VisionLanguageModel.generate_stream`'s (same
splice, cache, positions and `_pick_next`), and a test checks the API's greedy answer equals
`model.generate`. At most `max_batch_size` rows decode at once and `max_queued` requests wait per
replica; more are refused with 429.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from vitune import IMAGE_TOKEN
from vitune.image import ImageError, decode_image
from vitune.openai_schema import APIError, ChatCompletionRequest
from vitune.records import GPT, HUMAN

logger = logging.getLogger(__name__)

MODELS_SCHEME = "models:/"
API_KEY_ENV = "VITUNE_API_KEY"
MAX_IMAGES = 1  # the model splices one <image> per sample


class RemoteImagesConfig(BaseModel):
    """Image URLs other than `data:`; off by default, and then limited to `allowed_hosts`."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)  # "example.com", or ".example.com" for subdomains too
    timeout_s: float = Field(10.0, gt=0)


class ServeConfig(BaseModel):
    """The Serve application's `args` (serving/config.yaml); validated once in `build_app`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str  # model folder URI (local or s3://) or models:/NAME/VERSION from the MLflow registry
    served_model_name: str | None = None  # default: NAME of models:/NAME/VERSION, else the folder's name
    tracking_uri: str | None = None  # for models:/ (else MLFLOW_TRACKING_URI)
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto = the folder's dtype on GPU, fp32 on CPU
    max_batch_size: int = Field(32, ge=1)  # rows decoded together on one replica
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # newcomers join after waiting this long (or a quiet gap this long)
    max_batch_wait_s: float = Field(0.1, ge=0)  # an idle replica waits at most this long for a first batch to fill
    max_queued: int = Field(256, ge=1)  # requests waiting to join on one replica; more get 429
    default_max_tokens: int = Field(256, ge=1)  # when a request names none (capped by the context left)
    context_length: int | None = Field(None, ge=2)  # default: the model's training max_length
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)  # encoded size
    max_image_pixels: int = Field(16_000_000, ge=1)  # decoded width x height
    remote_images: RemoteImagesConfig = Field(default_factory=RemoteImagesConfig)
    api_key: str | None = None  # else the VITUNE_API_KEY env of the replica; unset = no auth
    stream_interval_s: float = Field(0.05, ge=0)  # streamed text is sent at most this often (first token at once)
    warmup: bool = True  # one short generation at load so the first request does not pay for it

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model.startswith(MODELS_SCHEME):
            return self.model[len(MODELS_SCHEME) :].split("/")[0].split("@")[0]
        return Path(self.model.rstrip("/")).name or "vitune"

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None


# --- model source -------------------------------------------------------------------------------------


def _registry_download_uri(uri: str, tracking_uri: str | None) -> str:
    """Where the artifacts of `models:/NAME/VERSION` (or `NAME@ALIAS`, `NAME/latest`) live.

    Resolved with an explicit client: mlflow's own `models:/` download ignores a passed registry URI.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    ref = uri[len(MODELS_SCHEME) :].strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = ref.partition("/")
        if not name or not version:
            raise ValueError(f"model URI {uri!r} must be models:/NAME/VERSION or models:/NAME@ALIAS")
        if version == "latest":
            found = client.search_model_versions(f"name='{name}'")
            if not found:
                raise ValueError(f"registered model {name!r} has no versions")
            version = str(max(int(v.version) for v in found))
    return client.get_model_version_download_uri(name, version)


def resolve_model_source(uri: str, dest: str, tracking_uri: str | None = None) -> str:
    """A model-folder URI for `uri`: `models:/...` is downloaded from the MLflow registry into `dest`."""
    from vitune.model_folder import META_FILE

    if not uri.startswith(MODELS_SCHEME):
        return uri
    import mlflow.artifacts

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    source = _registry_download_uri(uri, tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dest, tracking_uri=tracking_uri))
    for candidate in (local, *sorted(p.parent for p in local.glob(f"*/{META_FILE}"))):
        if (candidate / META_FILE).exists():
            logger.info("registry model %s (%s) downloaded to %s", uri, source, candidate)
            return str(candidate)
    raise FileNotFoundError(f"{uri} holds no vitune model folder ({META_FILE} not found in its artifacts)")


# --- request → vitune conversation --------------------------------------------------------------------


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
        from vitune import storage

        data = await asyncio.to_thread(storage.read_bytes, url)
    else:
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


# --- detokenisation -----------------------------------------------------------------------------------


class TextStream:
    """Incremental detokenisation with stop strings: emits only text that later tokens cannot change.

    Held back: a trailing partial UTF-8 character (decoded as U+FFFD) and a tail that could begin a stop
    string. The concatenated deltas plus `flush()` equal `tokenizer.decode(ids, skip_special_tokens=True).lstrip()`
    unless a stop string cut the text (which then ends just before the stop string).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = [s for s in stops if s]
        self._ids: list[int] = []
        self._sent = 0

    def _decode(self) -> str:
        # without the leading space: templates train a reply as " text" after the assistant cue (LLaVA strips too)
        return self._tokenizer.decode(self._ids, skip_special_tokens=True).lstrip()

    def _advance(self, text: str, end: int) -> str:
        delta = text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return delta

    def push(self, ids: Sequence[int]) -> tuple[str, bool]:
        """Add tokens; returns `(new text, stopped)` where `stopped` means a stop string was reached."""
        if not ids:
            return "", False
        self._ids.extend(ids)
        text = self._decode()
        longest = max((len(s) for s in self._stops), default=0)
        start = max(0, self._sent - longest)
        hits = [i for i in (text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            return self._advance(text, max(min(hits), self._sent)), True
        end = len(text.rstrip("\ufffd"))
        for stop in self._stops:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[end - k : end] == stop[:k]:
                    end -= k
                    break
        return self._advance(text, end), False

    def flush(self) -> str:
        """The text still held back (at the end of generation)."""
        text = self._decode()
        return self._advance(text, len(text))


# --- the engine ---------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One request inside the engine: its prompt, sampling, the caller's queue, and decoding state."""

    request_id: str
    prompt_ids: list[int]
    image: Image.Image | None
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    text: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False
    generated: int = 0
    generator: Any = None  # torch.Generator of a seeded request (its draws depend on nothing else)


class _Batch:
    """The rows decoding on a replica: their jobs, KV cache, attention mask, next positions and logits.

    The same steps as `VisionLanguageModel.generate_stream` (left-padded splice, prefill, one token per
    step with the cache), kept as state so rows can join and leave between steps. Rows join by a prefill
    of their own, whose cache is left-padded to the running cache's length and concatenated on the batch
    axis; leaving rows are dropped with the cache's `batch_select_indices`. Joining while rows run needs
    plain `DynamicLayer` caches (full attention); with other cache layers rows join only an empty batch.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.jobs: list[_Job] = []
        self.cache: Any = None
        self.mask: Any = None  # [B, T] long
        self.positions: Any = None  # [B, 1] long, each row's next position id
        self.logits: Any = None  # [B, V] each row's next-token logits

    def can_join(self) -> bool:
        from transformers.cache_utils import DynamicLayer

        return not self.jobs or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def add(self, jobs: list[_Job], features: list[Any]) -> None:
        """Prefill `jobs` (features `[N, Dv]` or None each) and append them as rows."""
        import torch
        from transformers import DynamicCache

        model = self.model
        longest = max(len(j.prompt_ids) for j in jobs)
        input_ids = torch.full((len(jobs), longest), model.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(jobs), longest, dtype=torch.long)
        for i, job in enumerate(jobs):
            input_ids[i, longest - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids, dtype=torch.long)
            attention_mask[i, longest - len(job.prompt_ids) :] = 1
        given = [f for f in features if f is not None]
        spliced = model.splice(input_ids, attention_mask, torch.stack(given) if given else None, padding_side="left")
        cache = DynamicCache(config=model.lm.config)
        out = model.lm(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                       position_ids=spliced.position_ids, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]  # [B2, V]
        positions = spliced.position_ids[:, -1:] + 1  # [B2, 1]
        if not self.jobs:
            self.jobs, self.cache, self.mask = list(jobs), cache, spliced.attention_mask
            self.positions, self.logits = positions, logits
            return
        old_len, new_len = self.mask.shape[1], spliced.attention_mask.shape[1]
        width = max(old_len, new_len)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(spliced.attention_mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])
        self.jobs += jobs

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in order); drop the cache columns no remaining row attends to."""
        import torch

        if len(rows) == len(self.jobs):
            return
        self.jobs = [self.jobs[i] for i in rows]
        if not rows:
            self.cache = self.mask = self.positions = self.logits = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        unused = int(self.mask.any(dim=0).long().argmax())  # leading columns that are padding for every row
        if unused and self.can_join():
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    def step(self, tokens: Any) -> None:
        """Feed each row's new token `[B]`; the logits become those of the token after it."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.jobs), 1)], dim=1)  # [B, T+1]
        out = self.model.lm(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions,
                            cache=self.cache, use_cache=True, logits_to_keep=1)
        self.logits = out.logits[:, -1, :]
        self.positions = self.positions + 1


def _left_pad(tensor: Any, width: int, dim: int) -> Any:
    """Zero-pad `tensor` on the left of `dim` to `width` (cache entries and mask columns of padding)."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _error_event(err: APIError) -> dict[str, Any]:
    return {"type": "error", "status": err.status, **err.body()}


def _coalesce(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge consecutive text deltas so a slow consumer gets fewer, larger messages."""
    out: list[dict[str, Any]] = []
    for ev in events:
        if ev["type"] == "delta" and out and out[-1]["type"] == "delta":
            out[-1] = {"type": "delta", "text": out[-1]["text"] + ev["text"]}
        else:
            out.append(ev)
    return out


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ServingEngine:
    """A loaded model + tower + tokenizer with a continuous-batching worker thread (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, tower: Any, meta: dict[str, Any], cfg: ServeConfig) -> None:
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.tower = tower
        self.meta = meta
        self.cfg = cfg
        self.model_name = cfg.model_name()
        self.template_name: str = meta["model"]["template"]
        self.num_image_positions: int = tower.num_patches
        limit = cfg.context_length or int(meta["model"].get("max_length") or 2048)
        lm_limit = getattr(model.lm.config, "max_position_embeddings", None)
        self.context_length = min(limit, lm_limit) if lm_limit else limit
        self._stops = set(model.eos_token_ids)
        self._generator = torch.Generator(device=model.device)
        self._generator.seed()
        self._queue: list[_Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stats = {"steps": 0, "row_steps": 0, "max_batch": 0, "admissions": 0, "sequences": 0, "tokens": 0,
                       "busy_s": 0.0}
        self._worker = threading.Thread(target=self._work, name="vitune-engine", daemon=True)
        self._worker.start()

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> ServingEngine:
        """Load the model folder named by `cfg.model` and its vision tower (fingerprint checked)."""
        import torch

        from vitune.config import VisionConfig
        from vitune.model_folder import load_model_folder, read_meta
        from vitune.vision import fingerprint_id, load_vision_tower

        device = _resolve_device(cfg.device)
        with tempfile.TemporaryDirectory(prefix="vitune-registry-") as download:
            source = resolve_model_source(cfg.model, download, cfg.tracking_uri)
            if cfg.dtype != "auto":
                dtype = getattr(torch, cfg.dtype)
            elif device == "cpu":
                dtype = torch.float32  # half precision on CPU is slow and poorly supported
            else:
                dtype = getattr(torch, read_meta(source).get("dtype", "float32"))
            model, tokenizer, meta = load_model_folder(source, device=device, dtype=dtype)
        tower = load_vision_tower(VisionConfig(**meta["model"]["vision"]), device=device, dtype=dtype)
        want, have = fingerprint_id(meta["fingerprint"]), fingerprint_id(tower.fingerprint())
        if want != have:
            raise ValueError(
                f"model {cfg.model} was trained on features {meta['fingerprint']} (id {want}) but its tower "
                f"config gives {tower.fingerprint()} (id {have})"
            )
        engine = cls(model, tokenizer, tower, meta, cfg)
        if cfg.warmup:
            engine.warmup()
        logger.info("serving %s from %s on %s (%s): template %s, context %d, batches of up to %d",
                    engine.model_name, cfg.model, device, dtype, engine.template_name,
                    engine.context_length, cfg.max_batch_size)
        return engine

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "template": self.template_name,
            "context_length": self.context_length,
            "image_positions": self.num_image_positions,
            "max_images": MAX_IMAGES,
            "max_batch_size": self.cfg.max_batch_size,
        }

    def stats(self) -> dict[str, Any]:
        """Counters since start: decode steps, rows over all steps (÷ steps = mean batch), seconds busy, ..."""
        with self._cond:
            return {**self._stats, "queued": len(self._queue), "alive": self._worker.is_alive()}

    def warmup(self) -> None:
        """Run the tower and two decoding steps once, outside any request."""
        from vitune.vision import encode_images

        image = Image.new("RGB", (self.tower.image_size, self.tower.image_size))
        features = encode_images(self.tower, [image])
        ids = self._prompt_ids([{"from": HUMAN, "value": f"{IMAGE_TOKEN}\nhello"}], None)
        self.model.generate([ids], [features[0]], max_new_tokens=2)

    # -- request side (event loop) --

    def _template(self, system: str | None) -> Any:
        from vitune.templates import SepStyle, get_template

        tpl = get_template(self.template_name)
        if system is None:
            return tpl
        if tpl.style in (SepStyle.TWO, SepStyle.LLAMA_2):
            return dataclasses.replace(tpl, system=system)
        if tpl.style is SepStyle.MPT:
            return dataclasses.replace(tpl, system=f"<|im_start|>system\n{system}")
        raise APIError(400, f"this model's conversation template {tpl.name!r} has no system prompt; put the "
                       "instruction in the user message", "messages")

    def _prompt_ids(self, turns: list[dict[str, str]], system: str | None) -> list[int]:
        from vitune.templates import TemplateError, tokenize_generation_prompt

        try:
            return tokenize_generation_prompt(turns, self._template(system), self.tokenizer)
        except TemplateError as exc:
            raise APIError(400, f"the messages do not fit this model's {self.template_name!r} conversation "
                           f"template: {exc}", "messages") from None

    def prepare(self, chat: ChatRequest, loop: asyncio.AbstractEventLoop | None = None) -> _Job:
        """Tokenise with the model's template and check the context budget; `APIError` 400 otherwise."""
        ids = self._prompt_ids(chat.turns, chat.system)
        n_images = ids.count(self.model.image_token_id)
        if n_images != (chat.image is not None):
            raise APIError(400, f"the prompt holds {n_images} image tokens but the request "
                           f"{'has an image' if chat.image is not None else 'has no image'}", "messages")
        prompt_tokens = len(ids) + n_images * (self.num_image_positions - 1)
        room = self.context_length - prompt_tokens
        if chat.max_tokens is None:
            if room < 1:
                raise APIError(400, f"this model's context length is {self.context_length} tokens and the "
                               f"prompt takes {prompt_tokens} (the image {self.num_image_positions})",
                               "messages", "context_length_exceeded")
            max_tokens = min(self.cfg.default_max_tokens, room)
        else:
            max_tokens = chat.max_tokens
            if max_tokens > room:
                raise APIError(400, f"this model's context length is {self.context_length} tokens; the prompt "
                               f"takes {prompt_tokens} (the image {self.num_image_positions}) and max_tokens "
                               f"asks for {max_tokens} more", "max_tokens", "context_length_exceeded")
        return _Job(
            request_id=chat.request_id,
            prompt_ids=ids,
            image=chat.image,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            seed=chat.seed,
            text=TextStream(self.tokenizer, chat.stop),
            loop=loop or asyncio.get_running_loop(),
            events=asyncio.Queue(),
        )

    async def generate(self, chat: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        """Events for one request: `start` (prompt_tokens), `delta`s (text), then `finish`; or one `error`."""
        try:
            job = self.prepare(chat)
        except APIError as err:
            yield _error_event(err)
            return
        with self._cond:
            if self._closed:
                yield _error_event(APIError(503, "the model replica is shutting down", code="overloaded"))
                return
            if len(self._queue) >= self.cfg.max_queued:
                yield _error_event(APIError(429, f"this replica already has {len(self._queue)} requests waiting; "
                                            "retry shortly", code="rate_limit_exceeded"))
                return
            self._queue.append(job)
            self._cond.notify_all()
        yield {"type": "start", "prompt_tokens": job.prompt_tokens, "max_tokens": job.max_tokens}
        interval = self.cfg.stream_interval_s
        last_sent: float | None = None
        try:
            while True:
                pending = [await job.events.get()]
                ended = pending[-1]["type"] in ("finish", "error")
                if not ended and last_sent is not None and interval > 0:
                    # the first text goes out at once; later text at most every `interval` (fewer, larger
                    # messages through the handle, the proxy and the client)
                    await asyncio.sleep(max(0.0, last_sent + interval - time.monotonic()))
                while not job.events.empty():
                    pending.append(job.events.get_nowait())
                for ev in _coalesce(pending):
                    yield ev
                    if ev["type"] in ("finish", "error"):
                        return
                last_sent = time.monotonic()
        finally:
            job.cancelled = True  # a no-op when finished; otherwise the worker drops the request

    async def complete(self, chat: ChatRequest) -> dict[str, Any]:
        """The whole answer: `{"text", "finish_reason", "prompt_tokens", "completion_tokens"}` or an error event."""
        parts: list[str] = []
        prompt_tokens = 0
        async for ev in self.generate(chat):
            if ev["type"] == "error":
                return ev
            if ev["type"] == "start":
                prompt_tokens = ev["prompt_tokens"]
            elif ev["type"] == "delta":
                parts.append(ev["text"])
            else:
                return {"type": "result", "text": "".join(parts), "finish_reason": ev["finish_reason"],
                        "prompt_tokens": prompt_tokens, "completion_tokens": ev["completion_tokens"]}
        raise RuntimeError("generation ended without a finish event")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # -- worker side (thread) --

    def _admit(self, batch: _Batch) -> list[_Job] | None:
        """Requests to join `batch` now (`[]`: none yet); blocks while nothing runs; None once closed.

        An empty batch fills while requests keep arriving: it starts once none came for
        `batch_wait_timeout_s`, or `max_batch_wait_s` after the first. A running batch admits the
        waiting requests once the oldest has waited `batch_wait_timeout_s` (or they fill it), so one
        prefill and cache merge serves several arrivals.
        """
        cap, wait_s = self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s
        max_wait = max(wait_s, self.cfg.max_batch_wait_s)
        with self._cond:
            while True:
                self._queue = [j for j in self._queue if not j.cancelled]
                if self._closed:
                    return None
                room = cap - len(batch.jobs)
                now = time.monotonic()
                if batch.jobs:
                    if not self._queue or room <= 0 or not batch.can_join():
                        return []
                    if len(self._queue) < room and now < self._queue[0].enqueued + wait_s:
                        return []
                elif not self._queue:
                    self._cond.wait()
                    continue
                else:
                    deadline = min(self._queue[0].enqueued + max_wait, self._queue[-1].enqueued + wait_s)
                    if len(self._queue) < room and now < deadline:
                        self._cond.wait(deadline - now)
                        continue
                admitted, self._queue = self._queue[:room], self._queue[room:]
                return admitted

    def _work(self) -> None:
        import torch

        batch = _Batch(self.model)
        while True:
            try:
                admitted = self._admit(batch)
                if admitted is None:
                    return
                started = time.perf_counter()
                with torch.inference_mode():
                    if admitted:
                        self._join(batch, admitted)
                    if batch.jobs:
                        self._step(batch)
                with self._cond:
                    self._stats["busy_s"] += time.perf_counter() - started
            except Exception as exc:  # noqa: BLE001 - fail the batch's requests, keep serving
                logger.exception("generation failed for a batch of %d requests", len(batch.jobs))
                err = _error_event(APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                            code="internal_error"))
                failed = batch.jobs + [j for j in (admitted or []) if j not in batch.jobs]
                self._deliver([(j, err) for j in failed if not j.done])
                for job in failed:
                    job.done = True
                batch = _Batch(self.model)

    def _join(self, batch: _Batch, jobs: list[_Job]) -> None:
        """Encode the newcomers' images in one tower call and prefill them into the batch."""
        import torch

        from vitune.vision import encode_images

        images = [j.image for j in jobs if j.image is not None]
        encoded = iter(encode_images(self.tower, images)) if images else iter(())  # M x [N, Dv]
        features = [next(encoded) if j.image is not None else None for j in jobs]
        for job in jobs:
            if job.seed is not None and job.temperature > 0:
                job.generator = torch.Generator(device=self.model.device).manual_seed(job.seed)
        batch.add(jobs, features)
        with self._cond:
            self._stats["admissions"] += 1

    def _sample(self, batch: _Batch) -> Any:
        """Each row's next token: greedy rows by argmax, others by their own temperature/top_p/generator."""
        import torch

        from vitune.model import _pick_next

        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, job in enumerate(batch.jobs):
            key = ("greedy",) if job.temperature == 0 else (job.temperature, job.top_p, id(job.generator))
            groups.setdefault(key, []).append(i)
        tokens = torch.empty(len(batch.jobs), dtype=torch.long, device=batch.logits.device)
        for rows in groups.values():
            job = batch.jobs[rows[0]]
            index = torch.tensor(rows, device=batch.logits.device)
            generator = job.generator if job.generator is not None else self._generator
            tokens[index] = _pick_next(batch.logits[index], job.temperature, job.top_p, generator)
        return tokens

    def _step(self, batch: _Batch) -> None:
        """Sample one token per row, send each row's text, drop finished rows, run the survivors one step."""
        tokens = self._sample(batch)  # [B]
        out: list[tuple[_Job, dict[str, Any]]] = []
        keep: list[int] = []
        emitted = 0
        for i, (job, tok) in enumerate(zip(batch.jobs, tokens.tolist(), strict=True)):
            if job.cancelled:
                job.done = True
                continue
            reason: str | None = None
            delta, stopped = "", False
            if tok in self._stops:
                reason = "stop"
            else:
                job.generated += 1
                emitted += 1
                delta, stopped = job.text.push([tok])
                if stopped:
                    reason = "stop"
                elif job.generated >= job.max_tokens:
                    reason = "length"
            if reason is not None and not stopped:
                delta += job.text.flush()
            if delta:
                out.append((job, {"type": "delta", "text": delta}))
            if reason is None:
                keep.append(i)
            else:
                job.done = True
                out.append((job, {"type": "finish", "finish_reason": reason, "completion_tokens": job.generated}))
        self._deliver(out)
        with self._cond:
            self._stats["steps"] += 1
            self._stats["row_steps"] += len(batch.jobs)
            self._stats["max_batch"] = max(self._stats["max_batch"], len(batch.jobs))
            self._stats["sequences"] += len(batch.jobs) - len(keep)
            self._stats["tokens"] += emitted
        survivors = tokens[keep] if len(keep) < len(batch.jobs) else tokens
        batch.keep(keep)
        if batch.jobs:
            batch.step(survivors)

    @staticmethod
    def _deliver(items: list[tuple[_Job, dict[str, Any]]]) -> None:
        by_loop: dict[int, list[tuple[_Job, dict[str, Any]]]] = {}
        for job, ev in items:
            by_loop.setdefault(id(job.loop), []).append((job, ev))
        for group in by_loop.values():
            loop = group[0][0].loop

            def put(group: list[tuple[_Job, dict[str, Any]]] = group) -> None:
                for job, ev in group:
                    job.events.put_nowait(ev)

            try:
                loop.call_soon_threadsafe(put)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass
