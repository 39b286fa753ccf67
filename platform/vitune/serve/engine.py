"""Serving engine: admission, queueing and events over the one decode loop (`vitune.model.decoding`).

Ray-free: the Serve app holds one `ServingEngine` per model replica and only moves requests and events
over HTTP and handles. The engine loads its model with `vitune.model.folder.load_for_inference` (the loader
batch inference uses too). The prompt path is training's: the model folder's own template (its system
prompt replaced through `vitune.data.templates.with_system`) through `tokenize_generation_prompt`, the
image through `decode_image` and `encode_images`.

Batching (what happens on a replica): continuous batching. Requests wait in one queue; a worker thread
owns the running `DecodeBatch` and loops: admit waiting requests (their images through the tower in one
`encode_images` call, then one prefill that joins the running rows), sample one token per row, detokenise
and push each row's text to its asyncio queue (so streams get tokens as they are made), drop rows that
finished (EOS, a stop string, their own `max_tokens`, or their caller going away), and run the survivors
one step. New requests join at the next step boundary; nobody waits for a whole batch to end. Each row
samples with its own temperature and top_p; a request with a `seed` draws from its own generator, so its
tokens do not depend on its neighbours' draws. Prefill, cache, positions and sampling are the decode loop's,
the same `model.generate` runs, and a test checks the API's greedy answer equals `model.generate`. At most
`max_batch_size` rows decode at once and `max_queued` requests wait per replica; more are refused with 429.

Isolation: a failure tied to one request (its parameters, its prompt's tokenisation, its image, its prefill,
its detokenisation) fails that request alone; the others keep decoding. Only a failure of the shared step
fails the running batch, and `health()` turns bad after `unhealthy_after_failures` of those in a row or a step
running longer than `stuck_after_s`, so Serve replaces the replica. Error events carry no exception text
(it is logged with the request id, which the client sees). Tokenisation runs off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vitune import HUMAN, IMAGE_TOKEN
from vitune.config import ServeConfig
from vitune.data.masks import tokenize_generation_prompt
from vitune.data.templates import (
    TemplateError,
    stop_strings,
    stop_token_ids,
    with_system,
)
from vitune.model.decoding import DecodeBatch, DecodeRow, seeded_generator
from vitune.model.folder import load_for_inference
from vitune.model.vision import encode_images
from vitune.references import model_folder
from vitune.serve.openai import SEED_MAX, SEED_MIN, APIError
from vitune.serve.request import MAX_IMAGES, ChatRequest
from vitune.serve.stream import TextStream, coalesce_deltas

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """One request inside the engine: its decode row (prompt, sampling, progress), image, caller's queue, state."""

    request_id: str
    row: DecodeRow  # its payload is this job once it joins the batch
    image: Image.Image | None
    prompt_tokens: int
    seed: int | None
    text: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False


def _error_event(err: APIError) -> dict[str, Any]:
    return {"type": "error", "status": err.status, **err.body()}


def _internal_error(request_id: str) -> dict[str, Any]:
    """The 500 a client sees when generation fails on our side: the request id to quote, no internals."""
    return _error_event(APIError(500, f"generation failed on the server (request id {request_id}); the cause "
                                 "is in the server log", code="internal_error"))


