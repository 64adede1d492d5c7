"""The layouts BAAI published on the hub (Bunny-v1_0-3B, v1_0-4B, v1_1-4B, v1_0-2B-zh,
Llama-3-8B-V v1.0 and v1.1) load strictly, never run their shipped remote code, and give
the reference's prompt, ids, pixels and logits (see published_builders for each layout)."""
import json
import sys

import pytest
import torch
from safetensors import safe_open

import bunny
from bunny.cli import main
from bunny.convert.reference import convert_reference, load_reference
from bunny.errors import BunnyError
from bunny.model.loading import save_pretrained
from bunny.model.towers import load_vision_model
from bunny.testing import random_image

from published_builders import PUBLISHED, build_published
from reference_forward import MESSAGES, assert_same_tensors, check_prompt_ids_logits

TEMPLATE = {"phi": "bunny", "phi3": "phi3", "qwen2": "bunny", "llama": "llama"}


def _shard_keys(folder) -> set[str]:
    keys = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_layout_gives_reference_outputs(root, name):
    spec = PUBLISHED[name]
    truth = build_published(root, name)
    model, processor = bunny.load_pretrained(truth.folder)
    assert processor.template == TEMPLATE[spec.family]
    assert model.config.s2_scales == truth.s2_scales
    assert_same_tensors(model, truth)  # LLM (vocabulary cut), tower, projector: key by key
    check_prompt_ids_logits(model, processor, truth, TEMPLATE[spec.family])
    assert not [m for m in sys.modules if m.startswith(("modeling_bunny", "configuration_bunny", "tokenization_bunny"))]


@pytest.mark.parametrize("name", ["Bunny-v1_0-4B", "Bunny-v1_1-4B", "Bunny-Llama-3-8B-V"])
def test_unfrozen_tower_in_the_checkpoint_wins_over_the_hub_tower(root, name):
    truth = build_published(root, name)
    keys = _shard_keys(truth.folder)
    # The real layout: transformers 4's module tree, with post_layernorm and the pooling head.
    for key in ("embeddings.patch_embedding.weight", "post_layernorm.weight", "head.probe", "head.mlp.fc2.bias"):
        assert f"model.vision_tower.vision_tower.vision_model.{key}" in keys
    model, _ = bunny.load_pretrained(truth.folder)
    hub_tower = load_vision_model(json.loads((truth.folder / "config.json").read_text())["mm_vision_tower"])
    ours = model.vision_tower.state_dict()
    assert set(ours) == set(hub_tower.state_dict())  # nothing dropped: head and post_layernorm included
    assert not torch.equal(ours["encoder.layers.0.mlp.fc1.weight"], hub_tower.state_dict()["encoder.layers.0.mlp.fc1.weight"])
    torch.testing.assert_close(ours["head.probe"], truth.tower.state_dict()["head.probe"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Bunny-v1_0-3B", "Bunny-v1_0-2B-zh"])
def test_frozen_tower_comes_from_mm_vision_tower(root, name):
    truth = build_published(root, name)
    keys = _shard_keys(truth.folder)
    last = truth.tower.config.num_hidden_layers - 1
    prefix = "model.vision_tower.vision_tower.vision_model."
    assert f"{prefix}encoder.layers.{last - 1}.mlp.fc1.weight" in keys and f"{prefix}post_layernorm.weight" in keys
    assert not [k for k in keys if k.startswith((f"{prefix}head.", f"{prefix}encoder.layers.{last}."))]
    model, _ = bunny.load_pretrained(truth.folder)
    expected = truth.tower.state_dict()  # the whole hub tower; the files hold it without its last layer and head
    for key, value in model.vision_tower.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_s2_unfrozen_round_trip_through_convert(root):
    truth = build_published(root, "Bunny-v1_1-4B")
    model, processor = bunny.load_pretrained(truth.folder)
    converted, converted_processor = bunny.load_pretrained(convert_reference(truth.folder, root / "converted"))
    assert converted.config.s2_scales == [384, 768, 1152] and converted_processor.template == "phi3"
    inputs = processor(text=processor.apply_chat_template(MESSAGES), images=[random_image(4)])
    with torch.no_grad():
        torch.testing.assert_close(converted(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_published_tower_path_that_does_not_exist_is_named_and_can_be_replaced(root):
    """Bunny-v1_1-4B's config names a tower folder on the authors' machine."""
    truth = build_published(root, "Bunny-v1_1-4B", tower_ref=PUBLISHED["Bunny-v1_1-4B"].tower)
    with pytest.raises(BunnyError, match="/share/bunny/models/siglip-so400m-patch14-384.*--vision-tower"):
        bunny.load_pretrained(truth.folder)
    model, processor = load_reference(truth.folder, vision_tower=str(root / "siglip-tiny"))
    assert model.config.vision_tower == str(root / "siglip-tiny")
    assert_same_tensors(model, truth)  # the unfrozen tower's weights are still the checkpoint's
    _, logits = check_prompt_ids_logits(model, processor, truth, "phi3")

    assert main(["convert", "reference", str(truth.folder), str(root / "out"), "--vision-tower", str(root / "siglip-tiny")]) == 0
    converted, converted_processor = bunny.load_pretrained(root / "out")
    inputs = converted_processor(text=converted_processor.apply_chat_template(MESSAGES), images=[random_image(3)])
    with torch.no_grad():
        torch.testing.assert_close(converted(**inputs).logits, logits, rtol=0, atol=0)


def test_vision_tower_in_place_of_a_missing_one_through_load_pretrained_and_chat(root, capsys):
    truth = build_published(root, "Bunny-v1_1-4B", tower_ref=PUBLISHED["Bunny-v1_1-4B"].tower)
    tower = str(root / "siglip-tiny")
    model, processor = bunny.load_pretrained(truth.folder, vision_tower=tower)
    direct, _ = load_reference(truth.folder, vision_tower=tower)
    inputs = processor(text=processor.apply_chat_template(MESSAGES), images=[random_image(3)])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, direct(**inputs).logits, rtol=0, atol=0)
    assert main(["chat", "--model", str(truth.folder), "--vision-tower", tower, "--prompt", "hi",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    # A bunny checkpoint carries its own tower: replacing it is refused, not ignored.
    save_pretrained(model, processor, root / "ours")
    with pytest.raises(BunnyError, match="vision_tower.*bunny checkpoint"):
        bunny.load_pretrained(root / "ours", vision_tower=tower)
