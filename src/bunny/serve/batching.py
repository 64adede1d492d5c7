"""Continuous batching: requests join the running batch at the next decode step.

One worker thread owns the model and keeps one running batch: every row's KV cache, left
padded to a common length, an attention mask and the token each row feeds next. Before
each decode step it takes the waiting jobs that fit (up to `max_batch_size` rows in all),
prefills them together, and merges their cache rows into the running batch; the step then
decodes one token for every row, each row with its own sampling settings, budget and stop
strings. A row that ends (stop, length, cancelled) leaves at once and its cache rows are
dropped, with the columns that only padding still occupied. When the batch is empty the
worker waits a short window so that requests sent together are prefilled together.

Greedy rows give exactly the tokens they would give alone: positions count each row's real
tokens only and padding is masked, so neither padding nor the other rows change a row's
attention (as `bunny.model.generation.iter_tokens` does for one batch). A sampled row draws
from its own seeded generator, as it would alone.

The cache is a plain `DynamicCache()` (every layer keeps every key) rather than one built
from the config: rows can then be re-padded and merged layer by layer, and a sliding window
is still applied by the attention mask, because every row ends at the same column, so a
distance in columns is a distance in tokens.
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
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last event
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


@dataclass
class _Row:
    job: Job
    text: RowText
    generator: torch.Generator | None  # None: greedy
    count: int = 0  # tokens generated so far


@dataclass
class _Batch:
    """Rows being decoded together. Every row's cache ends at the same column."""

    rows: list[_Row]
    cache: DynamicCache  # keys and values (B, heads, T, head_dim) per layer, left padded
    mask: torch.Tensor  # (B, T): 1 where a row has a real token
    tokens: torch.Tensor | None = None  # (B,): each row's newest token, fed at the next step


