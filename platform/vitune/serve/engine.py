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
import dataclasses
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vitune import IMAGE_TOKEN
from vitune.config import ServeConfig
from vitune.data.records import HUMAN
from vitune.model.decoding import _Batch
from vitune.serve.openai import APIError
from vitune.serve.request import MAX_IMAGES, ChatRequest
from vitune.serve.stream import TextStream, _coalesce
from vitune.tracking import resolve_model_source

logger = logging.getLogger(__name__)


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




def _error_event(err: APIError) -> dict[str, Any]:
    return {"type": "error", "status": err.status, **err.body()}




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
        from vitune.model.folder import load_model_folder, read_meta
        from vitune.model.vision import fingerprint_id, load_vision_tower

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
        from vitune.model.vision import encode_images

        image = Image.new("RGB", (self.tower.image_size, self.tower.image_size))
        features = encode_images(self.tower, [image])
        ids = self._prompt_ids([{"from": HUMAN, "value": f"{IMAGE_TOKEN}\nhello"}], None)
        self.model.generate([ids], [features[0]], max_new_tokens=2)

    # -- request side (event loop) --

    def _template(self, system: str | None) -> Any:
        from vitune.data.templates import SepStyle, get_template

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
        from vitune.data.templates import TemplateError, tokenize_generation_prompt

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

        from vitune.model.vision import encode_images

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

        from vitune.model.vlm import _pick_next

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
