"""benchmarks/demo_stage1_probe.py: per-group accuracy (golden values) and the probe's
teacher-forced predictions against the model's full logits."""
from __future__ import annotations

import json

import torch

from bunny.data.collate import collate
from bunny.testing import make_tiny_bunny, random_image
from bunny.train.recipe import Recipe
from bunny.train.trainer import build_dataset


def caption_data(folder, n: int):
    """n stage-1 samples: an image and a one-word caption."""
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        random_image(seed=i, size=(28, 28)).save(folder / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": ["red", "blue", "green"][i % 3]}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_word_group_accuracy_golden(load_benchmark):
    acc = load_benchmark("demo_stage1_probe").word_group_accuracy
    got = acc([1, 2, 3, 4, 2], [1, 0, 3, 5, 2], {"colour": {1, 2}, "shape": {3}})
    assert got == {"colour": [2, 3], "shape": [1, 1], "other": [0, 1]}
    assert acc([], [], {"colour": {1}}) == {"colour": [0, 0], "other": [0, 0]}


def test_probe_matches_the_full_logits(tmp_path, load_benchmark):
    bench = load_benchmark("demo_stage1_probe")
    path = caption_data(tmp_path / "caps", n=5)
    model, proc = make_tiny_bunny()
    dataset, _ = build_dataset(Recipe(stage="pretrain", tune="projector", data_path=str(path)), proc)

    # The figures from full logits (no trimming to trained positions), one sample at a time.
    targets, predicted = [], []
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            b = collate([dataset[i]], proc.pad_token_id)
            logits = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                           attention_mask=b["attention_mask"]).logits[0, :-1]
            labels = b["labels"][0, 1:].masked_fill(b["input_ids"][0, 1:] == model.config.image_token_index, -100)
            keep = labels != -100
            targets += labels[keep].tolist()
            predicted += logits[keep].argmax(-1).tolist()
    groups = {"first": {targets[0]}}  # the first caption's first token, wherever it appears
    expected = bench.word_group_accuracy(targets, predicted, groups)
    assert expected["first"][1] >= 1 and expected["other"][1] >= 1

    model.train()
    got = bench.probe(model, proc, dataset, groups, batch=2)  # batched, padded, trimmed logits
    for name, (right, total) in expected.items():
        assert got[f"{name}_accuracy"] == round(right / total, 4)
    assert got["loss"] > 0
    assert model.training and not model.vision_tower.training  # back to training, the tower frozen
