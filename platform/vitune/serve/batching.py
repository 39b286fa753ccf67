"""Continuous batching on one engine: the queue of admitted jobs and the worker thread that decodes them.

Requests wait in one queue; a worker thread owns the running `DecodeBatch` and loops: admit waiting jobs (all their
images, any number per job, through the tower in one `encode_image_tiles` call, each image as its recipe tiles it
or as its base view alone for `detail: low`; then one prefill that joins the running rows), sample one
token per row, detokenise and push each row's text to its caller's asyncio queue (so streams get tokens as they
are made), drop rows that finished (EOS, a stop string, their own `max_tokens`, or their caller going away), and
run the survivors one step. New jobs join at the next step boundary; nobody waits for a whole batch to end. Each
row samples with its own temperature and top_p; a job with a `seed` draws from its own generator, so its tokens
do not depend on its neighbours' draws. At most `max_batch_size` rows decode at once and `max_queued` jobs wait
beyond the batch's free rows; `submit` refuses more (`QueueFull`).

Isolation: a failure tied to one job (its image, its seed, its prefill, its detokenisation) fails that job alone
with `GenerationFailed`; the others keep decoding. Only a failure of the shared step fails the running batch, and
`health()` turns bad after `unhealthy_after_failures` of those in a row or a step running longer than
`stuck_after_s`, so Serve replaces the replica. Error events carry no exception text (it is logged with the
request id, which the client sees).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from vitune.config import ServeConfig
from vitune.model.decoding import DecodeBatch, seeded_generator
from vitune.model.vision import encode_image_tiles
from vitune.serve.admission import Job
from vitune.serve.errors import EngineError, GenerationFailed, QueueFull, ReplicaClosing, error_event

logger = logging.getLogger(__name__)


class ContinuousBatcher:
    """The queue and the worker thread of one engine (see the module docstring); `close()` stops it."""

    def __init__(self, model: Any, tower: Any, stops: set[int], cfg: ServeConfig) -> None:
        self.model = model
        self.tower = tower
        self.cfg = cfg  # read at each use: tests and operators may tune its limits live
        self._stops = stops
        self._generator = seeded_generator()  # shared by the jobs without a seed
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stats = {"steps": 0, "row_steps": 0, "max_batch": 0, "admissions": 0, "sequences": 0, "tokens": 0,
                       "busy_s": 0.0, "request_failures": 0, "batch_failures": 0}
        self._failures_in_a_row = 0  # failed shared steps since the last good one
        self._running_rows = 0  # rows in the running batch after the last step
        self._step_started: float | None = None  # when the step now running began (None: idle)
        self._worker = threading.Thread(target=self._work, name="vitune-engine", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> EngineError | None:
        """Queue `job`; the error that refuses it instead (shutting down, queue full), or None."""
        with self._cond:
            if self._closed:
                return ReplicaClosing.now()
            # a full batch plus `max_queued` waiting, counting the batch's free rows as room: rows that just
            # finished leave the batch before the waiting ones are admitted at the next step
            free_rows = max(0, self.cfg.max_batch_size - self._running_rows)
            if len(self._queue) >= self.cfg.max_queued + free_rows:
                return QueueFull.waiting(len(self._queue))
            self._queue.append(job)
            self._cond.notify_all()
        return None

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {**self._stats, "queued": len(self._queue), "running": self._running_rows,
                    "alive": self._worker.is_alive()}

    def health(self) -> str | None:
        """Why this batcher cannot decode (worker stopped, shared steps failing, a step stuck), or None."""
        if not self._worker.is_alive() and not self._closed:
            return "the engine's worker thread has stopped"
        with self._cond:
            failures, started = self._failures_in_a_row, self._step_started
        if failures >= self.cfg.unhealthy_after_failures:
            return f"the last {failures} decode steps failed (prefill or decode, with no success since)"
        if started is not None and time.monotonic() - started > self.cfg.stuck_after_s:
            return f"a decode step has run for {time.monotonic() - started:.0f} s"
        return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    def _admit(self, batch: DecodeBatch) -> list[Job] | None:
        """Jobs to join `batch` now (`[]`: none yet); blocks while nothing runs; None once closed.

        An empty batch fills while requests keep arriving: it starts once none came for
        `batch_wait_timeout_s`, or `max_batch_wait_s` after the first. A running batch admits the
        waiting jobs once the oldest has waited `batch_wait_timeout_s` (or they fill it), so one
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
            admitted: list[Job] | None = None
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
            except Exception:  # noqa: BLE001 - a shared step failed: fail the batch's jobs, keep serving
                running = [row.payload for row in batch.rows]
                failed = running + [j for j in (admitted or []) if j not in running]
                logger.exception("decode step failed for requests %s", ", ".join(j.request_id for j in failed))
                self._deliver([(j, error_event(GenerationFailed.of(j.request_id))) for j in failed if not j.done])
                for job in failed:
                    job.done = True
                with self._cond:
                    self._step_started = None
                    self._running_rows = 0
                    self._failures_in_a_row += 1
                    self._stats["batch_failures"] += 1
                batch = DecodeBatch(self.model, self._generator)

    def _fail(self, job: Job, what: str) -> None:
        """Fail one job (logged with its id), leaving the others to run."""
        logger.exception("%s failed for request %s", what, job.request_id)
        job.done = True
        self._deliver([(job, error_event(GenerationFailed.of(job.request_id)))])
        with self._cond:
            self._stats["request_failures"] += 1

    def _tiles(self, job: Job) -> list[torch.Tensor]:
        return encode_image_tiles(self.tower, job.images, job.base_only or [False] * len(job.images))

    def _encode(self, jobs: list[Job]) -> dict[int, list[torch.Tensor]]:
        """Tower features by job index, each job's `[T_i, N, Dv]` per image in placeholder order: one call for
        all images of all jobs, and job by job when that fails."""
        with_image = [i for i, j in enumerate(jobs) if j.images]
        if not with_image:
            return {}
        images = [image for i in with_image for image in jobs[i].images]
        base_only = [low for i in with_image for low in (jobs[i].base_only or [False] * len(jobs[i].images))]
        try:
            encoded = iter(encode_image_tiles(self.tower, images, base_only))  # M x [T_i, N, Dv]
            return {i: [next(encoded) for _ in jobs[i].images] for i in with_image}
        except Exception:  # noqa: BLE001 - find the image at fault and fail its job only
            logger.warning("encoding %d images together failed; encoding them job by job", len(images))
        features = {}
        for i in with_image:
            try:
                features[i] = self._tiles(jobs[i])
            except Exception:  # noqa: BLE001
                self._fail(jobs[i], "encoding the images")
        return features

    def _join(self, batch: DecodeBatch, jobs: list[Job]) -> None:
        """Encode the newcomers' images in one tower call and prefill them into the batch; a newcomer whose
        image, seed or prefill fails is failed alone."""
        features = self._encode(jobs)
        ready: list[Job] = []
        for i, job in enumerate(jobs):
            if job.done:
                continue
            try:
                job.row.payload = job
                job.row.features = features[i] if job.images else None
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
        except Exception:  # noqa: BLE001 - prefill them one at a time to find the job at fault
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
            # one job's bad prefill is followed by others' good ones; a broken model fails them all
            self._failures_in_a_row = 0 if joined else self._failures_in_a_row + 1

    def _step(self, batch: DecodeBatch) -> None:
        """Sample one token per row, send each row's text, drop finished rows, run the survivors one step."""
        tokens = batch.sample().tolist()  # [B]
        out: list[tuple[Job, dict[str, Any]]] = []
        emitted = 0
        for row, tok in zip(batch.rows, tokens, strict=True):
            job: Job = row.payload
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
    def _deliver(items: list[tuple[Job, dict[str, Any]]]) -> None:
        by_loop: dict[int, list[tuple[Job, dict[str, Any]]]] = {}
        for job, ev in items:
            by_loop.setdefault(id(job.loop), []).append((job, ev))
        for group in by_loop.values():
            loop = group[0][0].loop

            def put(group: list[tuple[Job, dict[str, Any]]] = group) -> None:
                for job, ev in group:
                    job.events.put_nowait(ev)

            try:
                loop.call_soon_threadsafe(put)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass
