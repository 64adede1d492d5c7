"""benchmarks/demo_stage1_probe.py: per-group accuracy (golden values) and the probe's
teacher-forced predictions against the model's full logits."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bunny.data.collate import collate
from bunny.testing import make_tiny_bunny
from bunny.train.trainer import build_dataset

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from trainhelp import tiny_recipe, write_captions  # noqa: E402


def test_word_group_accuracy_golden(load_benchmark):
    acc = load_benchmark("demo_stage1_probe").word_group_accuracy
    got = acc([1, 2, 3, 4, 2], [1, 0, 3, 5, 2], {"colour": {1, 2}, "shape": {3}})
    assert got == {"colour": [2, 3], "shape": [1, 1], "other": [0, 1]}
    assert acc([], [], {"colour": {1}}) == {"colour": [0, 0], "other": [0, 0]}


def test_probe_matches_the_full_logits(tmp_path, load_benchmark):
    bench = load_benchmark("demo_stage1_probe")
    path = write_captions(tmp_path / "caps", n=5)
    model, proc = make_tiny_bunny()
    dataset, _ = build_dataset(tiny_recipe(tmp_path, path, stage="pretrain", tune="projector"), proc)

    # The figures from full logits (no trimming to trained positions), one sample at a time.
    targets, predicted = [], []
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            b = collate([dataset[i]], proc.pad_token_id)
            logits = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                           attention_mask=b["attention_mask"]).logits[0, :-1]
            labels = b["labels"][0, 1:]
            keep = labels != -100
            targets += labels[keep].tolist()
            predicted += logits[keep].argmax(-1).tolist()
    groups = {"first": {targets[0]}}  # the first caption's first token, wherever it appears
    expected = bench.word_group_accuracy(targets, predicted, groups)
    assert expected["first"][1] >= 1 and expected["other"][1] >= 1

    model.train()
    got = bench.probe(model, proc, dataset, groups, batch=2)  # batched and padded
    for name, (right, total) in expected.items():
        assert got[f"{name}_accuracy"] == round(right / total, 4)
    assert model.training and not model.vision_tower.training  # back to training, the tower frozen
    model.eval()
    with torch.no_grad():  # the probe's loss is the mean of the model's own per-batch losses
        losses = [model(**collate([dataset[i] for i in range(lo, min(lo + 2, len(dataset)))],
                                  proc.pad_token_id)).loss.item() for lo in range(0, len(dataset), 2)]
    assert got["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)


def test_token_norm_is_the_mean_image_token_norm(tmp_path, load_benchmark):
    bench = load_benchmark("demo_stage1_probe")
    path = write_captions(tmp_path / "caps", n=3)
    model, proc = make_tiny_bunny()
    dataset, _ = build_dataset(tiny_recipe(tmp_path, path, stage="pretrain", tune="projector"), proc)
    with torch.no_grad():
        norms = [model.get_image_features(dataset[i]["pixel_values"]).norm(dim=-1) for i in range(3)]
    assert bench.token_norm(model, dataset) == pytest.approx(float(torch.cat(norms).mean()), rel=1e-5)
