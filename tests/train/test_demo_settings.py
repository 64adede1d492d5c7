"""Demo settings: typed values from demo.yaml and --set, unknown names refused."""
from __future__ import annotations

from pathlib import Path

import pytest

from bunny.errors import BunnyError
from bunny.train.demo import DEMO_CONFIGS, load_settings


def test_shipped_settings_and_stage_overrides():
    settings, over1, over2 = load_settings(DEMO_CONFIGS, {"train_images": 96, "finetune.lr": 2e-3,
                                                          "word_init_background": "background"})
    assert settings.train_images == 96 and settings.projector_word_init is True
    assert settings.word_init_background == "background" and over2 == {"lr": 2e-3} and over1 == {}


@pytest.mark.parametrize("key,value", [("projector_word_init", "false"), ("train_images", 2.5),
                                       ("word_init_scale", "2"), ("train_images", True)])
def test_wrongly_typed_setting_is_refused(key, value):
    with pytest.raises(BunnyError, match=f"demo setting {key} must be"):
        load_settings(DEMO_CONFIGS, {key: value})


def test_unknown_setting_lists_valid_ones():
    with pytest.raises(BunnyError, match="unknown demo setting.*word_init_position"):
        load_settings(DEMO_CONFIGS, {"word_init_positions": True})


def test_demo_configs_ship_inside_the_package():
    # Package data (pyproject: assets/**/*) travels in the wheel; a path outside the package would not.
    import bunny

    package = Path(bunny.__file__).resolve().parent
    assert DEMO_CONFIGS.resolve().is_relative_to(package / "assets")
    assert {p.name for p in DEMO_CONFIGS.glob("*.yaml")} == {"demo.yaml", "pretrain.yaml", "finetune.yaml"}
