"""Evaluating the demo model on the synthetic held-out split with the real scorers.

Running the model lives here; scoring is the evaluation package's pure functions:
- yes/no pairs (one "yes", one "no" per image) scored MME-style (acc + acc+, category
  `existence`) and POPE-style (F1; easy "no" pairs as split `random`, hard ones as
  `adversarial`, the POPE split whose negatives co-occur with what is shown);
- open answers (colour, shape, count, position) by exact match after normalisation.
"""
from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from bunny.eval.parsers import parse_mme
from bunny.eval.scorers import score_mme, score_pope
from bunny.model.generation import SamplingSettings, generate
from bunny.model.templates import IMAGE_PLACEHOLDER


def read_eval_records(path: str | Path, max_images: int = 0) -> list[dict]:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if max_images:
        keep = sorted({r["image_id"] for r in records})[:max_images]
        records = [r for r in records if r["image_id"] in set(keep)]
    return records


def prompt_for(processor, question: str) -> str:
    return processor.apply_chat_template([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"}])


@torch.inference_mode()
def predict(model, processor, records: list[dict], image_root: Path, batch_size: int = 16,
            max_new_tokens: int = 4) -> list[dict]:
    """Each record with `prediction` added (greedy, batched; short answers only).

    A batch holds whole images (all questions about an image together, about `batch_size`
    prompts), so each image and the prompt start before its question run once
    (`share_prefix`) rather than once per question."""
    model.eval()
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_image[r["image"]].append(i)
    batches, current = [], []
    for members in by_image.values():
        if current and len(current) + len(members) > batch_size:
            batches.append(current)
            current = []
        current += members
    if current:
        batches.append(current)
    predictions: dict[int, str] = {}
    for chunk in batches:
        prompts = [prompt_for(processor, records[i]["prompt"]) for i in chunk]
        images = [str(image_root / records[i]["image"]) for i in chunk]
        answers = generate(model, processor, prompts, images, settings, share_prefix=True)
        predictions.update(zip(chunk, answers))
    return [{**r, "prediction": predictions[i]} for i, r in enumerate(records)]


def normalise(text: str) -> str:
    """First line, lowercase, letters/digits/spaces only: a short answer that runs on past
    its end-of-turn token ("red\nWhat color...") still counts by its first line."""
    first = text.strip().split("\n")[0]
    return re.sub(r"[^a-z0-9 ]", "", first.lower()).strip()


def score(predictions: list[dict]) -> dict:
    yes_no = [r for r in predictions if r["kind"] == "yes_no"]
    opens = [r for r in predictions if r["kind"] == "open"]
    result: dict = {}
    if yes_no:
        result["yes_no_accuracy"] = sum(parse_mme(r["prediction"]) == r["answer"] for r in yes_no) / len(yes_no)
        mme = [{"prediction": r["prediction"], "answer": r["answer"], "image": r["image"], "category": "existence"}
               for r in yes_no]
        result["mme_existence_acc_plus_acc_plus"] = score_mme(mme)["existence"]
        # POPE split of an image = the kind of its "no" question; its "yes" goes along.
        no_kind = {r["image"]: r["category"] for r in yes_no if r["answer"] == "no"}
        split = {"easy": "random", "hard": "adversarial"}
        pope = [{"prediction": r["prediction"], "answer": r["answer"], "category": split[no_kind[r["image"]]]}
                for r in yes_no]
        scored = score_pope(pope)
        result["pope_f1_random"] = scored.get("random", {}).get("f1")
        result["pope_f1_adversarial"] = scored.get("adversarial", {}).get("f1")
        result["pope_f1_mean"] = scored["f1_mean"]
        for kind in ("positive", "easy", "hard"):
            rows = [r for r in yes_no if r["category"] == kind]
            if rows:
                result[f"yes_no_accuracy_{kind}"] = sum(parse_mme(r["prediction"]) == r["answer"] for r in rows) / len(rows)
    if opens:
        right = [normalise(r["prediction"]) == normalise(r["answer"]) for r in opens]
        result["open_answer_accuracy"] = sum(right) / len(right)
        by_cat = defaultdict(list)
        for r, ok in zip(opens, right):
            by_cat[r["category"]].append(ok)
        for cat, marks in sorted(by_cat.items()):
            result[f"open_{cat}_accuracy"] = sum(marks) / len(marks)
    result["n_yes_no"], result["n_open"] = len(yes_no), len(opens)
    return result


def evaluate(model, processor, data_dir: Path, max_images: int = 0, batch_size: int = 16) -> tuple[dict, list[dict]]:
    t0 = time.perf_counter()
    records = read_eval_records(data_dir / "eval.jsonl", max_images)
    predictions = predict(model, processor, records, data_dir, batch_size)
    metrics = score(predictions)
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics, predictions
