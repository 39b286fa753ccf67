"""The serving engine: one loaded model on a replica, its requests admitted, batched and answered as events.

Ray- and HTTP-free: the Serve app holds one `ServingEngine` per served model on each model replica and only
moves requests and events over HTTP and handles. The engine loads its model with
`vitune.model.folder.load_for_inference` (the loader batch inference uses too). Its parts, by role:

- admission (`vitune.serve.admission`): a request's parameters checked, its prompt built by the one prompt
  policy (`vitune.data.prompt`: the model folder's own template, its system prompt replaced by the request's,
  the `<image>` placeholders checked against the images; batch evaluation builds its prompts there too) and
  its image limits (`max_images_per_request`, `max_visual_tokens_per_request`) and context budget checked, each
  image counted as `visual_tokens` of it (the recipe's count for its size, or its base view's for `detail: low`);
- continuous batching (`vitune.serve.batching`): the queue and the worker thread that decodes the admitted
  requests through the one decode loop (`vitune.model.decoding`), the same `model.generate` runs; a test
  checks the API's greedy answer equals `model.generate`;
- events (here): `generate` yields `start`, coalesced `delta`s and `finish`, or one `error` whose `error` is a
  domain error (`vitune.serve.errors`: a `RequestRejected` with its reason, param and code, `QueueFull`,
  `ReplicaClosing`, `GenerationFailed`); only the HTTP layer turns those into statuses.

Tokenisation runs off the event loop. A failure tied to one request fails that request alone (see batching).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from PIL import Image

from vitune import HUMAN
from vitune.config import ServeConfig
from vitune.data.prompt import image_first
from vitune.data.templates import stop_strings, stop_token_ids
from vitune.model.folder import load_for_inference
from vitune.model.vision import encode_image_tiles
from vitune.references import model_folder
from vitune.serve.admission import Admission, Job
from vitune.serve.batching import ContinuousBatcher
from vitune.serve.errors import EngineError, GenerationFailed, error_event
from vitune.serve.request import ChatRequest
from vitune.serve.stream import coalesce_deltas
from vitune.vision_recipe import visual_tokens

logger = logging.getLogger(__name__)


class ServingEngine:
    """A loaded model + tower + tokenizer: admission, a continuous-batching worker, events (see the module)."""

    def __init__(self, model: Any, tokenizer: Any, tower: Any, meta: dict[str, Any], cfg: ServeConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tower = tower
        self.meta = meta
        self.cfg = cfg
        self.model_name = cfg.model_name()
        self.template_name: str = meta["model"]["template"]
        limit = cfg.context_length or int(meta["model"].get("max_length") or 2048)
        lm_limit = getattr(model.lm.config, "max_position_embeddings", None)
        self.context_length = min(limit, lm_limit) if lm_limit else limit
        self.admission = Admission(tokenizer, self.template_name, self.context_length, cfg.default_max_tokens,
                                   stop_strings(self.template_name), cfg.max_images_per_request,
                                   cfg.max_visual_tokens_per_request)
        # EOS, and the template's own turn end where that is not EOS (plain: "\n", ChatML: <|im_end|>)
        stops = set(model.eos_token_ids) | set(stop_token_ids(self.template_name, tokenizer))
        self.batcher = ContinuousBatcher(model, tower, stops, cfg)

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> ServingEngine:
        """Load the model named by `cfg.model` (folder URI or `models:/`) and its vision tower."""
        with model_folder(cfg.model, tracking_uri=cfg.tracking_uri) as folder:  # models:/ is downloaded for the load
            loaded = load_for_inference(folder, device=cfg.device, dtype=cfg.dtype)
        engine = cls(loaded.model, loaded.tokenizer, loaded.tower, loaded.meta, cfg)
        if cfg.warmup:
            engine.warmup()
        logger.info("serving %s from %s on %s (%s): template %s, context %d, batches of up to %d",
                    engine.model_name, cfg.model, engine.model.device, engine.model.dtype, engine.template_name,
                    engine.context_length, cfg.max_batch_size)
        return engine

    @property
    def anyres(self) -> bool:
        return self.tower.recipe.image_mode == "anyres"

    def visual_tokens(self, width: int, height: int, detail: str | None = None) -> int:
        """How many positions of the context an image of `width`×`height` takes at OpenAI's `detail`: the
        house's one count (`vitune.vision_recipe.visual_tokens`) for the tower's recipe (`low`: its base view
        alone), which the image limits and the context budget use."""
        return visual_tokens(self.tower.recipe, width, height, base_only=detail == "low")

    def info(self) -> dict[str, Any]:
        side = self.tower.image_size
        return {
            "model": self.model_name,
            "template": self.template_name,
            "context_length": self.context_length,
            "image_positions": self.visual_tokens(side, side),  # a square image's (anyres: by size)
            "base_view_positions": self.visual_tokens(side, side, "low"),
            "max_images": self.cfg.max_images_per_request,
            "max_visual_tokens": self.cfg.max_visual_tokens_per_request,
            "max_batch_size": self.cfg.max_batch_size,
            # the tower's input geometry: the API replica fits images to it (`vitune.serve.request.fit_to_tower`)
            "image_size": side,
            "image_mean": list(self.tower.mean),
            "image_mode": self.tower.image_mode,
        }

    def stats(self) -> dict[str, Any]:
        """Counters since start: decode steps, rows over all steps (÷ steps = mean batch), seconds busy, ..."""
        return self.batcher.stats()

    def health(self) -> str | None:
        """Why this engine cannot answer (worker stopped, shared steps failing, a step stuck), or None."""
        return self.batcher.health()

    def warmup(self) -> None:
        """Run the tower and two decoding steps once, outside any request."""
        image = Image.new("RGB", (self.tower.image_size, self.tower.image_size))
        features = encode_image_tiles(self.tower, [image])
        prompt = self.admission.prompt([{"from": HUMAN, "value": image_first("hello", 1)}], None, [image])
        sizes = [image.size] if self.anyres else None
        self.model.generate([prompt.ids], [features[0]], max_new_tokens=2, image_sizes=sizes)

    def prepare(self, chat: ChatRequest, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """The request as a job for the batch (`vitune.serve.admission`), or `RequestRejected`."""
        visual = [self.visual_tokens(*image.size, detail) for image, detail in zip(chat.images, chat.details,
                                                                                     strict=True)]
        # anyres packs each image by its size; a `detail: low` image is its base view alone (no size)
        sizes = ([None if detail == "low" else image.size for image, detail in zip(chat.images, chat.details,
                                                                                   strict=True)]
                 if self.anyres else None)
        return self.admission.job(chat, visual, loop or asyncio.get_running_loop(), sizes)

    async def generate(self, chat: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        """Events for one request: `start` (prompt_tokens), `delta`s (text), then `finish`; or one `error`."""
        loop = asyncio.get_running_loop()
        try:  # tokenising a long prompt takes a while: not on the loop that serves every other request
            job = await asyncio.to_thread(self.prepare, chat, loop)
        except EngineError as err:
            yield error_event(err)
            return
        except Exception:  # noqa: BLE001 - this request fails alone; the cause goes to the log
            logger.exception("preparing request %s failed", chat.request_id)
            yield error_event(GenerationFailed.of(chat.request_id))
            return
        refused = self.batcher.submit(job)
        if refused is not None:
            yield error_event(refused)
            return
        yield {"type": "start", "prompt_tokens": job.prompt_tokens, "max_tokens": job.row.max_new_tokens}
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
                for ev in coalesce_deltas(pending):
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
        self.batcher.close()