class BatchScheduler:
    def __init__(self, model, processor, max_batch_size: int = 8, max_queue: int = 64,
                 batch_window_s: float = 0.005):
        if max_batch_size < 1 or max_queue < 1:
            raise BunnyError(f"max_batch_size and max_queue must be at least 1, got {max_batch_size} and {max_queue}")
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queue, self.batch_window_s = max_batch_size, max_queue, batch_window_s
        self.eos_ids = processor.stop_token_ids()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running = threading.Event()  # cleared = paused (jobs queue up, nothing runs)
        self._running.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.active = 0  # rows in the running batch
        self.prefills_run = 0  # forward passes that started rows
        self.steps_run = 0  # decode steps
        self.joined_running = 0  # rows that joined a batch already decoding
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
        """Hold all work at the next step boundary (jobs keep queueing); for maintenance and tests."""
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
        batch: _Batch | None = None
        while True:
            with self._cv:
                while not self._stopping and (not self._running.is_set() or (batch is None and not self._waiting)):
                    self._cv.wait(0.1)
                if self._stopping and batch is None and not self._waiting:
                    return
            if batch is None and self.batch_window_s and len(self._waiting) < self.max_batch_size:
                time.sleep(self.batch_window_s)  # let requests sent together arrive together
            batch = self._admit(batch)
            if batch is not None:
                try:
                    batch = self._step(batch)
                except Exception as exc:  # a failed step must not take the server down
                    log.exception("decode step of %d rows failed", len(batch.rows))
                    _fail([r.job for r in batch.rows], exc)
                    batch = None
            self.active = len(batch.rows) if batch is not None else 0

    def _admit(self, batch: _Batch | None) -> _Batch | None:
        """Prefill the waiting jobs that fit and merge them into `batch`."""
        room = self.max_batch_size - (len(batch.rows) if batch is not None else 0)
        with self._cv:
            jobs = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return batch
        try:
            joining = self._prefill(jobs)
        except Exception as exc:  # only the new jobs fail; the running batch goes on
            log.exception("prefill of %d requests failed", len(jobs))
            _fail(jobs, exc)
            return batch
        if joining is None:
            return batch
        if batch is None:
            merged = joining
        else:
            self.joined_running += len(joining.rows)
            merged = _merge(batch, joining)
        self.largest_batch = max(self.largest_batch, len(merged.rows))
        return merged

    @torch.inference_mode()
    def _prefill(self, jobs: list[Job]) -> _Batch | None:
        """Run the prompts of `jobs` (one forward pass) and pick each one's first token."""
        model, lm = self.model, self.model.language_model
        device = model.device
        self.prefills_run += 1
        ids, mask = pad_rows([j.input_ids for j in jobs], self.processor.pad_token_id, "left")
        ids, mask = ids.to(device), mask.to(device)
        pixels = [j.pixel_values for j in jobs if j.pixel_values is not None]
        pixel_values = torch.cat(pixels).to(device) if pixels else None
        embeds = model.embed_inputs(ids, pixel_values)  # (B, T, H)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                 cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        stops = self.processor.stop_strings
        rows = [_Row(j, RowText(self.processor, j.settings.stop_strings + stops, self.eos_ids),
                     self._generator(j, device)) for j in jobs]
        return self._advance(_Batch(rows, out.cache, mask), out.logits[:, -1])

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> _Batch | None:
        """Feed every row its newest token and pick the next one."""
        self.steps_run += 1
        mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        position = mask.sum(-1, keepdim=True) - 1
        out = self.model.language_model(input_ids=batch.tokens[:, None], attention_mask=mask, position_ids=position,
                                        cache=batch.cache, use_cache=True, logits_to_keep=1)
        return self._advance(_Batch(batch.rows, out.cache, mask), out.logits[:, -1])

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Pick each row's next token from `logits` (B, V), report it, and drop the rows that
        ended. None when no row is left."""
        tokens = logits.argmax(-1)  # greedy rows; a sampled row draws alone, from its own generator
        for r, row in enumerate(batch.rows):
            if row.generator is not None:
                tokens[r] = _pick(logits[r:r + 1], row.job.settings, row.generator)[0]
        keep = []
        for r, (row, token) in enumerate(zip(batch.rows, tokens.tolist())):
            job = row.job
            delta, reason = row.text.push(token)
            if reason is None:
                row.count += 1
                if row.count >= job.settings.max_new_tokens:
                    delta += row.text.flush()
                    reason = "length"
            elif token not in row.text.eos:
                row.count += 1  # the token that completed a stop string was generated
            if job.cancelled:
                reason = reason or "cancelled"
            if delta or reason:
                job.on_event(Event(text=delta, finish_reason=reason, completion_tokens=row.count))
            if reason is None:
                keep.append(r)
        if not keep:
            return None
        batch.tokens = tokens
        if len(keep) < len(batch.rows):
            batch = _select(batch, keep)
        return batch

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


def _fail(jobs: list[Job], exc: Exception) -> None:
    for job in jobs:
        job.on_event(Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))


def _select(batch: _Batch, keep: list[int]) -> _Batch:
    """The rows `keep` of `batch`; columns that are padding in every kept row are cut off."""
    index = torch.tensor(keep, device=batch.mask.device)
    batch.cache.batch_select_indices(index)
    mask, tokens = batch.mask[index], batch.tokens[index]
    start = int((mask.sum(0) > 0).nonzero()[0])  # the first column a kept row uses
    cache = batch.cache
    if start > 0:
        cache = DynamicCache([(k[:, :, start:], v[:, :, start:]) for k, v, _ in batch.cache])
        mask = mask[:, start:]
    return _Batch([batch.rows[r] for r in keep], cache, mask, tokens)


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch of the rows of `a` then `b`, the shorter left padded so both end together."""
    width = max(a.mask.shape[1], b.mask.shape[1])

    def pad(x: torch.Tensor, dim: int) -> torch.Tensor:  # left pad along `dim` up to `width`
        missing = width - x.shape[dim]
        if missing == 0:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    layers = [(torch.cat([pad(ka, 2), pad(kb, 2)]), torch.cat([pad(va, 2), pad(vb, 2)]))
              for (ka, va, _), (kb, vb, _) in zip(a.cache, b.cache, strict=True)]
    return _Batch(a.rows + b.rows, DynamicCache(layers), torch.cat([pad(a.mask, 1), pad(b.mask, 1)]),
                  torch.cat([a.tokens, b.tokens]))
