"""Continuous batching: a request that joins a batch mid-decode, and the rows that stay when
others leave, give exactly the tokens they give alone, and at every step the logits a full
recomputation of the row alone gives."""
import collections
import threading

import pytest
import torch

from bunny.model.generation import SamplingSettings, generate
from bunny.serve.batching import BatchScheduler, Job, _Batch, _merge, _select
from bunny.testing import make_tiny_bunny, random_image


def prompt_of(processor, text, image):
    parts = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": parts}])


def alone(model, processor, text, image, settings) -> str:
    """The library's own answer, run alone."""
    return generate(model, processor, [prompt_of(processor, text, image)], [[image] if image is not None else []],
                    settings)[0]


class Collector:
    """A job's events; `done` is set by the final one."""

    def __init__(self, scheduler, model, processor, text, image, settings, on_event=None):
        inputs = processor(text=[prompt_of(processor, text, image)], images=[[image]] if image is not None else None)
        self.pieces, self.final, self.done, self.hook = [], None, threading.Event(), on_event
        self.job = Job(inputs["input_ids"][0].tolist(), inputs.get("pixel_values"), settings, self.on_event)
        self.scheduler = scheduler

    def on_event(self, event):
        self.pieces.append(event.text)
        if self.hook is not None:
            self.hook(self, event)
        if event.finish_reason is not None:
            self.final = event
            self.done.set()

    @property
    def text(self) -> str:
        assert self.done.wait(60), "the job did not finish"
        return "".join(self.pieces).strip()


