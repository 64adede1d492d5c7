"""Demo settings: typed values from demo.yaml and --set, unknown names refused."""
from __future__ import annotations

import pytest

from bunny.errors import BunnyError
from bunny.train.demo import REPO_CONFIGS, load_settings


def test_shipped_settings_and_stage_overrides():
    settings, over1, over2 = load_settings(REPO_CONFIGS, {"train_images": 96, "finetune.lr": 2e-3,
                                                          "word_init_background": "background"})
    assert settings.train_images == 96 and settings.projector_word_init is True
    assert settings.word_init_background == "background" and over2 == {"lr": 2e-3} and over1 == {}


@pytest.mark.parametrize("key,value", [("projector_word_init", "false"), ("train_images", 2.5),
                                       ("word_init_scale", "2"), ("train_images", True)])
def test_wrongly_typed_setting_is_refused(key, value):
    with pytest.raises(BunnyError, match=f"demo setting {key} must be"):
        load_settings(REPO_CONFIGS, {key: value})


def test_unknown_setting_lists_valid_ones():
    with pytest.raises(BunnyError, match="unknown demo setting.*word_init_position"):
        load_settings(REPO_CONFIGS, {"word_init_positions": True})
