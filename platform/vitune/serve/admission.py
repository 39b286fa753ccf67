"""Admission into the serving engine: a `ChatRequest` checked and turned into a `Job`, or a `RequestRejected`.

What a request passes before it may wait for the batch: its sampling parameters; its images (at most
`max_images`, together at most `max_visual_tokens` visual tokens, each image counted by the engine as
`vitune.vision_recipe.visual_tokens` for its size and `detail`); its prompt, built by the one prompt policy
(`vitune.data.prompt.generation_prompt`: the model's template, the request's system prompt, its turns and
images, the `<image>` placeholders checked against the images); and the context budget (the prompt's ids with
each image counted as its visual tokens, plus the tokens asked for). Ray- and HTTP-free; the engine
runs it off the event loop (tokenising a long prompt takes a while).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vitune.data.prompt import Prompt, PromptRejected, generation_prompt
from vitune.model.decoding import DecodeRow
from vitune.serve.errors import RequestRejected
from vitune.serve.openai import SEED_MAX, SEED_MIN
from vitune.serve.request import ChatRequest
from vitune.serve.stream import TextStream

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request inside the engine: its decode row (prompt, sampling, progress), images, caller's queue, state."""

    request_id: str
    row: DecodeRow  # its payload is this job once it joins the batch
    images: list[Image.Image]  # in placeholder order
    prompt_tokens: int
    seed: int | None
    text: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False
    base_only: list[bool] = field(default_factory=list)  # per image: its base view alone (detail: low)


def _of_which(visual_tokens: Sequence[int]) -> str:
    """What of the prompt the images take, for the context-length message ("" without images)."""
    if not visual_tokens:
        return ""
    if len(visual_tokens) == 1:
        return f" (the image {visual_tokens[0]})"
    return f" (the {len(visual_tokens)} images {sum(visual_tokens)})"


class Admission:
    """One model's prompt and budget rules: `job(chat, ...)` admits a request, or raises `RequestRejected`."""

    def __init__(self, tokenizer: Any, template_name: str, context_length: int, default_max_tokens: int,
                 stop_strings: Sequence[str], max_images: int | None = None,
                 max_visual_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.template_name = template_name
        self.context_length = context_length
        self.default_max_tokens = default_max_tokens
        self.stop_strings = list(stop_strings)  # the template's own, after the request's
        self.max_images = max_images  # None: no limit of its own
        self.max_visual_tokens = max_visual_tokens  # None: only the context length bounds them

    def check_images(self, visual_tokens: Sequence[int]) -> None:
        """Refuse more images, or more visual tokens over all images, than this engine takes."""
        if self.max_images is not None and len(visual_tokens) > self.max_images:
            raise RequestRejected(f"this server takes at most {self.max_images} images per request, got "
                                  f"{len(visual_tokens)}", "images", "too_many_images")
        total = sum(visual_tokens)
        if self.max_visual_tokens is not None and total > self.max_visual_tokens:
            each = ", ".join(str(n) for n in visual_tokens)
            raise RequestRejected(f"the request's images take {total} visual tokens ({each}), over this server's "
                                  f"limit of {self.max_visual_tokens} per request; send fewer or smaller images, "
                                  "or detail: low", "images", "too_many_visual_tokens")

    def prompt(self, turns: Sequence[dict[str, str]], system: str | None, images: Sequence[object]) -> Prompt:
        """The prompt policy's ids for this model; what it rejects is the request's fault."""
        try:
            return generation_prompt(turns, self.template_name, self.tokenizer, images, system=system)
        except PromptRejected as exc:
            raise RequestRejected(exc.message, exc.field, exc.code) from None
        except Exception:  # noqa: BLE001 - a tokenizer failure on this request's text fails this request only
            logger.exception("tokenising the prompt failed")
            raise RequestRejected("the messages could not be tokenised for this model", "turns",
                                  "invalid_prompt") from None

    def _max_tokens(self, chat: ChatRequest, prompt_tokens: int, visual_tokens: Sequence[int]) -> int:
        """The tokens the request may generate: its own `max_tokens`, or the default capped by the room left."""
        room = self.context_length - prompt_tokens
        of_which = _of_which(visual_tokens)
        if chat.max_tokens is None:
            if room < 1:
                raise RequestRejected(f"this model's context length is {self.context_length} tokens and the prompt "
                                      f"takes {prompt_tokens}{of_which}", "turns", "context_length_exceeded")
            return min(self.default_max_tokens, room)
        if chat.max_tokens > room:
            raise RequestRejected(f"this model's context length is {self.context_length} tokens; the prompt takes "
                                  f"{prompt_tokens}{of_which} and max_tokens asks for {chat.max_tokens} more",
                                  "max_tokens", "context_length_exceeded")
        return chat.max_tokens

    def job(self, chat: ChatRequest, visual_tokens: Sequence[int], loop: asyncio.AbstractEventLoop,
            image_sizes: Sequence[tuple[int, int] | None] | None = None) -> Job:
        """`chat` as a job for the batch; `visual_tokens[i]` is what `chat.images[i]` takes of the context;
        `image_sizes` (anyres) what the model packs each image's tiles by (None: its base view alone)."""
        if chat.seed is not None and not SEED_MIN <= chat.seed <= SEED_MAX:
            raise RequestRejected(f"seed must be a 64-bit integer, got {chat.seed}", "seed", "invalid_value")
        if chat.max_tokens is not None and chat.max_tokens < 1:
            raise RequestRejected(f"max_tokens must be at least 1, got {chat.max_tokens}", "max_tokens")
        images = chat.images
        if len(visual_tokens) != len(images):
            raise ValueError(f"{len(visual_tokens)} visual-token counts for {len(images)} images")
        self.check_images(visual_tokens)
        prompt = self.prompt(chat.turns, chat.system, images)
        prompt_tokens = len(prompt.ids) - prompt.num_images + sum(visual_tokens)  # a placeholder → its tokens
        max_tokens = self._max_tokens(chat, prompt_tokens, visual_tokens)
        try:
            row = DecodeRow(prompt.ids, max_new_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p,
                            image_sizes=list(image_sizes) if image_sizes is not None else None)
        except ValueError as exc:
            raise RequestRejected(str(exc), "temperature" if chat.temperature < 0 else "top_p") from None
        return Job(
            request_id=chat.request_id,
            row=row,
            images=list(images),
            base_only=[detail == "low" for detail in chat.details],
            prompt_tokens=prompt_tokens,
            seed=chat.seed,
            text=TextStream(self.tokenizer, [*chat.stop, *self.stop_strings]),
            loop=loop,
            events=asyncio.Queue(),
        )
