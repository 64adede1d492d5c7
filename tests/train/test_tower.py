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
from bunny.data.synthetic import POSITIONS, draw_example
from bunny.data.synthetic_render import render_scene
from bunny.errors import BunnyError
from bunny.train.tower_pretrain import (TowerHeads, WordTargets, default_tower_config, evaluate_tower,
                                        normalise, scene_batch, train_tower, words_loss)

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
    assert report["heldout_penultimate_heads"]["words_r2"] <= 1 and report["llm"] == "smollm2-135m"
    assert "words.weight" in load_file(tmp_path / "probe_heads.safetensors")
    assert report["num_threads"] == 1 and torch.get_num_threads() == threads  # restored


def test_training_is_reproducible(tmp_path):
    kw = dict(seed=2, steps=3, batch_size=4, config=_tiny(), eval_images=0, num_threads=1,
              progress=False)
    assert train_tower(tmp_path / "a", **kw)["losses"] == train_tower(tmp_path / "b", **kw)["losses"]


def test_word_targets_are_the_llms_embeddings_of_the_patchs_words():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bunny.model.embedded import resolve_llm

    words = WordTargets("smollm2-135m")
    path = resolve_llm("smollm2-135m")
    embed = AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight.detach()
    tok = AutoTokenizer.from_pretrained(path)
    batch = scene_batch(0, "test", 0, 2)
    target = words(batch)  # (2, 64, H)
    scene = batch["scenes"][0]
    obj = scene.objects[0]
    patch = (batch["patch_position"][0] == POSITIONS.index(obj.position) + 1).nonzero()[0].item()
    want = sum(embed[tok(" " + w, add_special_tokens=False).input_ids[0]] for w in (obj.colour, obj.shape, obj.position))
    torch.testing.assert_close(target[0, patch], want)
    assert target[batch["patch_colour"] == 0].abs().max() == 0  # background: zero
    assert words_loss(target, target, batch["patch_colour"] > 0, words.scale) == 0


def test_words_loss_weighs_objects_and_background_alike():
    target = torch.zeros(1, 4, 2)
    target[0, 0] = torch.tensor([2.0, 0.0])  # one object patch, three background
    is_object = torch.tensor([[True, False, False, False]])
    pred = torch.zeros(1, 4, 2)
    assert words_loss(pred, target, is_object, scale=4.0).item() == pytest.approx(1.0)  # zero head: ~1
    pred[0, 1:] = 1.0  # background predicted at squared norm 2
    assert words_loss(pred, target, is_object, scale=4.0).item() == pytest.approx(1.5)


def test_word_weight_zero_is_the_labels_only_recipe(tmp_path):
    kw = dict(seed=2, steps=2, batch_size=4, config=_tiny(), eval_images=0, num_threads=1, progress=False)
    report = train_tower(tmp_path, word_weight=0.0, **kw)
    assert report["word_weight"] == 0.0 and report["llm"] is None
    assert not any(k.startswith("words.") for k in load_file(tmp_path / "probe_heads.safetensors"))
    with pytest.raises(BunnyError, match="word_weight must be >= 0"):
        train_tower(tmp_path, word_weight=-1.0, **kw)


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
    assert (args.seed, args.steps, args.threads, args.word_weight) == (4, 7, 2, 1.0)
