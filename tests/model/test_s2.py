import torch
import torch.nn.functional as F

from bunny.model.s2 import merge_chessboard, s2_features, split_chessboard
from bunny.model.towers import tower_features
from bunny.testing import make_tiny_bunny, random_image


def test_chessboard_round_trip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    crops = split_chessboard(x, 2)
    assert crops.shape == (8, 3, 4, 4)
    torch.testing.assert_close(crops[2], x[0, :, :4, 4:])  # crop (0, 1) of image 0
    torch.testing.assert_close(merge_chessboard(crops, 2), x)


def test_scale_two_features_equal_base_tower_on_each_tile():
    model, _ = make_tiny_bunny("llama", "siglip")
    tower = lambda px: tower_features(model.vision_tower, px, -2, "full")  # noqa: E731
    image = torch.randn(1, 3, 56, 56)  # already at the largest scale: no resize at 56
    feats = s2_features(tower, image, [28, 56])  # (1, 4, 2C)
    c = feats.shape[-1] // 2
    grid = merge_chessboard(
        torch.stack([tower(image[:, :, i * 28:(i + 1) * 28, j * 28:(j + 1) * 28])[0] for i in range(2) for j in range(2)])
        .transpose(1, 2).reshape(4, c, 2, 2), 2)  # (1, C, 4, 4) stitched tile features
    expected = F.interpolate(grid, size=(2, 2), mode="area").flatten(2).transpose(1, 2)
    torch.testing.assert_close(feats[..., c:], expected)
    base = tower(F.interpolate(image, size=(28, 28), mode="bicubic"))
    torch.testing.assert_close(feats[..., :c], base)


def test_s2_model_forward():
    model, processor = make_tiny_bunny("llama", "siglip", s2_scales=[28, 56])
    assert model.config.mm_hidden_size == 2 * model.config.vision_config.hidden_size
    processor.image_processor.size = {"height": 56, "width": 56}
    inputs = processor(text="<image> hi", images=[random_image(0)])
    assert inputs["pixel_values"].shape[-1] == 56
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
