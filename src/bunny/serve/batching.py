"""Dynamic batching: requests that arrive together share forward passes.

One worker thread owns the model. Each round it takes every waiting job (up to
`max_batch_size`, after a short window so that requests sent together land together),
left-pads them into one batch, prefills once and then decodes one token for every row per
step, each row with its own sampling settings, budget and stop strings. A row that ends is
removed from the batch and its KV-cache rows dropped, so long answers do not make short
ones pay. Jobs arriving during a round wait for the next one (no joining mid-decode).

Greedy rows give exactly the tokens they would give alone: positions restart at each row's
first real token (left padding is invisible), as `bunny.model.generation.iter_tokens` does.
A sampled row draws from its own seeded generator, as it would alone.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from bunny.errors import BunnyError
from bunny.model.generation import SamplingSettings, _pick, cut_at_stop, safe_stream_length
from bunny.model.modeling import positions_from_mask
from bunny.model.processor import pad_rows

log = logging.getLogger("bunny.serve")


class QueueFull(Exception):
    """The waiting queue is at capacity; the caller should retry later."""


@dataclass
class Event:
    """What the worker reports for a job: a text delta, then one final event."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "error" on the last event
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Job:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W) in placeholder order, or None
    settings: SamplingSettings
    on_event: Callable[[Event], None]  # called from the worker thread
    cancelled: bool = False  # set by the caller when the client went away
    submitted_at: float = field(default_factory=time.monotonic)


class RowText:
    """Incremental text of one row: emits deltas, never a stop string or half a character."""

    def __init__(self, processor, stops: list[str], eos_ids: list[int]):
        self.processor, self.stops, self.eos = processor, [s for s in stops if s], set(eos_ids)
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> tuple[str, str | None]:
        """(delta, finish reason or None) after one more generated token."""
        if token in self.eos:
            return self.flush(), "stop"
        self.ids.append(token)
        text = self.processor.decode(self.ids)
        final = cut_at_stop(text, self.stops)
        if final != text:  # a stop string completed
            return self._advance(final), "stop"
        return self._advance(text[:safe_stream_length(text, self.stops)]), None

    def flush(self) -> str:
        return self._advance(cut_at_stop(self.processor.decode(self.ids), self.stops))

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.shown):
            return ""
        delta, self.shown = text[len(self.shown):], text
        return delta


class BatchScheduler:
    def __init__(self, model, processor, max_batch_size: int = 8, max_queue: int = 64,
                 batch_window_s: float = 0.005):
        if max_batch_size < 1 or max_queue < 1:
            raise BunnyError("max_batch_size and max_queue must be at least 1")
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queue, self.batch_window_s = max_batch_size, max_queue, batch_window_s
        self.eos_ids = processor.stop_token_ids()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running = threading.Event()  # cleared = paused (jobs queue up, nothing runs)
        self._running.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.active = 0  # jobs in the batch being decoded
        self.batches_run = 0
        self.largest_batch = 0

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="bunny-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued and running job, then end the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._running.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def pause(self) -> None:
        """Hold new rounds (jobs keep queueing); for maintenance and tests."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        with self._cv:
            self._cv.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._cv.notify_all()

    # -- worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and (not self._waiting or not self._running.is_set()):
                    self._cv.wait(0.1)
                if self._stopping and not self._waiting:
                    return
            if self.batch_window_s and len(self._waiting) < self.max_batch_size:
                time.sleep(self.batch_window_s)  # let requests sent together arrive together
            with self._cv:
                jobs = [self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))]
            jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                continue
            self.active = len(jobs)
            try:
                self.run_batch(jobs)
            except Exception as exc:  # a failed batch must not take the server down
                log.exception("batch of %d failed", len(jobs))
                for job in jobs:
                    job.on_event(Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
            finally:
                self.active = 0

    @torch.inference_mode()
    def run_batch(self, jobs: list[Job]) -> None:
        model, lm = self.model, self.model.language_model
        device = model.device
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        ids, mask = pad_rows([j.input_ids for j in jobs], self.processor.pad_token_id, "left")
        ids, mask = ids.to(device), mask.to(device)
        pixels = [j.pixel_values for j in jobs if j.pixel_values is not None]
        pixel_values = torch.cat(pixels).to(device) if pixels else None
        cache = DynamicCache(config=lm.config)
        embeds = model.embed_inputs(ids, pixel_values)  # (B, T, H)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), cache=cache,
                 use_cache=True, logits_to_keep=1)
        generators = [self._generator(j, device) for j in jobs]
        texts = [RowText(self.processor, j.settings.stop_strings + self.processor.stop_strings, self.eos_ids)
                 for j in jobs]
        counts = [0] * len(jobs)
        alive = list(range(len(jobs)))  # job index of each batch row
        while alive:
            logits = out.logits[:, -1]  # (B_alive, V)
            tokens = logits.argmax(-1)  # greedy rows; sampled rows draw alone, from their own generator
            for r, i in enumerate(alive):
                if generators[i] is not None:
                    tokens[r] = _pick(logits[r:r + 1], jobs[i].settings, generators[i])[0]
            keep = []
            for r, (i, token) in enumerate(zip(alive, tokens.tolist())):
                job = jobs[i]
                delta, reason = texts[i].push(token)
                if reason is None:
                    counts[i] += 1
                    if counts[i] >= job.settings.max_new_tokens:
                        delta += texts[i].flush()
                        reason = "length"
                elif token not in texts[i].eos:
                    counts[i] += 1  # the token that completed a stop string was generated
                if job.cancelled:
                    reason = reason or "cancelled"
                if delta or reason:
                    job.on_event(Event(text=delta, finish_reason=reason, completion_tokens=counts[i]))
                if reason is None:
                    keep.append(r)
            if not keep:
                return
            if len(keep) < len(alive):  # drop ended rows from the batch and the cache
                index = torch.tensor(keep, device=device)
                out.cache.batch_select_indices(index)
                mask, tokens = mask[index], tokens[index]
                alive = [alive[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            position = mask.sum(-1, keepdim=True) - 1
            out = lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=position, cache=out.cache,
                     use_cache=True, logits_to_keep=1)

    @staticmethod
    def _generator(job: Job, device) -> torch.Generator | None:
        if job.settings.temperature <= 0:
            return None
        generator = torch.Generator(device=device)
        if job.settings.seed is not None:
            generator.manual_seed(job.settings.seed)
        else:
            generator.seed()  # fresh entropy, as an unseeded OpenAI request expects
        return generator