class ServingEngine:
    """A loaded model + tower + tokenizer with a continuous-batching worker thread (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, tower: Any, meta: dict[str, Any], cfg: ServeConfig) -> None:
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
        # EOS, and the template's own turn end where that is not EOS (plain: "\n", ChatML: <|im_end|>)
        self._stops = set(model.eos_token_ids) | set(stop_token_ids(self.template_name, tokenizer))
        self._template_stops = list(stop_strings(self.template_name))
        self._generator = seeded_generator()  # shared by the requests without a seed
        self._queue: list[_Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stats = {"steps": 0, "row_steps": 0, "max_batch": 0, "admissions": 0, "sequences": 0, "tokens": 0,
                       "busy_s": 0.0, "request_failures": 0, "batch_failures": 0}
        self._failures_in_a_row = 0  # failed shared steps since the last good one
        self._running_rows = 0  # rows in the running batch after the last step
        self._step_started: float | None = None  # when the step now running began (None: idle)
        self._worker = threading.Thread(target=self._work, name="vitune-engine", daemon=True)
        self._worker.start()

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

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "template": self.template_name,
            "context_length": self.context_length,
            "image_positions": self.num_image_positions,
            "max_images": MAX_IMAGES,
            "max_batch_size": self.cfg.max_batch_size,
            # the tower's input geometry: the API replica fits images to it (`vitune.serve.request.fit_to_tower`)
            "image_size": self.tower.image_size,
            "image_mean": list(self.tower.mean),
            "image_mode": self.tower.image_mode,
        }

    def stats(self) -> dict[str, Any]:
        """Counters since start: decode steps, rows over all steps (÷ steps = mean batch), seconds busy, ..."""
        with self._cond:
            return {**self._stats, "queued": len(self._queue), "running": self._running_rows,
                    "alive": self._worker.is_alive()}

    def health(self) -> str | None:
        """Why this engine cannot answer (worker stopped, shared steps failing, a step stuck), or None."""
        if not self._worker.is_alive() and not self._closed:
            return "the engine's worker thread has stopped"
        with self._cond:
            failures, started = self._failures_in_a_row, self._step_started
        if failures >= self.cfg.unhealthy_after_failures:
            return f"the last {failures} decode steps failed (prefill or decode, with no success since)"
        if started is not None and time.monotonic() - started > self.cfg.stuck_after_s:
            return f"a decode step has run for {time.monotonic() - started:.0f} s"
        return None

    def warmup(self) -> None:
        """Run the tower and two decoding steps once, outside any request."""
        image = Image.new("RGB", (self.tower.image_size, self.tower.image_size))
        features = encode_images(self.tower, [image])
        ids = self._prompt_ids([{"from": HUMAN, "value": f"{IMAGE_TOKEN}\nhello"}], None)
        self.model.generate([ids], [features[0]], max_new_tokens=2)

    # -- request side (event loop) --

    def _prompt_ids(self, turns: list[dict[str, str]], system: str | None) -> list[int]:
        try:
            return tokenize_generation_prompt(turns, with_system(self.template_name, system), self.tokenizer)
        except TemplateError as exc:
            raise APIError(400, f"the messages do not fit this model's {self.template_name!r} conversation "
                           f"template: {exc}", "messages") from None
        except Exception:  # noqa: BLE001 - a tokenizer failure on this request's text fails this request only
            logger.exception("tokenising the prompt failed")
            raise APIError(400, "the messages could not be tokenised for this model", "messages",
                           "invalid_prompt") from None

    def prepare(self, chat: ChatRequest, loop: asyncio.AbstractEventLoop | None = None) -> _Job:
        """Tokenise with the model's template and check the context budget; `APIError` 400 otherwise."""
        if chat.seed is not None and not SEED_MIN <= chat.seed <= SEED_MAX:
            raise APIError(400, f"seed must be a 64-bit integer, got {chat.seed}", "seed", "invalid_value")
        if chat.max_tokens is not None and chat.max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {chat.max_tokens}", "max_tokens")
        ids = self._prompt_ids(chat.turns, chat.system)
        n_images = ids.count(self.model.image_token_id)
        if n_images != (chat.image is not None):
            raise APIError(400, f"the prompt holds {n_images} image tokens but the request "
                           f"{'has an image' if chat.image is not None else 'has no image'}", "messages")
        prompt_tokens = len(ids) + n_images * (self.num_image_positions - 1)
        room = self.context_length - prompt_tokens
        of_which = f" (the image {self.num_image_positions})" if n_images else ""
        if chat.max_tokens is None:
            if room < 1:
                raise APIError(400, f"this model's context length is {self.context_length} tokens and the "
                               f"prompt takes {prompt_tokens}{of_which}",
                               "messages", "context_length_exceeded")
            max_tokens = min(self.cfg.default_max_tokens, room)
        else:
            max_tokens = chat.max_tokens
            if max_tokens > room:
                raise APIError(400, f"this model's context length is {self.context_length} tokens; the prompt "
                               f"takes {prompt_tokens}{of_which} and max_tokens "
                               f"asks for {max_tokens} more", "max_tokens", "context_length_exceeded")
        try:
            row = DecodeRow(ids, max_new_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p)
        except ValueError as exc:
            raise APIError(400, str(exc), "temperature" if chat.temperature < 0 else "top_p") from None
        return _Job(
            request_id=chat.request_id,
            row=row,
            image=chat.image,
            prompt_tokens=prompt_tokens,
            seed=chat.seed,
            text=TextStream(self.tokenizer, [*chat.stop, *self._template_stops]),
            loop=loop or asyncio.get_running_loop(),
            events=asyncio.Queue(),
        )

    async def generate(self, chat: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        """Events for one request: `start` (prompt_tokens), `delta`s (text), then `finish`; or one `error`."""
        loop = asyncio.get_running_loop()
        try:  # tokenising a long prompt takes a while: not on the loop that serves every other request
            job = await asyncio.to_thread(self.prepare, chat, loop)
        except APIError as err:
            yield _error_event(err)
            return
        except Exception:  # noqa: BLE001 - this request fails alone; the cause goes to the log
            logger.exception("preparing request %s failed", chat.request_id)
            yield _internal_error(chat.request_id)
            return
        with self._cond:
            if self._closed:
                yield _error_event(APIError(503, "the model replica is shutting down", code="overloaded"))
                return
            # a full batch plus `max_queued` waiting, counting the batch's free rows as room: rows that just
            # finished leave the batch before the waiting ones are admitted at the next step
            free_rows = max(0, self.cfg.max_batch_size - self._running_rows)
            if len(self._queue) >= self.cfg.max_queued + free_rows:
                yield _error_event(APIError(429, f"this replica already has {len(self._queue)} requests waiting; "
                                            "retry shortly", code="rate_limit_exceeded"))
                return
            self._queue.append(job)
            self._cond.notify_all()
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
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # -- worker side (thread) --

    def _admit(self, batch: DecodeBatch) -> list[_Job] | None:
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
                room = cap - len(batch.rows)
                now = time.monotonic()
                if batch.rows:
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
        batch = DecodeBatch(self.model, self._generator)
        while True:
            admitted: list[_Job] | None = None
            try:
                admitted = self._admit(batch)
                if admitted is None:
                    return
                started = time.perf_counter()
                with self._cond:
                    self._step_started = time.monotonic()
                with torch.inference_mode():
                    if admitted:
                        self._join(batch, admitted)
                    if batch.rows:
                        self._step(batch)
                with self._cond:
                    self._stats["busy_s"] += time.perf_counter() - started
                    self._step_started = None
                    self._running_rows = len(batch.rows)
            except Exception:  # noqa: BLE001 - a shared step failed: fail the batch's requests, keep serving
                running = [row.payload for row in batch.rows]
                failed = running + [j for j in (admitted or []) if j not in running]
                logger.exception("decode step failed for requests %s", ", ".join(j.request_id for j in failed))
                self._deliver([(j, _internal_error(j.request_id)) for j in failed if not j.done])
                for job in failed:
                    job.done = True
                with self._cond:
                    self._step_started = None
                    self._running_rows = 0
                    self._failures_in_a_row += 1
                    self._stats["batch_failures"] += 1
                batch = DecodeBatch(self.model, self._generator)

    def _fail(self, job: _Job, what: str) -> None:
        """Fail one request (logged with its id), leaving the others to run."""
        logger.exception("%s failed for request %s", what, job.request_id)
        job.done = True
        self._deliver([(job, _internal_error(job.request_id))])
        with self._cond:
            self._stats["request_failures"] += 1

    def _encode(self, jobs: list[_Job]) -> dict[int, torch.Tensor]:
        """Tower features by job index: one call for all images, and image by image when that fails."""
        with_image = [i for i, j in enumerate(jobs) if j.image is not None]
        if not with_image:
            return {}
        try:
            encoded = encode_images(self.tower, [jobs[i].image for i in with_image])  # M x [N, Dv]
            return dict(zip(with_image, encoded, strict=True))
        except Exception:  # noqa: BLE001 - find the image at fault and fail its request only
            logger.warning("encoding %d images together failed; encoding them one by one", len(with_image))
        features = {}
        for i in with_image:
            try:
                features[i] = encode_images(self.tower, [jobs[i].image])[0]
            except Exception:  # noqa: BLE001
                self._fail(jobs[i], "encoding the image")
        return features

    def _join(self, batch: DecodeBatch, jobs: list[_Job]) -> None:
        """Encode the newcomers' images in one tower call and prefill them into the batch; a newcomer whose
        image, seed or prefill fails is failed alone."""
        features = self._encode(jobs)
        ready: list[_Job] = []
        for i, job in enumerate(jobs):
            if job.done:
                continue
            try:
                job.row.payload = job
                job.row.features = features[i] if job.image is not None else None
                if job.seed is not None and job.row.temperature > 0:  # its own draws, whoever its neighbours are
                    job.row.generator = seeded_generator(job.seed)
            except Exception:  # noqa: BLE001
                self._fail(job, "setting up sampling")
                continue
            ready.append(job)
        if not ready:
            return
        joined = True
        try:
            batch.join([job.row for job in ready])
        except Exception:  # noqa: BLE001 - prefill them one at a time to find the request at fault
            joined = False
            if len(ready) == 1:
                self._fail(ready[0], "prefill")
            else:
                logger.warning("prefilling %d requests together failed; prefilling them one by one", len(ready))
                for job in ready:
                    try:
                        batch.join([job.row])
                        joined = True
                    except Exception:  # noqa: BLE001
                        self._fail(job, "prefill")
        if batch.mask is not None and batch.mask.shape[0] != len(batch.rows):
            raise RuntimeError("a failed prefill left the batch inconsistent")
        with self._cond:
            self._stats["admissions"] += 1
            # one request's bad prefill is followed by others' good ones; a broken model fails them all
            self._failures_in_a_row = 0 if joined else self._failures_in_a_row + 1

    def _step(self, batch: DecodeBatch) -> None:
        """Sample one token per row, send each row's text, drop finished rows, run the survivors one step."""
        tokens = batch.sample().tolist()  # [B]
        out: list[tuple[_Job, dict[str, Any]]] = []
        emitted = 0
        for row, tok in zip(batch.rows, tokens, strict=True):
            job: _Job = row.payload
            if job.cancelled:
                row.finish_reason = "cancelled"
                job.done = True
                continue
            try:
                new = row.accept(tok, self._stops)
                emitted += len(new)
                delta, stopped = job.text.push(new)
                if stopped:
                    row.finish_reason = "stop"
                elif row.finish_reason is not None:
                    delta += job.text.flush()
            except Exception:  # noqa: BLE001 - this row's detokenisation failed: drop it, keep the rest
                row.finish_reason = "error"
                self._fail(job, "detokenising")
                continue
            if delta:
                out.append((job, {"type": "delta", "text": delta}))
            if row.finish_reason is not None:
                job.done = True
                out.append((job, {"type": "finish", "finish_reason": row.finish_reason,
                                  "completion_tokens": row.generated}))
        self._deliver(out)
        keep = [i for i, row in enumerate(batch.rows) if row.finish_reason is None]
        with self._cond:
            self._stats["steps"] += 1
            self._stats["row_steps"] += len(batch.rows)
            self._stats["max_batch"] = max(self._stats["max_batch"], len(batch.rows))
            self._stats["sequences"] += len(batch.rows) - len(keep)
            self._stats["tokens"] += emitted
        batch.keep(keep)
        if batch.rows:
            batch.step()
        with self._cond:
            self._failures_in_a_row = 0

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