class Recording(BatchScheduler):
    """Keeps the logits each job's tokens were picked from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits = collections.defaultdict(list)

    def _advance(self, batch, logits):
        for r, row in enumerate(batch.rows):
            self.logits[id(row.job)].append(logits[r].clone())
        return super()._advance(batch, logits)


@torch.inference_mode()
def check_against_recomputation(model, scheduler, job):
    """Each step's logits of a greedy job equal the model's on the whole sequence so far, alone."""
    steps = scheduler.logits[id(job)]
    tokens = [int(x.argmax()) for x in steps]
    for k, logits in enumerate(steps):
        ids = torch.tensor([job.input_ids + tokens[:k]])
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=job.pixel_values).logits[0, -1]
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4, msg=f"step {k}")


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_bunny(seed=3)


def greedy(n):
    return SamplingSettings(max_new_tokens=n)


def test_requests_joining_mid_decode_get_their_alone_tokens(tiny):
    model, processor = tiny
    scheduler = Recording(model, processor, max_batch_size=4)
    cases = {"long": ("What is in the image?", random_image(1), greedy(24)),
             "short": ("Hi.", None, greedy(6)),  # shorter than the running rows: its cache is padded
             "wide": ("Describe the image in detail, please, and the colour of every shape in it.",
                      random_image(2), greedy(9))}  # longer: the running rows are padded
    order = []

    def join_others(collector, event):  # runs on the worker thread, between two decode steps
        order.append("long")
        if scheduler.steps_run == 3:
            for name in ("short", "wide"):
                scheduler.submit(jobs[name].job)

    jobs = {name: Collector(scheduler, model, processor, *case, on_event=join_others if name == "long" else None)
            for name, case in cases.items()}
    scheduler.submit(jobs["long"].job)
    scheduler.start()
    try:
        for name, (text, image, settings) in cases.items():
            assert jobs[name].text == alone(model, processor, text, image, settings), name
    finally:
        scheduler.stop(30)
    assert scheduler.joined_running == 2 and scheduler.largest_batch == 3
    assert jobs["long"].final.completion_tokens == 24  # it ran on while the others joined and left
    assert scheduler.prefills_run == 2
    for collector in jobs.values():
        check_against_recomputation(model, scheduler, collector.job)


def test_rows_leaving_or_cancelled_do_not_change_the_others(tiny):
    model, processor = tiny
    scheduler = Recording(model, processor, max_batch_size=8)
    cases = [(f"Question {i}: what is it?", random_image(i) if i % 2 else None, greedy(n))
             for i, n in enumerate([2, 17, 5, 11, 1, 8])]

    def cancel_after_two(collector, event):
        if len(collector.pieces) == 2:
            collector.job.cancelled = True

    cancelled = Collector(scheduler, model, processor, "Say something.", None, greedy(30), on_event=cancel_after_two)
    collectors = [Collector(scheduler, model, processor, *case) for case in cases]
    scheduler.pause()  # all in one prefill
    scheduler.start()
    for c in collectors[:3] + [cancelled] + collectors[3:]:
        scheduler.submit(c.job)
    scheduler.resume()
    try:
        assert [c.text for c in collectors] == [alone(model, processor, *case) for case in cases]
        assert cancelled.text is not None and cancelled.final.finish_reason == "cancelled"
    finally:
        scheduler.stop(30)
    assert scheduler.prefills_run == 1 and scheduler.largest_batch == 6  # the 1-token row ended at its prefill
    for collector in collectors:
        check_against_recomputation(model, scheduler, collector.job)


def test_seeded_sampled_row_joining_mid_decode_draws_as_alone(tiny):
    model, processor = tiny
    sampled = SamplingSettings(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)

    def run(join: bool) -> str:
        scheduler = BatchScheduler(model, processor, max_batch_size=4)
        target = Collector(scheduler, model, processor, "Tell me a story.", None, sampled)

        def join_target(collector, event):
            if scheduler.steps_run == 2:
                scheduler.submit(target.job)

        if join:
            scheduler.submit(Collector(scheduler, model, processor, "What is it?", random_image(4), greedy(20),
                                       on_event=join_target).job)
        else:
            scheduler.submit(target.job)
        scheduler.start()
        try:
            return target.text
        finally:
            assert scheduler.joined_running == int(join)
            scheduler.stop(30)

    assert run(join=True) == run(join=False)


def test_sliding_window_model_joins_mid_decode_as_alone():
    model, processor = make_tiny_bunny(family="phi3", seed=6)
    text_config = model.language_model.config
    assert text_config.sliding_window is None
    long_settings = greedy(20)
    before = alone(model, processor, "What is in the image?", random_image(3), long_settings)
    text_config.sliding_window = 8  # shorter than the prompts: the window decides the answer
    expected = alone(model, processor, "What is in the image?", random_image(3), long_settings)
    assert expected != before  # the window is in force
    scheduler = Recording(model, processor, max_batch_size=2)

    def join_other(collector, event):
        if scheduler.steps_run == 4:
            scheduler.submit(other.job)

    first = Collector(scheduler, model, processor, "What is in the image?", random_image(3), long_settings,
                      on_event=join_other)
    other = Collector(scheduler, model, processor, "Hi there.", None, greedy(7))
    scheduler.submit(first.job)
    scheduler.start()
    try:
        assert first.text == expected
        assert other.text == alone(model, processor, "Hi there.", None, greedy(7))
    finally:
        scheduler.stop(30)
    assert scheduler.joined_running == 1
    check_against_recomputation(model, scheduler, first.job)
    check_against_recomputation(model, scheduler, other.job)


def test_merge_then_select_gives_back_each_batch():
    def batch(rows, width, seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(rows, width, dtype=torch.long)
        mask[0, :2] = 0
        layers = [(torch.randn(rows, 2, width, 4, generator=g), torch.randn(rows, 2, width, 4, generator=g))
                  for _ in range(3)]
        from transformers import DynamicCache
        return _Batch(list(range(rows)), DynamicCache(layers), mask, torch.arange(rows))

    a, b = batch(2, 5, 0), batch(3, 9, 1)
    originals = {name: [(k.clone(), v.clone()) for k, v, _ in x.cache] for name, x in (("a", a), ("b", b))}
    masks = {"a": a.mask.clone(), "b": b.mask.clone()}
    merged = _merge(a, b)
    assert merged.mask.shape == (5, 9) and merged.mask[:2, :4].sum() == 0  # a's rows left padded by 4
    back_a = _select(_merge(a, b), [0, 1])  # padding shared by every kept row is cut again
    back_b = _select(merged, [2, 3, 4])
    for name, back in (("a", back_a), ("b", back_b)):
        assert torch.equal(back.mask, masks[name])
        for (k, v, _), (k0, v0) in zip(back.cache, originals[name]):
            assert torch.equal(k, k0) and torch.equal(v, v0)
