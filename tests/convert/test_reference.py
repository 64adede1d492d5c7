"""Reference checkpoints: every layout loads key by key, prompts and ids follow the
reference's rules, and logits equal a plain re-implementation of the reference forward."""
import pytest
import torch

import bunny
from bunny.convert.reference import convert_reference
from bunny.testing import random_image

from reference_builders import TIED, build_lora, build_merged, build_stage1
from reference_forward import MESSAGES, assert_same_tensors, check_prompt_ids_logits

TEMPLATE = {"llama": "llama", "qwen2": "bunny", "phi3": "phi3"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_merged_layout(root, family):
    truth = build_merged(root, family)
    model, processor = bunny.load_pretrained(truth.folder)
    assert processor.template == TEMPLATE[family]
    assert model.config.tie_word_embeddings == TIED.get(family, False)
    assert_same_tensors(model, truth)
    check_prompt_ids_logits(model, processor, truth, TEMPLATE[family])


def test_merged_bin_unfrozen_tower_and_relative_tower_path(root, monkeypatch):
    truth = build_merged(root, "phi3", unfreeze=True, fmt="bin", relative_tower=True)
    monkeypatch.chdir(root.parent)  # the relative path must resolve against the checkpoint, not the cwd
    model, processor = bunny.load_pretrained(truth.folder)
    assert_same_tensors(model, truth)  # the checkpoint's trained tower, not mm_vision_tower's
    check_prompt_ids_logits(model, processor, truth, "phi3")


def test_merged_unfrozen_clip_tower_in_the_reference_layout(root):
    """CLIPVisionModel, too, held its layers under `vision_model.` in transformers 4."""
    truth = build_merged(root, "llama", unfreeze=True, tower_kind="clip")
    model, processor = bunny.load_pretrained(truth.folder)
    assert_same_tensors(model, truth)  # pre_layrnorm, post_layernorm and all
    check_prompt_ids_logits(model, processor, truth, "llama")


def test_hub_layout_never_runs_remote_code(root):
    truth = build_merged(root, "llama", hub=True)
    model, processor = bunny.load_pretrained(truth.folder)  # the shipped modeling file raises if imported
    assert_same_tensors(model, truth)
    check_prompt_ids_logits(model, processor, truth, "llama")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_stage1_layout(root, family):
    truth = build_stage1(root, family)
    model, processor = bunny.load_pretrained(truth.folder)  # base LLM from _name_or_path
    assert processor.template == "plain" and processor.image_mode == "square"
    assert_same_tensors(model, truth)
    check_prompt_ids_logits(model, processor, truth, "plain")


def test_stage1_with_model_base(root):
    truth = build_stage1(root, "phi3")
    model, processor = bunny.load_pretrained(truth.folder, model_base=str(truth.base))
    assert_same_tensors(model, truth)


@pytest.mark.parametrize("family,unfreeze", [("llama", False), ("phi3", True), ("qwen2", False)])
def test_lora_layout(root, family, unfreeze):
    truth = build_lora(root, family, unfreeze=unfreeze)
    model, processor = bunny.load_pretrained(truth.folder, model_base=str(truth.base))
    assert processor.template == TEMPLATE[family]
    assert_same_tensors(model, truth)  # LoRA merged as W + (alpha/r) B A
    check_prompt_ids_logits(model, processor, truth, TEMPLATE[family])


def test_convert_round_trip_and_cli(root):
    truth = build_lora(root, "llama")
    out = convert_reference(truth.folder, root / "converted", model_base=str(truth.base))
    model, processor = bunny.load_pretrained(truth.folder, model_base=str(truth.base))
    converted, converted_processor = bunny.load_pretrained(out)
    assert converted_processor.template == "llama"
    inputs = processor(text=processor.apply_chat_template(MESSAGES), images=[random_image(5)])
    with torch.no_grad():
        torch.testing.assert_close(converted(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)

    from bunny.cli import main

    assert main(["convert", "reference", str(truth.folder), str(root / "cli-out"), "--model-base", str(truth.base)]) == 0
    again, _ = bunny.load_pretrained(root / "cli-out")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
