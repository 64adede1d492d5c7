"""Recipes: YAML + overrides, unknown fields, and every shipped config loads."""
from pathlib import Path

import pytest

from bunny.errors import BunnyError
from bunny.train.demo import DEMO_CONFIGS
from bunny.train.recipe import load_recipe, parse_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_overrides_both_spellings(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# a comment\nlr: 1.0e-4\nlora_r: 8\n")
    over = parse_overrides(["--set", "lr=3e-4", "--lora-r", "16", "--gradient_checkpointing", "true"])
    r = load_recipe(path, over, stage="finetune")
    assert (r.lr, r.lora_r, r.gradient_checkpointing) == (3e-4, 16, True)
    assert r.effective_projector_lr == 3e-4 and r.effective_data_template == "bunny"
    p = load_recipe(None, {}, stage="pretrain")
    assert (p.tune, p.effective_data_template, p.effective_image_mode) == ("projector", "plain", "square")


def test_unknown_field_lists_valid_ones(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-4\nlearning_rate: 2e-4\n")
    with pytest.raises(BunnyError, match=r"unknown recipe field\(s\) 'learning_rate'; valid fields: stage, tune"):
        load_recipe(path)
    with pytest.raises(BunnyError, match="unknown recipe field.*'lora_rank'"):
        load_recipe(None, parse_overrides(["--lora-rank", "4"]))


def test_bad_values_and_stage_conflicts(tmp_path):
    with pytest.raises(BunnyError, match="lora_r expects int"):
        load_recipe(None, {"lora_r": "many"})
    with pytest.raises(BunnyError, match="tune"):
        load_recipe(None, {"tune": "lora"}, stage="pretrain")
    path = tmp_path / "r.yaml"
    path.write_text("stage: finetune\n")
    with pytest.raises(BunnyError, match="says stage 'finetune' but the command is 'pretrain'"):
        load_recipe(path, stage="pretrain")


def _stage_of(path: Path) -> str:
    return "pretrain" if "pretrain" in path.name else "finetune"


SHIPPED_RECIPES = sorted(p for p in [*CONFIGS.rglob("*.yaml"), *DEMO_CONFIGS.glob("*.yaml")]
                         if p.parent.name not in ("mix",) and p.name != "demo.yaml")


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipes_load(path):
    stage = _stage_of(path)
    recipe = load_recipe(path, stage=stage)
    assert recipe.stage == stage


def test_image_cache_only_where_data_is_small():
    # The paper's recipes read 0.7M-2M images at 384 px once per epoch: a cache of every
    # preprocessed image would hold terabytes. Only the demo (400 small images, two epochs) turns it on.
    for path in sorted((CONFIGS / "bunny").glob("*.yaml")):
        assert load_recipe(path, stage=_stage_of(path)).cache_images is False, path.name
    assert load_recipe(DEMO_CONFIGS / "finetune.yaml", stage="finetune").cache_images is True
