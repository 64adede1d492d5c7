"""Writing a synthetic dataset to disk: PNG images, LLaVA-format JSON for the two training
stages, and a held-out JSONL evaluation split. Every file is written to a temporary name
and moved into place, so an interrupted run never leaves a half-written file behind.

Layout of OUT:
    images/train/000000.png ...    training images (64x64 RGB)
    images/eval/000000.png ...     held-out images
    stage1.json                    captions, one sample per training image
    stage2.json                    question answering, one multi-turn sample per image
    eval.jsonl                     held-out questions, one record per line
    meta.json                      seed, sizes, question counts, guesser baselines
"""
from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from pathlib import Path

from bunny.atomic import atomic_write
from bunny.data.synthetic import (COLOURS, POSITIONS, SHAPES, caption,
                                  colour_only_guess_accuracy, draw_example,
                                  extra_yes_no_qas, majority_answer_accuracy,
                                  shape_only_guess_accuracy)
from bunny.data.synthetic_render import IMAGE_SIZE, render_scene
from bunny.errors import BunnyError

# Bunny's evaluation suffix for short answers (MME, POPE, VQAv2, GQA); training with the
# same suffix teaches the model the answer style the evaluation asks for.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
CAPTION_INSTRUCTION = "Describe the image."
GENERATOR_VERSION = 2  # bump when a change alters images or questions for a given seed


def _save_png(image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # no timestamps or metadata: same scene, same bytes
    atomic_write(path, buf.getvalue())


def stage1_sample(sample_id: str, image: str, text: str) -> dict:
    return {"id": sample_id, "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{CAPTION_INSTRUCTION}"},
        {"from": "gpt", "value": text}]}


def stage2_sample(sample_id: str, image: str, qas: list[dict], suffix: str) -> dict:
    """One multi-turn conversation: the image tokens are paid once for all its questions."""
    turns = []
    for i, qa in enumerate(qas):
        prefix = "<image>\n" if i == 0 else ""
        turns.append({"from": "human", "value": f"{prefix}{qa['question']}{suffix}"})
        turns.append({"from": "gpt", "value": qa["answer"]})
    return {"id": sample_id, "image": image, "conversations": turns}


