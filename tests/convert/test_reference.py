"""Reference checkpoints: every layout loads key by key, prompts and ids follow the
reference's rules, and logits equal a plain re-implementation of the reference forward."""
import pytest
import torch
import torch.nn.functional as F

import bunny
from bunny.convert.reference import convert_reference
from bunny.model.images import expand_to_square
from bunny.model.templates import DEFAULT_SYSTEM
from bunny.testing import random_image

from reference_builders import TIED, build_lora, build_merged, build_stage1

QUESTION = "What is in the image?"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
TEMPLATE = {"llama": "llama", "qwen2": "bunny", "phi3": "phi3"}


def reference_pixels(truth, image):
    """The reference's `pad` mode: expand2square with the mean colour as ints, then the processor."""
    fill = tuple(int(m * 255) for m in truth.image_processor.image_mean)
    return truth.image_processor(expand_to_square(image, fill), return_tensors="pt")["pixel_values"]


def reference_ids(truth, prefix: str, suffix: str) -> list[int]:
    """tokenizer_image_token by hand: text before and after <image>, one BOS kept, -200 between."""
    before, after = truth.tokenizer(prefix).input_ids, truth.tokenizer(suffix).input_ids
    offset = 1 if truth.tokenizer.bos_token_id is not None and after[:1] == [truth.tokenizer.bos_token_id] else 0
    return before + [-200] + after[offset:]


@torch.no_grad()
def reference_logits(truth, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    """The reference forward, written out: tower layer -2 -> mlp2x_gelu -> spliced at -200 -> LLM."""
    features = truth.tower(pixel_values, output_hidden_states=True).hidden_states[-2]
    p = truth.projector
    features = F.linear(F.gelu(F.linear(features, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])
    at = ids.index(-200)
    embed = truth.llm.get_input_embeddings()
    pieces = [embed(torch.tensor(ids[:at], dtype=torch.long)), features[0], embed(torch.tensor(ids[at + 1:], dtype=torch.long))]
    embeds = torch.cat(pieces)[None]
    positions = torch.arange(embeds.shape[1])[None]
    return truth.llm(inputs_embeds=embeds, position_ids=positions).logits


def assert_same_tensors(model, truth):
    """Key by key: every tensor of ours equals the one the reference would use."""
    pairs = [(model.language_model, truth.llm.state_dict()), (model.vision_tower, truth.tower.state_dict()),
             (model.mm_projector, truth.projector)]
    for module, expected in pairs:
        ours = module.state_dict()
        assert set(ours) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)


def check_prompt_ids_logits(model, processor, truth, template: str):
    image = random_image(3)
    text = processor.apply_chat_template(MESSAGES)
    if template == "plain":
        assert text == f"<image>\n{QUESTION}\n"
        prefix, suffix = "", f"\n{QUESTION}\n"
    else:
        assert text == f"{DEFAULT_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
        prefix, suffix = f"{DEFAULT_SYSTEM} USER: ", f"\n{QUESTION} ASSISTANT:"
    ids = reference_ids(truth, prefix, suffix)
    assert processor.reference_input_ids(text) == ids
    inputs = processor(text=text, images=[image])
    if template == "plain":  # stage 1 uses `square`: a plain resize
        pixels = truth.image_processor(image, return_tensors="pt")["pixel_values"]
    else:
        pixels = reference_pixels(truth, image)
    torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=0, atol=0)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, reference_logits(truth, ids, pixels))
    assert logits.shape[-1] == len(truth.tokenizer)  # padded vocabulary rows were cut
    return inputs, logits


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
