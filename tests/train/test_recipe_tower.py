import pytest

from bunny.errors import BunnyError
from bunny.train.parts import build_for_recipe, parse_scales
from bunny.train.recipe import recipe_from_dict
from bunny.testing import save_tiny_bunny


def test_parse_scales():
    assert parse_scales("") is None
    assert parse_scales("768,384") == [384, 768]
    with pytest.raises(BunnyError, match="comma-separated integers"):
        parse_scales("384;768")


def test_tower_image_size_interpolates_and_is_saved(tmp_path):
    folder = save_tiny_bunny(tmp_path / "base")
    recipe = recipe_from_dict({"init_from": str(folder), "tower_image_size": 42})
    model, processor = build_for_recipe(recipe)
    assert model.config.vision_config.image_size == 42
    assert model.config.image_seq_length == 9 and processor.image_seq_length == 9