def synthesize(out_dir: str | os.PathLike, n_train: int, n_eval: int, seed: int = 0, *,
               max_turns: int | None = None, suffix: str = SHORT_ANSWER_SUFFIX,
               yes_no_per_image: int = 1, train_hard_share: float = 0.5) -> dict:
    """Generate the demo dataset under `out_dir` (layout in this module's docstring).

    n_train / n_eval are numbers of images. Each image gets one "yes" and one "no" question
    (the "no" alternates hard/easy by image index, so n_eval must be even for an exactly
    balanced split) and up to four open questions (colour, shape, count, position).
    `max_turns` caps the QA turns per stage-2 sample (the yes/no pair is kept first, so a
    cap of 2 keeps the balance); `suffix` is appended to every stage-2 question and to the
    eval `prompt`. `yes_no_per_image` > 1 adds up to that many yes/no pairs in all to each
    *training* image (distinct questions, balanced; evaluation keeps one pair per image).
    `train_hard_share` is the share of hard "no" questions in training (0.5: alternate, like
    the evaluation; higher puts more weight on binding colour to shape, which the easy
    ones do not need; the evaluation split is unchanged). Returns the metadata also written to meta.json.
    """
    for name, n in (("n_train", n_train), ("n_eval", n_eval)):
        if not isinstance(n, int) or n < 0:
            raise BunnyError(f"{name} must be a non-negative integer, got {n!r}")
    if n_eval % 2:
        raise BunnyError(f"n_eval must be even so hard and easy 'no' questions balance, got {n_eval}")
    if not isinstance(yes_no_per_image, int) or yes_no_per_image < 1:
        raise BunnyError(f"yes_no_per_image must be an integer >= 1, got {yes_no_per_image!r}")
    if not 0.0 <= train_hard_share <= 1.0:
        raise BunnyError(f"train_hard_share must be within [0, 1], got {train_hard_share!r}")
    if max_turns is not None and max_turns < 1:
        raise BunnyError(f"max_turns must be >= 1, got {max_turns}")
    out = Path(out_dir)
    for split in ("train", "eval"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)

    stage1, stage2 = [], []
    for i in range(n_train):
        kind = None  # 0.5: alternate by index, the default dataset stays byte-identical
        if train_hard_share != 0.5:
            kind = "hard" if random.Random(f"bunny-synth-kind/{seed}/{i}").random() < train_hard_share else "easy"
        scene, qas = draw_example(seed, "train", i, no_kind=kind)
        rel = f"images/train/{i:06d}.png"
        _save_png(render_scene(scene), out / rel)
        stage1.append(stage1_sample(f"synth-train-{i:06d}", rel, caption(scene)))
        n_yes_no = 2
        if yes_no_per_image > 1:  # own stream: the default dataset stays byte-identical
            extra = extra_yes_no_qas(scene, random.Random(f"bunny-synth-extra/{seed}/{i}"), qas, yes_no_per_image - 1,
                                     hard_share=train_hard_share)
            qas = qas[:2] + extra + qas[2:]
            n_yes_no += len(extra)
        # Shuffled so the answer of turn 1 is not always "yes".
        order = _turn_order(seed, i, len(qas), n_yes_no)
        qas = [qas[k] for k in order][:max_turns]
        stage2.append(stage2_sample(f"synth-train-{i:06d}", rel, qas, suffix))

    records = []
    for i in range(n_eval):
        scene, qas = draw_example(seed, "eval", i)
        rel = f"images/eval/{i:06d}.png"
        _save_png(render_scene(scene), out / rel)
        for k, qa in enumerate(qas):
            records.append({
                "question_id": f"synth-eval-{i:06d}-{k}", "image": rel,
                "image_id": f"eval-{i:06d}", "question": qa["question"],
                "prompt": qa["question"] + suffix, "answer": qa["answer"], "kind": qa["kind"],
                "category": qa["category"], "colour": qa.get("colour"), "shape": qa.get("shape"),
                "scene": scene.to_list()})

    atomic_write(out / "stage1.json", json.dumps(stage1, indent=1) + "\n")
    atomic_write(out / "stage2.json", json.dumps(stage2, indent=1) + "\n")
    atomic_write(out / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    meta = _meta(seed, n_train, n_eval, max_turns, suffix, records)
    meta["yes_no_per_image"] = yes_no_per_image
    meta["train_hard_share"] = train_hard_share
    atomic_write(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    return meta


def _turn_order(seed: int, index: int, n: int, n_yes_no: int = 2) -> list[int]:
    """Yes/no pairs first (in random order), then the open questions shuffled: a cap on the
    turns drops open questions first (an odd cap keeps one more "yes" or "no")."""
    rng = random.Random(f"bunny-synth-turns/{seed}/{index}")
    yes_no, opens = list(range(n_yes_no)), list(range(n_yes_no, n))
    rng.shuffle(yes_no)
    rng.shuffle(opens)
    return yes_no + opens


def _meta(seed, n_train, n_eval, max_turns, suffix, records) -> dict:
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "image_size": IMAGE_SIZE,
            "n_train_images": n_train, "n_eval_images": n_eval, "max_turns": max_turns,
            "suffix": suffix, "colours": list(COLOURS), "shapes": list(SHAPES),
            "positions": list(POSITIONS),
            "eval_questions": dict(Counter(f"{r['kind']}/{r['category']}" for r in records))}
    if any(r["kind"] == "yes_no" for r in records):
        meta["yes_no_colour_only"] = colour_only_guess_accuracy(records)
        meta["yes_no_shape_only"] = shape_only_guess_accuracy(records)
    if any(r["kind"] == "open" and r["category"] == "count" for r in records):
        meta["count_majority"] = majority_answer_accuracy(records, "count")
    return meta
