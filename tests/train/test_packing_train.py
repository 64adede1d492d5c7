"""`packing: true` in training: the same samples per step and the same loss as the padded
run (so the losses and the trained weights agree to float tolerance), a resumed packed run
repeats the uninterrupted one, and a sample longer than model_max_length stops the run
before its first step, named."""
from __future__ import annotations

import json

import pytest
import torch

from bunny.errors import BunnyError
from bunny.testing import make_tiny_bunny
from bunny.train.checkpoint import list_checkpoints
from bunny.train.recipe import load_recipe
from bunny.train.trainer import train

from trainhelp import tiny_recipe, write_dataset


@pytest.fixture()
def mixed(tmp_path):
    """Image samples of 2 and 6 QA turns and text-only ones: lengths 40 to 160 tokens."""
    path = write_dataset(tmp_path / "data", n=8, text_only=4)
    records = json.loads(path.read_text())
    for r in records[:8:2]:
        first, rest = r["conversations"][:2], r["conversations"][2:]
        r["conversations"] = first + rest * 5
    path.write_text(json.dumps(records))
    return path


def test_packed_training_equals_padded(tmp_path, mixed):
    kwargs = dict(max_steps=4, per_device_batch_size=4, grad_accum=2, model_max_length=400)
    padded = train(tiny_recipe(tmp_path / "a", mixed, **kwargs), *make_tiny_bunny())
    packed = train(tiny_recipe(tmp_path / "b", mixed, packing=True, **kwargs), *make_tiny_bunny())
    torch.testing.assert_close(torch.tensor([h["loss"] for h in packed.history]),
                               torch.tensor([h["loss"] for h in padded.history]), rtol=1e-5, atol=1e-6)
    a = dict(padded.model.named_parameters())
    for name, p in packed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_packed_run_resumes_to_the_same_losses(tmp_path, mixed):
    kwargs = dict(max_steps=4, save_every=2, per_device_batch_size=4, packing=True, model_max_length=400,
                  lora_dropout=0.1)
    full = train(tiny_recipe(tmp_path / "a", mixed, **kwargs), *make_tiny_bunny())
    recipe = tiny_recipe(tmp_path / "b", mixed, **kwargs)
    train(recipe, *make_tiny_bunny(), stop_after=3)  # "killed" after step 3; last checkpoint at 2
    assert [p.name for p in list_checkpoints(recipe.output_dir)] == ["step-0000002"]
    resumed = train(recipe, *make_tiny_bunny())
    torch.testing.assert_close(torch.tensor([h["loss"] for h in resumed.history]),
                               torch.tensor([h["loss"] for h in full.history]), rtol=1e-5, atol=1e-6)


def test_a_sample_longer_than_model_max_length_is_named_before_training(tmp_path, mixed):
    recipe = tiny_recipe(tmp_path, mixed, packing=True, model_max_length=100, save_every=1)
    with pytest.raises(BunnyError, match=r"longer than model_max_length 100.*sample 's0' \(index 0\): \d+ tokens"):
        train(recipe, *make_tiny_bunny())
    assert list_checkpoints(recipe.output_dir) == []
    # without packing the same recipe cuts those samples to 100 tokens and trains
    cut = train(tiny_recipe(tmp_path / "cut", mixed, model_max_length=100, max_steps=1), *make_tiny_bunny())
    assert len(cut.history) == 1


def test_packing_is_a_recipe_field(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("packing: true\nmodel_max_length: 1024\n")
    assert load_recipe(path).packing is True
    assert load_recipe(path, {"packing": "false"}).packing is False
    with pytest.raises(BunnyError, match="packing expects true/false"):
        load_recipe(path, {"packing": "sometimes"})
