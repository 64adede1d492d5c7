"""A stage-2 recipe whose `init_from` names a stage-1 output folder (projector only), ours or
the reference's, starts from the LLM and tower stage 1 used with the folder's projector;
where that cannot be known the error points at `projector_weights`."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import SiglipVisionModel

from bunny.errors import BunnyError
from bunny.merge.lora import merge_lora_adapter
from bunny.model.loading import load_pretrained
from bunny.testing import tiny_image_processor, tiny_llm, tiny_vision_config
from bunny.train.parts import build_for_recipe
from bunny.train.trainer import train

from trainhelp import tiny_recipe, write_captions, write_dataset


@pytest.fixture()
def parts(tmp_path):
    """Local folders of a tiny LLM and a tiny tower, as a user's base models would be."""
    llm, tokenizer = tiny_llm("llama", seed=3)
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    torch.manual_seed(4)
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(tmp_path / "tower")
    tiny_image_processor("siglip").save_pretrained(tmp_path / "tower")
    return tmp_path / "llm", tmp_path / "tower", llm


@pytest.fixture()
def data(tmp_path):
    return write_dataset(tmp_path / "data", n=4)


@pytest.fixture()
def captions(tmp_path):
    return write_captions(tmp_path / "caps", n=4)


def _assert_llm_is(model, llm):
    expected = llm.state_dict()
    for key, value in model.language_model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_stage2_starts_from_our_stage1_folder(tmp_path, parts, data, captions):
    llm_dir, tower_dir, llm = parts
    stage1 = tiny_recipe(tmp_path, captions, stage="pretrain", tune="projector", llm=str(llm_dir), tower=str(tower_dir),
                         output_dir=str(tmp_path / "stage1"), max_steps=2)
    train(stage1)
    projector = load_file(str(tmp_path / "stage1" / "mm_projector.safetensors"))
    # Opened as a model (bunny chat --model ...), a stage-1 folder says what it is and what to do.
    with pytest.raises(BunnyError, match=r"stage-1 output.*init_from.*projector_weights"):
        load_pretrained(tmp_path / "stage1")

    stage2 = tiny_recipe(tmp_path, data, init_from=str(tmp_path / "stage1"), output_dir=str(tmp_path / "stage2"),
                         max_steps=1)
    model, processor = build_for_recipe(stage2)
    for key, value in model.mm_projector.state_dict().items():
        torch.testing.assert_close(value, projector["model.mm_projector." + key], rtol=0, atol=0)
    _assert_llm_is(model, llm)  # the base LLM stage 1 kept frozen
    assert model.config.projector_trained and processor.template == "bunny"
    result = train(stage2, model, processor)
    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.history[0]["loss"]))
    # Merging the run rebuilds its base the same way (from the stage-1 folder), then folds the LoRA.
    merged, _ = load_pretrained(merge_lora_adapter(tmp_path / "stage2", tmp_path / "merged"))
    for key, value in merged.mm_projector.state_dict().items():
        torch.testing.assert_close(value, model.mm_projector.state_dict()[key], rtol=0, atol=0)


def test_stage2_starts_from_a_reference_stage1_folder(tmp_path, parts, data):
    llm_dir, tower_dir, llm = parts
    folder = tmp_path / "reference-stage1"
    folder.mkdir()
    config = llm.config.to_dict() | dict(
        model_type="bunny-llama", architectures=["BunnyLlamaForCausalLM"], _name_or_path=str(llm_dir),
        mm_vision_tower=str(tower_dir), mm_projector_type="mlp2x_gelu", mm_hidden_size=24, use_mm_proj=True,
        image_aspect_ratio="square", tune_mm_mlp_adapter=True, tokenizer_model_max_length=2048)
    (folder / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(5)
    shapes = {"0.weight": (32, 24), "0.bias": (32,), "2.weight": (32, 32), "2.bias": (32,)}
    projector = {"model.mm_projector." + k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
    torch.save(projector, folder / "mm_projector.bin")

    recipe = tiny_recipe(tmp_path, data, init_from=str(folder), output_dir=str(tmp_path / "stage2"), max_steps=1)
    model, processor = build_for_recipe(recipe)
    for key, value in model.mm_projector.state_dict().items():
        torch.testing.assert_close(value, projector["model.mm_projector." + key], rtol=0, atol=0)
    _assert_llm_is(model, llm)
    assert processor.template == "bunny"  # the recipe's, not stage 1's `plain`
    result = train(recipe, model, processor)
    assert len(result.history) == 1


def test_our_stage1_folder_without_its_recipe_points_at_projector_weights(tmp_path, parts, data, captions):
    llm_dir, tower_dir, _ = parts
    train(tiny_recipe(tmp_path, captions, stage="pretrain", tune="projector", llm=str(llm_dir), tower=str(tower_dir),
                      output_dir=str(tmp_path / "stage1"), max_steps=1))
    (tmp_path / "stage1" / "recipe.yaml").unlink()
    recipe = tiny_recipe(tmp_path, data, init_from=str(tmp_path / "stage1"), output_dir=str(tmp_path / "stage2"))
    with pytest.raises(BunnyError, match="recipe.yaml.*projector_weights: .*mm_projector"):
        build_for_recipe(recipe)


def test_init_from_its_own_output_folder_is_an_error(tmp_path, data):
    with pytest.raises(BunnyError, match="init_from and output_dir are the same folder"):
        tiny_recipe(tmp_path, data, init_from=str(tmp_path / "run"), output_dir=str(tmp_path / "run"))


def test_reference_stage1_folder_with_an_unknown_base_points_at_projector_weights(tmp_path, parts, data):
    _, tower_dir, llm = parts
    folder = tmp_path / "reference-stage1"
    folder.mkdir()
    config = llm.config.to_dict() | dict(model_type="bunny-llama", _name_or_path=str(tmp_path / "gone"),
                                         mm_vision_tower=str(tower_dir), mm_hidden_size=24)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"model.mm_projector.0.weight": torch.zeros(32, 24)}, folder / "mm_projector.bin")
    recipe = tiny_recipe(tmp_path, data, init_from=str(folder), output_dir=str(tmp_path / "stage2"))
    with pytest.raises(BunnyError, match=r"gone.*projector_weights: .*mm_projector\.bin"):
        build_for_recipe(recipe)
