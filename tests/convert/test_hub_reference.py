"""Reference checkpoints named by hub id, offline from a hub cache in huggingface_hub's own
layout (the autouse `hub_cache` fixture): each layout's `mm_vision_tower` (and the base LLM
of stage-1 / LoRA folders) is itself a hub id in that cache, and loading by id gives the
same logits as loading the folders by path."""
import json
import shutil

import pytest
import torch

import bunny
from bunny.cli import main as bunny_main
from bunny.errors import BunnyError
from bunny.model.templates import DEFAULT_SYSTEM
from bunny.testing import random_image

from reference_builders import build_lora, build_merged, build_stage1

TOWER_ID = "google/siglip-tiny"
BUILDERS = {"merged": lambda root, family: build_merged(root, family, hub=True),
            "merged-unfrozen": lambda root, family: build_merged(root, family, unfreeze=True),
            "stage-1": build_stage1, "lora": build_lora}


def _logits(model, processor):
    text = f"{DEFAULT_SYSTEM} USER: <image>\nWhat is in the image? ASSISTANT:"
    if processor.template == "plain":
        text = "<image>\nWhat is in the image?\n"
    with torch.no_grad():
        return model(**processor(text=text, images=[random_image(3)])).logits


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def publish_by_ids(root, hub_cache, truth, repo_id: str, family: str) -> None:
    """Publish the tower, the base LLM (if any) and a copy of the checkpoint that names both by id."""
    config = json.loads((truth.folder / "config.json").read_text())
    hub_cache.publish(TOWER_ID, config["mm_vision_tower"])
    published = root / "published"
    shutil.copytree(truth.folder, published)
    changes = {"mm_vision_tower": TOWER_ID}
    if truth.base is not None:
        hub_cache.publish(f"someone/base-{family}", truth.base)
        changes["_name_or_path"] = f"someone/base-{family}"
    _edit_config(published, **changes)
    hub_cache.publish(repo_id, published)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("layout", sorted(BUILDERS))
def test_reference_layout_by_hub_id_equals_by_path(root, hub_cache, layout, family):
    truth = BUILDERS[layout](root, family)
    by_path = bunny.load_pretrained(truth.folder)
    publish_by_ids(root, hub_cache, truth, f"BAAI/bunny-{layout}-{family}", family)
    by_id = bunny.load_pretrained(f"BAAI/bunny-{layout}-{family}")
    torch.testing.assert_close(_logits(*by_id), _logits(*by_path), rtol=0, atol=0)
    assert by_id[0].config.vision_tower == TOWER_ID


def test_model_base_by_hub_id(root, hub_cache):
    truth = build_lora(root, "llama")
    expected = _logits(*bunny.load_pretrained(truth.folder))
    hub_cache.publish("someone/base-llama", truth.base)
    _edit_config(truth.folder, _name_or_path="/trainer/machine/base-llama")
    got = bunny.load_pretrained(truth.folder, model_base="someone/base-llama")
    torch.testing.assert_close(_logits(*got), expected, rtol=0, atol=0)


def test_convert_cli_by_hub_id_and_revision(root, hub_cache):
    truth = build_merged(root, "qwen2", hub=True)
    expected = _logits(*bunny.load_pretrained(truth.folder))
    config = json.loads((truth.folder / "config.json").read_text())
    hub_cache.publish(TOWER_ID, config["mm_vision_tower"])
    _edit_config(truth.folder, mm_vision_tower=TOWER_ID)
    commit = hub_cache.publish("BAAI/bunny-tiny", truth.folder, revision="v1")
    assert bunny_main(["convert", "reference", "BAAI/bunny-tiny", str(root / "out"), "--revision", "v1"]) == 0
    torch.testing.assert_close(_logits(*bunny.load_pretrained(root / "out")), expected, rtol=0, atol=0)
    assert bunny_main(["convert", "reference", "BAAI/bunny-tiny", str(root / "out2"), "--revision", commit]) == 0
    assert bunny_main(["convert", "reference", "BAAI/bunny-tiny", str(root / "out3")]) == 2  # no main branch cached


def test_tower_id_that_cannot_be_resolved_names_it_and_the_config(root):
    truth = build_merged(root, "llama")
    _edit_config(truth.folder, mm_vision_tower="google/not-cached")
    with pytest.raises(BunnyError, match=r"vision tower 'google/not-cached' is not in the hub cache .*"
                                         r"HF_HUB_OFFLINE=1.*\(the mm_vision_tower of .*config.json\)"):
        bunny.load_pretrained(truth.folder)
    _edit_config(truth.folder, mm_vision_tower="not a tower")
    with pytest.raises(BunnyError, match=r"'not a tower' is neither a local folder nor a hub id.*mm_vision_tower"):
        bunny.load_pretrained(truth.folder)


def test_base_id_that_cannot_be_resolved_says_to_pass_model_base(root):
    truth = build_stage1(root, "llama")
    _edit_config(truth.folder, _name_or_path="someone/not-cached")
    with pytest.raises(BunnyError, match=r"base LLM \(_name_or_path in .*config.json\) 'someone/not-cached' is not "
                                         r"in the hub cache.*pass model_base"):
        bunny.load_pretrained(truth.folder)
