"""Tiny LLaVA datasets and recipes for the training tests (seconds on a CPU)."""
from __future__ import annotations

import json
from pathlib import Path

from bunny.testing import random_image
from bunny.train.recipe import Recipe

ANSWERS = ["red", "blue", "green", "yellow"]


def write_dataset(folder: Path, n: int = 8, text_only: int = 0, name: str = "data.json") -> Path:
    """n image samples (2 QA turns each) plus `text_only` samples without an image."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    records = []
    for i in range(n):
        random_image(seed=i, size=(28, 28)).save(folder / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the square?"},
            {"from": "gpt", "value": ANSWERS[i % 4]},
            {"from": "human", "value": "Is there a circle?"},
            {"from": "gpt", "value": "Yes" if i % 2 else "No"}]})
    for i in range(text_only):
        records.append({"id": f"t{i}", "conversations": [
            {"from": "human", "value": "Answer the question."}, {"from": "gpt", "value": "Yes."}]})
    path = folder / name
    path.write_text(json.dumps(records))
    return path


def write_captions(folder: Path, n: int = 8) -> Path:
    """Stage 1's data: `write_dataset`'s n image samples cut to their first turn (one caption-like
    answer per image, as the `plain` template renders)."""
    path = write_dataset(folder, n=n)
    records = json.loads(path.read_text())
    for r in records:
        r["conversations"] = r["conversations"][:2]
    path.write_text(json.dumps(records))
    return path


def tiny_recipe(tmp: Path, data: Path, **kw) -> Recipe:
    fields = dict(stage="finetune", tune="lora", data_path=str(data), output_dir=str(tmp / "run"),
                  per_device_batch_size=2, grad_accum=1, max_steps=3, lr=1e-2, lora_r=4, lora_alpha=8,
                  lora_dropout=0.0, warmup_ratio=0.0, tensorboard=False, progress_bar=False,
                  save_full_model=False, num_threads=1)
    fields.update(kw)
    return Recipe(**fields)
