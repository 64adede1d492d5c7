"""The tower pre-training loop on a tiny config, and the tower shipped in the repository."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import SiglipImageProcessor, SiglipVisionModel

import bunny
from bunny.data.synthetic import draw_example
from bunny.data.synthetic_render import render_scene
from bunny.errors import BunnyError
from bunny.train.tower_pretrain import (TowerHeads, default_tower_config, evaluate_tower,
                                        normalise, train_tower)

SHIPPED = Path(bunny.__file__).parent / "assets" / "towers" / "shapes-siglip-64"


def _tiny():
    return default_tower_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2)


def test_training_reduces_loss_and_saves_a_loadable_tower(tmp_path):
    # One thread: on a shared 2-core machine two threads mostly wait for each other.
    threads = torch.get_num_threads()
    report = train_tower(tmp_path, seed=1, steps=40, batch_size=8, lr=3e-3, config=_tiny(),
                         eval_images=16, num_threads=1, progress=False)
    losses = report["losses"]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    for name in ("config.json", "model.safetensors", "preprocessor_config.json",
                 "probe_heads.safetensors", "pretrain_report.json"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / ".tmp-save").exists()
    model = SiglipVisionModel.from_pretrained(tmp_path)
    assert model.config.hidden_size == 32
    assert 0 <= report["heldout_penultimate_heads"]["yes_no"] <= 1
    assert report["num_threads"] == 1 and torch.get_num_threads() == threads  # restored


def test_training_is_reproducible(tmp_path):
    kw = dict(seed=2, steps=3, batch_size=4, config=_tiny(), eval_images=0, num_threads=1,
              progress=False)
    assert train_tower(tmp_path / "a", **kw)["losses"] == train_tower(tmp_path / "b", **kw)["losses"]


def test_bad_config_raises(tmp_path):
    with pytest.raises(BunnyError):
        train_tower(tmp_path, steps=1, config=default_tower_config(image_size=32))
    with pytest.raises(BunnyError):
        train_tower(tmp_path, steps=0)


def test_shipped_tower_config_and_size():
    cfg = json.loads((SHIPPED / "config.json").read_text())
    assert (cfg["image_size"], cfg["patch_size"], cfg["hidden_size"], cfg["num_hidden_layers"],
            cfg["num_attention_heads"]) == (64, 8, 192, 4, 3)
    assert (SHIPPED / "model.safetensors").stat().st_size < 20 * 2**20
    proc = json.loads((SHIPPED / "preprocessor_config.json").read_text())
    assert proc["size"] == {"height": 64, "width": 64} and proc["resample"] == 3
    assert proc["image_mean"] == proc["image_std"] == [0.5] * 3
    assert proc["rescale_factor"] == pytest.approx(1 / 255)
    assert (SHIPPED / "README.md").is_file()


def test_shipped_tower_loads_and_processor_matches_training_inputs():
    model = SiglipVisionModel.from_pretrained(SHIPPED)
    processor = SiglipImageProcessor.from_pretrained(SHIPPED)
    image = render_scene(draw_example(0, "test", 0)[0])
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, normalise(np.asarray(image)[None]), atol=1e-6, rtol=0)
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_hidden_states=True)
    assert out.hidden_states[-2].shape == (1, 64, 192)


def test_shipped_tower_still_knows_its_shapes():
    # A regression guard on the asset: its own probe heads on fresh held-out scenes.
    model = SiglipVisionModel.from_pretrained(SHIPPED)
    heads = TowerHeads(model.config.hidden_size)
    state = load_file(SHIPPED / "probe_heads.safetensors")
    heads.load_state_dict({k.removeprefix("penultimate."): v for k, v in state.items()
                           if k.startswith("penultimate.")})
    metrics = evaluate_tower(model, heads, seed=123, n_images=64)
    assert metrics["patch_colour"] > 0.95 and metrics["patch_shape"] > 0.9
    assert metrics["yes_no"] > 0.85


def test_cli_registers_train_tower():
    from bunny.train.tower_cli import add_parsers

    parser = argparse.ArgumentParser(prog="bunny")
    add_parsers(parser.add_subparsers(dest="command", required=True), {})
    args = parser.parse_args(["train", "tower", "--out", "x", "--seed", "4", "--steps", "7"])
    assert (args.seed, args.steps, args.threads) == (4, 7, 2)
