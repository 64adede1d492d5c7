"""Running a model over benchmark samples: reference prompts, greedy batched generation,
and a predictions JSONL that is appended batch by batch and resumed by question id.

Batches are formed from samples sorted by prompt length (less padding); the file is
rewritten in dataset order once every sample is answered, so its content does not depend
on the batch size. Generation is left-padded with an attention mask, so a batch gives the
same answers as each sample alone.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from bunny.atomic import atomic_write
from bunny.errors import BunnyError
from bunny.eval.datasets import decode_image, prediction_record
from bunny.eval.prompts import MAX_NEW_TOKENS, build_prompt

IMAGE_TOKEN = "<image>"
# The reference's ScienceQA script calls the tower's processor directly: no padding to a square.
IMAGE_MODE_OVERRIDE = {"scienceqa": "square"}


def question_key(question_id) -> str:
    """A hashable, type-preserving key (1 and "1" differ), as records.check_unique_ids uses."""
    return json.dumps(question_id, sort_keys=True)


def chat_prompt(processor, benchmark: str, sample: dict) -> tuple[str, list]:
    """The templated prompt text ("<image>\\n" per image, then the question) and the
    image references of `sample`."""
    text, images = build_prompt(benchmark, sample)
    if IMAGE_TOKEN in text:
        raise BunnyError(f"{benchmark}: question {sample['question_id']!r} contains the literal "
                         f"{IMAGE_TOKEN} placeholder in its text")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                           add_generation_prompt=True)
    return prompt, images


def image_key(refs: list) -> str:
    """One string per distinct list of image references: their bytes' digest (or path)."""
    import hashlib

    from PIL import Image

    parts = []
    for ref in refs:
        if isinstance(ref, Image.Image):
            data = ref.tobytes()
        elif isinstance(ref, dict):
            data = ref.get("bytes") or str(ref.get("path")).encode()
        else:
            data = bytes(ref)
        parts.append(hashlib.sha1(data).hexdigest())
    return ",".join(parts)


def eval_processor(processor, benchmark: str):
    """The processor with the image mode the reference uses for `benchmark`."""
    mode = IMAGE_MODE_OVERRIDE.get(benchmark)
    if mode is None or mode == processor.image_mode:
        return processor
    changed = copy.copy(processor)
    changed.image_mode = mode
    return changed


# -- the predictions file -------------------------------------------------------------------
def load_done(path: Path) -> dict[str, dict]:
    """Records already in `path`, by question key. A last line cut short by an interrupted
    write is dropped (the file is truncated to its last complete line); any other bad line
    is an error."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # an interrupted append: drop the partial line
        with path.open("r+b") as f:
            f.truncate(end)
        data = data[:end]
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BunnyError(f"{path}:{lineno}: not valid JSON ({exc.msg}); "
                             f"remove the line or the file to start again") from None
        if not isinstance(record, dict) or "question_id" not in record or \
                not isinstance(record.get("prediction"), str):
            raise BunnyError(f"{path}:{lineno}: not a prediction record "
                             f"(needs question_id and prediction)")
        done[question_key(record["question_id"])] = record
    return done


def count_pending(path: Path, samples: list[dict]) -> int:
    """How many of `samples` the predictions file does not answer yet."""
    done = load_done(Path(path))
    return sum(question_key(s["question_id"]) not in done for s in samples)


def append_records(path: Path, records: list[dict]) -> None:
    """Append whole lines in one write, flushed to disk: a crash loses at most this batch."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with path.open("a", encoding="utf-8") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def rewrite_in_order(path: Path, records: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# -- generation -----------------------------------------------------------------------------
def predict(benchmark: str, samples: list[dict], model, processor, predictions: str | Path,
            batch_size: int = 1, max_new_tokens: int | None = None, all_samples: list[dict] | None = None,
            progress: bool = True, share_prefix: bool = False, compile: bool = False) -> list[dict]:
    """Answer every sample not yet in the `predictions` file; return the records of
    `samples` in their order.

    `share_prefix`: questions about the same images are batched together and the prompt
    start they share (the images above all) runs once per batch (`generation.share_prefix`).

    `compile`: decode with a static KV cache and a compiled step (`bunny.model.decode_static`),
    the same greedy answers; a last batch smaller than `batch_size` is filled up with copies of
    its last prompt (answers dropped), so every batch has one shape and compiles at most once
    per cache-length bucket.

    `all_samples` (default: `samples`) is the whole dataset: the file may hold answers to
    any of them (an earlier run with another --limit), never to anything else.
    """
    from bunny.model.generation import SamplingSettings, generate
    from bunny.serve.llamacpp_engine import LlamaCppEngine

    if batch_size < 1:
        raise BunnyError(f"batch size must be at least 1, got {batch_size}")
    engine = model if isinstance(model, LlamaCppEngine) else None
    torch_only = [name for name, given in (("--share-prefix", share_prefix), ("--compile", compile)) if given]
    if engine is not None and torch_only:
        raise BunnyError(f"{' and '.join(torch_only)} {'run' if len(torch_only) > 1 else 'runs'} on the torch "
                         "engine; the llama.cpp engine answers one prompt at a time")
    path = Path(predictions)
    path.parent.mkdir(parents=True, exist_ok=True)
    all_samples = samples if all_samples is None else all_samples
    position = {question_key(s["question_id"]): i for i, s in enumerate(all_samples)}
    done = load_done(path)
    unknown = [k for k in done if k not in position]
    if unknown:
        raise BunnyError(f"{path} holds answers to {len(unknown)} questions that are not in this "
                         f"dataset (e.g. question_id {json.loads(unknown[0])!r}); "
                         f"use another --out or remove the file")
    todo = [s for s in samples if question_key(s["question_id"]) not in done]
    settings = SamplingSettings(max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[benchmark], compile=compile)
    proc = eval_processor(processor, benchmark)
    prompts = [chat_prompt(proc, benchmark, s) for s in todo]
    # Longest first: similar lengths share a batch, and memory errors show at once.
    lengths = [len(proc.tokenize(text)) for text, _ in prompts]
    order = sorted(range(len(todo)), key=lambda i: -lengths[i])
    if share_prefix:  # the same images together (first seen first), longest first inside
        keys = [image_key(refs) for _, refs in prompts]
        first = {}
        for i in order:
            first.setdefault(keys[i], len(first))
        order = sorted(order, key=lambda i: first[keys[i]])
    bar = _progress(len(samples), len(samples) - len(todo), benchmark, progress)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rows = chunk + chunk[-1:] * (batch_size - len(chunk)) if compile else chunk
            texts = [prompts[i][0] for i in rows]
            images = [[decode_image(ref) for ref in prompts[i][1]] for i in rows]
            if engine is not None:  # llama.cpp: one prompt at a time; share_prefix, compile refused above
                answers = engine.generate(proc, texts, images, settings)
            else:
                answers = generate(model, proc, texts, images if any(images) else None, settings,
                                   share_prefix=share_prefix)[:len(chunk)]
            records = [prediction_record(benchmark, todo[i], a) for i, a in zip(chunk, answers)]
            append_records(path, records)
            done.update((question_key(r["question_id"]), r) for r in records)
            bar.update(len(chunk))
    finally:
        bar.close()
    if todo:  # dataset order, whatever the batch size and the interruptions were
        rewrite_in_order(path, sorted(done.values(), key=lambda r: position[question_key(r["question_id"])]))
    return [done[question_key(s["question_id"])] for s in samples]


def _progress(total: int, initial: int, benchmark: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"eval {benchmark}", unit="q",
                disable=not enabled, dynamic_ncols=True)
