"""Sharded-training recipes that cannot run as written: a clear error before any training
work (nothing built, written or trained), or, for fsdp on one process, a run with a note."""
import json
from pathlib import Path

import pytest
import torch

from bunny.errors import BunnyError
from bunny.testing import make_tiny_bunny
from bunny.train.recipe import Recipe
from bunny.train.trainer import train
from trainhelp import tiny_recipe, write_dataset

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture()
def data(tmp_path):
    return write_dataset(tmp_path / "data", n=8, text_only=2)


def test_fsdp_on_one_process_trains_unsharded_with_a_note(tmp_path, data, capsys):
    plain = train(tiny_recipe(tmp_path / "plain", data, max_steps=2), *make_tiny_bunny())
    capsys.readouterr()
    sharded = train(tiny_recipe(tmp_path / "fsdp", data, max_steps=2, fsdp=True), *make_tiny_bunny())
    assert "fsdp is set but this run has one process" in capsys.readouterr().out
    assert [h["loss"] for h in sharded.history] == [h["loss"] for h in plain.history]
    assert sharded.holdings["params_local"] == sharded.holdings["params_total"]


def _previous_run(out: Path) -> dict:
    """An earlier run's files in the output folder: they must survive a refused run."""
    ckpt = out / "run" / "checkpoints" / "step-0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "history": []}))
    (out / "run" / "recipe.yaml").write_text("earlier: run\n")
    return {p: p.read_bytes() for p in (out / "run").rglob("*") if p.is_file()}


def _untouched(model, before) -> bool:
    return not any("lora_" in n for n, _ in model.named_parameters()) and all(
        torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_fsdp_with_a_model_whose_layers_cannot_be_wrapped(tmp_path, data):
    model, processor = make_tiny_bunny()
    model.language_model._no_split_modules = []  # a causal LM that names no layer classes
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(BunnyError, match="LlamaForCausalLM names no layer classes to shard"):
        train(tiny_recipe(tmp_path, data, max_steps=2, fsdp=True), model, processor)
    assert _untouched(model, before)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: DeepSpeed is allowed")
def test_deepspeed_without_a_gpu_says_what_to_do_before_any_work(tmp_path, data):
    files = _previous_run(tmp_path)
    model, processor = make_tiny_bunny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for config in ("zero2.json", "zero3.json"):
        recipe = tiny_recipe(tmp_path, data, max_steps=2, deepspeed=str(CONFIGS / "deepspeed" / config))
        with pytest.raises(BunnyError) as err:
            train(recipe, model, processor)
        assert "no GPU is visible" in str(err.value) and "Remove `deepspeed`" in str(err.value)
    assert _untouched(model, before)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == files


def test_fsdp_and_deepspeed_together_is_a_recipe_error():
    with pytest.raises(BunnyError, match="both fsdp and deepspeed"):
        Recipe(fsdp=True, deepspeed="configs/deepspeed/zero3.json")
